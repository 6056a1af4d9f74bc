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
from models.blur_synth import BlurParams, dihedral_tiles, quantize, synthesize, to_unit_float  # noqa: E402

SIDE = 512
_YY, _XX = np.mgrid[:SIDE, :SIDE].astype(np.float32)
Content = Callable[[np.ndarray], np.ndarray]


def _band(distance: np.ndarray, half_width: float) -> np.ndarray:
    return np.abs(distance) < half_width


def _fold(f: np.ndarray) -> np.ndarray:
    out = f.copy()
    band = _band(_YY - 0.4 * _XX - 200.0, 25.0)
    out[band] *= 0.35  # two section layers overlap: darker, both in focus
    return out


def _crack(f: np.ndarray) -> np.ndarray:
    out = f.copy()
    out[_band(_XX + 0.2 * _YY - 260.0, 6.0)] = 0.95  # bare support film: bright, sharp-edged
    return out


def _dirt(f: np.ndarray) -> np.ndarray:
    out = f.copy()
    out[(_YY - 180.0) ** 2 + (_XX - 300.0) ** 2 < 40.0**2] = 0.03
    return out


def _section_edge(f: np.ndarray) -> np.ndarray:
    out = f.copy()
    out[:, 160:] = float(np.median(f))
    return out


def _chatter(f: np.ndarray) -> np.ndarray:
    return np.clip(f * (1.0 + 0.25 * np.sin(2.0 * np.pi * _YY / 24.0)), 0.0, 1.0)


def _low_contrast(f: np.ndarray) -> np.ndarray:
    return 0.45 + 0.2 * (f - f.mean())


def _inverted(f: np.ndarray) -> np.ndarray:
    return 1.0 - f


def _charging(f: np.ndarray) -> np.ndarray:
    return np.clip(f * (0.5 + 0.8 * _XX / SIDE), 0.0, 1.0)


def _seam(f: np.ndarray) -> np.ndarray:
    out = f.copy()
    out[:, SIDE // 2 :] = np.clip(out[:, SIDE // 2 :] * 1.3 + 0.05, 0.0, 1.0)
    return out


def _resin(level: float, shading: float = 0.0) -> Content:
    return lambda f: np.full_like(f, level) + shading * (_XX / SIDE - 0.5)


KINDS: dict[str, tuple[Content, str]] = {
    "plain": (lambda f: f, "sharp"),
    "fold": (_fold, "sharp"),
    "crack": (_crack, "sharp"),
    "dirt particle": (_dirt, "sharp"),
    "section edge (70 % resin)": (_section_edge, "sharp"),
    "knife chatter": (_chatter, "sharp"),
    "low contrast (x0.2)": (_low_contrast, "sharp"),
    "inverted contrast": (_inverted, "sharp"),
    "charging gradient": (_charging, "sharp"),
    "stitching seam": (_seam, "sharp"),
    "bare resin, flat": (_resin(0.6), "empty"),
    "bare resin, shaded": (_resin(0.55, 0.4), "empty"),
    "bare resin, dark": (_resin(0.08), "empty"),
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
