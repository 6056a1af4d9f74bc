"""Non-blur content is not blur, and no tissue is `empty`: the detector's labels per kind of sharp tile.

    nice -n 10 python bench/detector_content.py       # writes bench/results/detector_content.json
    nice -n 10 python bench/detector_content.py --sources  # writes bench/results/detector_content_sources.{json,md}

Sharp held-out ISBI test tiles (4 images x 8 flips/rotations, 512x512) with content that fools focus
metrics (issue 14 point 3) rendered into them *before* acquisition noise, so each is an in-focus
acquisition of that content: a section fold (dark band, two layers), a crack (bright band), a dirt
particle, the section edge (70 % bare resin), knife chatter (periodic bands), low contrast, inverted
contrast, a charging gradient, a stitching seam (brightness step); and bare resin (flat, shaded, dark),
which must be `empty`. Every other kind must be `sharp`. The table gives the share of each label and
whether the kind meets its target (100 % of its tiles with the wanted label). Also: the same sharp tiles
blurred at sigma 8 px must be `retake`, never `empty` (tissue blurred beyond repair is still tissue).

`--sources`: the same kinds, geometry scaled to the tile's side, drawn on the real in-focus tiles of every
em-corpus source (bench.detector_sources.load_sources, which cuts small sources into crops) as they are,
with their own noise (bare resin gets Gaussian noise at the tile's own level). "Sharp" on another rig is
relative to that rig, so the wanted outcome is that the content does not change the verdict: per kind and
source, the share of tiles labelled as the same plain tile, uncalibrated and calibrated (calibrate on 5
plain tiles of the source; each tile read against their in-focus spectrum, then apply_calibration, as the
running appliance does), plus the share `sharp` calibrated; bare resin: the share `empty`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # models/ is not installed

from appliance.config import DetectorConfig  # noqa: E402
from appliance.detection.calibration import (  # noqa: E402
    CalibrationError,
    RigCalibration,
    apply_calibration,
    calibrate,
    noise_level,
    rig_reference,
)
from appliance.detection.detector import BlurDetector  # noqa: E402
from appliance.messages import TILE_LABELS, BlurAssessment  # noqa: E402
from bench.detector_sources import (  # noqa: E402
    CALIBRATION_TILES,
    CORPUS,
    Source,
    add_pixel_size_option,
    calibration_pixel_sizes,
    load_sources,
    tile_pixel_size_nm,
    use_pixel_sizes,
)
from models import content_synth  # noqa: E402
from models.blur_synth import BlurParams, dihedral_tiles, quantize, synthesize, to_unit_float  # noqa: E402

Content = Callable[[np.ndarray], np.ndarray]

REFERENCE_SIDE_PX = 512.0
RESIN_KINDS = ("bare resin, flat", "bare resin, shaded", "bare resin, dark")


def content_kinds(side_px: float = REFERENCE_SIDE_PX) -> dict[str, tuple[Content, str]]:
    """Each kind with fixed geometry, written for a 512 px tile and scaled to a tile of side `side_px`.

    Lengths (offsets, widths, radius, chatter period) scale with the side, so a kind covers the same
    fraction of any tile; models/content_synth.py renders each kind (training draws it at random).
    Returns {kind: (content function of a float (H, W) image in [0, 1], wanted label)}.
    """
    s = side_px / REFERENCE_SIDE_PX
    kinds: dict[str, tuple[Content, str]] = {
        "plain": (lambda f: f, "sharp"),
        "fold": (lambda f: content_synth.fold(f, 111.8, 43.1 * s, 23.2 * s, 0.35), "sharp"),
        "crack": (lambda f: content_synth.crack(f, 11.3, -46.3 * s, 5.9 * s), "sharp"),
        "dirt particle": (lambda f: content_synth.dirt(f, 180.0 * s, 300.0 * s, 40.0 * s), "sharp"),
        "section edge (70 % resin)": (lambda f: content_synth.section_edge(f, 0.0, -96.0 * s), "sharp"),
        "knife chatter": (lambda f: content_synth.chatter(f, 24.0 * s, 0.25), "sharp"),
        "low contrast (x0.2)": (lambda f: content_synth.low_contrast(f, 0.2), "sharp"),
        "inverted contrast": (content_synth.inverted, "sharp"),
        "charging gradient": (lambda f: content_synth.charging(f, 0.0), "sharp"),
        "stitching seam": (lambda f: content_synth.seam(f, True, 0.5), "sharp"),
    }
    resin = (
        lambda f: content_synth.resin(f, 0.6),
        lambda f: content_synth.resin(f, 0.55, 0.4),
        lambda f: content_synth.resin(f, 0.08),
    )
    kinds.update({kind: (render, "empty") for kind, render in zip(RESIN_KINDS, resin, strict=True)})
    return kinds


KINDS = content_kinds()


def acquire(image: np.ndarray, rng: np.random.Generator, params: BlurParams | None = None) -> np.ndarray:
    """Blur (optional), Poisson-Gaussian noise and 8-bit quantisation as in the detector's training."""
    return synthesize(quantize(np.clip(image, 0.0, 1.0), np.uint16), params, rng, dtype=np.uint8)


def label_shares(detector: BlurDetector, tiles: list[np.ndarray]) -> dict[str, float]:
    counts = Counter(a.label for a in detector.assess(tiles))
    return {label: counts[label] / len(tiles) for label in TILE_LABELS}


# ---------------------------------------------------------------------------------------------------
# Per source: the same kinds on the real in-focus tiles of every em-corpus source


def draw_content(tile: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The kind drawn on a real uint8/uint16 tile as it is (its own noise), geometry scaled to its side.

    Bare resin replaces the whole tile, so it gets Gaussian noise at the tile's own (Immerkaer) level:
    a noiseless constant is no acquisition. Other kinds keep the tile's noise (flat fills such as the
    crack, the dirt particle and the resin beyond the section edge stay noiseless). Same dtype.
    """
    content, _ = content_kinds(float(min(tile.shape)))[kind]
    image = content(to_unit_float(tile))
    if kind in RESIN_KINDS:
        image = image + rng.normal(0.0, noise_level(tile), size=image.shape).astype(np.float32)
    return quantize(np.clip(image, 0.0, 1.0), tile.dtype)


def _share(assessments: list[BlurAssessment], label: str) -> float:
    return float(np.mean([a.label == label for a in assessments]))


def _unchanged(content: list[BlurAssessment], plain: list[BlurAssessment]) -> float:
    return float(np.mean([c.label == p.label for c, p in zip(content, plain, strict=True)]))


def source_content(
    source: Source, detector: BlurDetector, cfg: DetectorConfig, kinds: list[str], rng: np.random.Generator
) -> dict:
    """Labels of one source's tiles with each kind drawn on them, uncalibrated and calibrated.

    Calibrates on CALIBRATION_TILES random plain tiles of the source and evaluates the others. Per kind:
    the share of tiles whose label equals the same plain tile's label ("unchanged"), uncalibrated and
    calibrated, and the share `sharp` (`empty` for bare resin). A refused calibration is reported.
    """
    pick = sorted(int(i) for i in rng.choice(len(source.tiles), CALIBRATION_TILES, replace=False))
    names = [source.tiles[i][0] for i in pick]
    rest = [t for i, (_, t) in enumerate(source.tiles) if i not in pick]
    # Each tile's pixel size as its header would carry it (detector_sources.PIXEL_SIZE_NM; None: unknown).
    rest_nm = [tile_pixel_size_nm(source.name, n) for i, (n, _) in enumerate(source.tiles) if i not in pick]
    try:
        cal = calibrate(
            [source.tiles[i][1] for i in pick], names, detector, calibration_pixel_sizes(source.name, names)
        )
        calibration = {"tiles": names, "baseline_sigma_px": cal.baseline_sigma_px, "spectral": cal.spectral is not None}
    except CalibrationError as exc:
        cal, calibration = None, {"tiles": names, "refused": str(exc)}
    # With the calibration's spectral reference each judged tile also carries its spectral reading, which
    # apply_calibration takes (the runtime's rule); the uncalibrated labels are the model's own either way.
    references = [None if cal is None else cal.spectral_arrays(nm) for nm in rest_nm]

    def judge(tiles: list[np.ndarray]) -> list[BlurAssessment]:
        return detector.assess(tiles, spectral_references=references)

    def calibrated(verdicts: list[BlurAssessment], cal: RigCalibration) -> list[BlurAssessment]:
        return [apply_calibration(a, rig_reference(cal, nm), cfg) for a, nm in zip(verdicts, rest_nm, strict=True)]

    plain = judge(rest)
    plain_cal = calibrated(plain, cal) if cal else None
    rows = {}
    for kind in kinds:
        raw = plain if kind == "plain" else judge([draw_content(t, kind, rng) for t in rest])
        want = KINDS[kind][1]
        row = {"want": want, "uncalibrated": {"unchanged": _unchanged(raw, plain), want: _share(raw, want)}}
        if cal is not None:
            judged = calibrated(raw, cal)
            row["calibrated"] = {"unchanged": _unchanged(judged, plain_cal), want: _share(judged, want)}
        rows[kind] = row
    return {"n_eval": len(rest), "note": source.note, "calibration": calibration, "kinds": rows}


def run_sources(detector: BlurDetector, cfg: DetectorConfig, corpus: Path, seed: int) -> dict:
    """source_content for every source of load_sources(corpus), all kinds."""
    rng = np.random.default_rng(seed)
    return {s.name: source_content(s, detector, cfg, list(KINDS), rng) for s in load_sources(corpus)}


def _cell(row: dict) -> str:
    """`empty` share for resin; else unchanged uncal / unchanged cal / sharp cal (cal '-' if refused)."""
    u, c = row["uncalibrated"], row.get("calibrated")
    if row["want"] == "empty":
        return f"{100 * u['empty']:.0f}"
    cal = f"{100 * c['unchanged']:.0f} / {100 * c['sharp']:.0f}" if c else "refused"
    return f"{100 * u['unchanged']:.0f} / {cal}"


def sources_markdown(result: dict) -> str:
    """One row per kind, one column per source."""
    sources = result["sources"]
    names = list(sources)
    lines = [
        f"`{result['command']}` ({result['model_version']}; {result['runtime_s']:.0f} s on {result['machine']})",
        "",
        "Cells (%): verdict unchanged by the content, uncalibrated / calibrated, then `sharp` calibrated; "
        "bare resin: `empty`. Plain row: `sharp` uncalibrated / calibrated.",
        "",
        "| content | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| tiles evaluated | " + " | ".join(str(sources[n]["n_eval"]) for n in names) + " |",
    ]
    base = [sources[n]["calibration"].get("baseline_sigma_px") for n in names]
    lines.append(
        "| calibration baseline | " + " | ".join("refused" if b is None else f"{b:.2f} px" for b in base) + " |"
    )
    plain = []
    for n in names:
        row = sources[n]["kinds"]["plain"]
        cal = row.get("calibrated")
        plain.append(
            f"{100 * row['uncalibrated']['sharp']:.0f} / " + (f"{100 * cal['sharp']:.0f}" if cal else "refused")
        )
    lines.append("| plain (`sharp`) | " + " | ".join(plain) + " |")
    kinds = [k for k in sources[names[0]]["kinds"] if k != "plain"]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(_cell(sources[n]["kinds"][kind]) for n in names) + " |")
    refused = [(n, e["calibration"]["refused"]) for n, e in sources.items() if "refused" in e["calibration"]]
    if refused:
        lines += ["", "Calibrations refused by `calibrate`:", ""] + [f"- {n}: {why}" for n, why in refused]
    lines += ["", "How each source was cut:", ""] + [f"- {n}: {e['note']}" for n, e in sources.items()]
    return "\n".join(lines) + "\n"


def main_sources(args: argparse.Namespace, detector: BlurDetector, cfg: DetectorConfig) -> None:
    start = time.monotonic()
    sources = run_sources(detector, cfg, args.corpus, args.seed)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "model_version": detector.model_version,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "sources": sources,
        "runtime_s": time.monotonic() - start,
    }
    out = args.out or REPO / "bench" / "results" / "detector_content_sources.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(sources_markdown(result))
    print(sources_markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['runtime_s']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["onnx", "classical"], default="onnx")
    parser.add_argument(
        "--out", type=Path, help="JSON to write (default bench/results/detector_content[_sources].json)"
    )
    parser.add_argument("--sources", action="store_true", help="the kinds on every em-corpus source's real tiles")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--seed", type=int, default=20261126)
    add_pixel_size_option(parser)
    args = parser.parse_args()
    use_pixel_sizes(not args.ignore_pixel_sizes)
    cfg = DetectorConfig(backend=args.backend)
    detector = BlurDetector.from_config(cfg)
    if args.sources:
        main_sources(args, detector, cfg)
        return
    args.out = args.out or REPO / "bench" / "results" / "detector_content.json"
    rng = np.random.default_rng(args.seed)
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
