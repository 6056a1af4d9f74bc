"""Non-blur content is not blur, and no tissue is `empty`: the detector's labels per kind of sharp tile.

    nice -n 10 python bench/detector_content.py       # writes bench/results/detector_content.json

Sharp held-out ISBI test tiles (4 images x 8 flips/rotations, 512x512) with content that fools focus
metrics (issue 14 point 3) rendered into them *before* acquisition noise, so each is an in-focus
acquisition of that content: a section fold (dark band, two layers), a crack (bright band), a dirt
particle, the section edge (70 % bare resin), knife chatter (periodic bands), low contrast, inverted
contrast, a charging gradient, a stitching seam (brightness step); and bare resin (flat, shaded, dark),
which must be `empty`. Every other kind must be `sharp`. The table gives the share of each label and
whether the kind meets its target (100 % of its tiles with the wanted label). Also: the same sharp tiles
blurred at sigma 8 px must be `retake`, never `empty` (tissue blurred beyond repair is still tissue).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # models/ is not installed

from appliance.config import DetectorConfig  # noqa: E402
from appliance.detection.detector import BlurDetector  # noqa: E402
from appliance.messages import TILE_LABELS  # noqa: E402
from models import content_synth  # noqa: E402
from models.blur_synth import BlurParams, dihedral_tiles, quantize, synthesize, to_unit_float  # noqa: E402

Content = Callable[[np.ndarray], np.ndarray]

# Fixed geometry on a 512 px tile (models/content_synth.py renders each kind; training draws it at random).
KINDS: dict[str, tuple[Content, str]] = {
    "plain": (lambda f: f, "sharp"),
    "fold": (lambda f: content_synth.fold(f, 111.8, 43.1, 23.2, 0.35), "sharp"),
    "crack": (lambda f: content_synth.crack(f, 11.3, -46.3, 5.9), "sharp"),
    "dirt particle": (lambda f: content_synth.dirt(f, 180.0, 300.0, 40.0), "sharp"),
    "section edge (70 % resin)": (lambda f: content_synth.section_edge(f, 0.0, -96.0), "sharp"),
    "knife chatter": (lambda f: content_synth.chatter(f, 24.0, 0.25), "sharp"),
    "low contrast (x0.2)": (lambda f: content_synth.low_contrast(f, 0.2), "sharp"),
    "inverted contrast": (content_synth.inverted, "sharp"),
    "charging gradient": (lambda f: content_synth.charging(f, 0.0), "sharp"),
    "stitching seam": (lambda f: content_synth.seam(f, True, 0.5), "sharp"),
    "bare resin, flat": (lambda f: content_synth.resin(f, 0.6), "empty"),
    "bare resin, shaded": (lambda f: content_synth.resin(f, 0.55, 0.4), "empty"),
    "bare resin, dark": (lambda f: content_synth.resin(f, 0.08), "empty"),
}


def acquire(image: np.ndarray, rng: np.random.Generator, params: BlurParams | None = None) -> np.ndarray:
    """Blur (optional), Poisson-Gaussian noise and 8-bit quantisation as in the detector's training."""
    return synthesize(quantize(np.clip(image, 0.0, 1.0), np.uint16), params, rng, dtype=np.uint8)


def label_shares(detector: BlurDetector, tiles: list[np.ndarray]) -> dict[str, float]:
    counts = Counter(a.label for a in detector.assess(tiles))
    return {label: counts[label] / len(tiles) for label in TILE_LABELS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["onnx", "classical"], default="onnx")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "detector_content.json")
    args = parser.parse_args()
    detector = BlurDetector.from_config(DetectorConfig(backend=args.backend))
    rng = np.random.default_rng(20261126)
    sources = [to_unit_float(t) for t in dihedral_tiles("test")]
    rows = []
    for kind, (content, want) in KINDS.items():
        shares = label_shares(detector, [acquire(content(f), rng) for f in sources])
        rows.append({"kind": kind, "want": want, "n": len(sources), **shares, "met": shares[want] == 1.0})
    blurred = label_shares(detector, [acquire(f, rng, BlurParams("gaussian", 8.0)) for f in sources])
    rows.append({"kind": "tissue blurred sigma 8 px", "want": "retake", "n": len(sources), **blurred})
    rows[-1]["met"] = blurred["retake"] == 1.0
    result = {"command": " ".join(["python", *sys.argv]), "model_version": detector.model_version, "rows": rows}
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` ({result['model_version']})",
        "",
        "| content (in focus unless said) | tiles | sharp | soft | retake | empty | wanted | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        shares = " | ".join(f"{100 * row[label]:.0f} %" for label in TILE_LABELS)
        lines.append(f"| {row['kind']} | {row['n']} | {shares} | {row['want']} | {'yes' if row['met'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
