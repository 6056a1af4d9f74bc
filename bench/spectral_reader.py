"""The spectral reading alone (no model), per EM source: how far its blur estimate is from the truth, and why.

    nice -n 5 python bench/spectral_reader.py      # writes bench/results/spectral_reader.{json,md}, ~60 s

`bench/detector_sources.py` scores the runtime's verdicts (model and spectral reading together, ~105 s);
this bench isolates the reading (appliance.spectral) so its error can be taken apart in seconds.
Same sources, crops, blur families, sigmas (1-3 px) and rig-noise rendering as detector_sources.py, its own
seed. Per source and calibration draw (5 in-focus tiles, detector_sources.calibration_draws): the rig's
reference is reference_log_power of the 5 tiles, as `calibrate` builds it but without the model's
consistency checks (so a draw `calibrate` would refuse, such as every 16-bit SEM demo draw, is read here
too); every other tile and its blurred copies are read against it with read_added_blur (the reading: the worst
region's major axis) and estimate_added_blur (the estimate: what a calibrated verdict reports as sigma_px).

Per source and family (sigma 1-3 px, every draw):
- blurred called sharp: reading <= detector.sharp_sigma_px, the runtime's rule (sharp tiles called
  non-sharp: reading above it);
- read / true: the median ratio of the reading to the true sigma, and the same for the whole tile's isotropic
  part (the mean of the two axes' variances, SpectralReading.isotropic_px); with their interquartile ranges;
- estimate / true, likewise;
- median relative error of the reading and of the estimate (the model card's "blur estimate" line is the
  estimate's since 2026-11-27; the reading's before).
The isotropic column tells a bias in the reading's size from one in its shape: for an isotropic blur
(gaussian, disk) noise in the fitted anisotropy can only lengthen the major axis.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from appliance.config import DetectorConfig  # noqa: E402
from appliance.detection.calibration import spectral_scale  # noqa: E402
from appliance.spectral import (  # noqa: E402
    SpectralReferenceArrays,
    WindowSpectra,
    estimate_added_blur,
    read_added_blur,
    reference_at_scale,
    reference_log_power,
    window_spectra,
)
from bench.detector_sources import (  # noqa: E402
    CORPUS,
    SIGMAS,
    add_pixel_size_option,
    blur_with_rig_noise,
    calibration_draws,
    load_sources,
    report,
    tile_pixel_size_nm,
    use_pixel_sizes,
)
from models.blur_synth import FAMILIES  # noqa: E402


def _quartiles(values: list[float]) -> dict[str, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75]) if values else (np.nan,) * 3
    return {"median": float(median), "iqr": float(q3 - q1)}


def _decision_px(spectra: WindowSpectra | None, reference: SpectralReferenceArrays) -> float:
    """What calls a tile non-sharp (apply_calibration): the reading; 0 when it has none."""
    reading = None if spectra is None else read_added_blur(spectra, *reference)
    return 0.0 if reading is None else reading.sigma_px


def read_source(
    tiles: list[np.ndarray], rng: np.random.Generator, sharp_px: float, pixel_nm: list[float | None] | None = None
) -> dict:
    """Every draw's readings of one source's tiles and blurred copies, summarised per family. pixel_nm: per tile,
    when every one is known: the reference is built at the draw's median pixel size and read as the ingest
    reads a tile of another size (calibration.spectral_scale; a tile beyond 2x of it is skipped)."""
    spectra = [window_spectra(t) for t in tiles]
    blurred = [
        {(f, s): window_spectra(blur_with_rig_noise(t, f, s, rng)) for f in FAMILIES for s in SIGMAS} for t in tiles
    ]
    sharp_called: list[bool] = []
    rows: dict[str, dict[str, list]] = {
        f: {"called": [], "ratio": [], "iso": [], "err": [], "estimate": [], "estimate_err": []} for f in FAMILIES
    }
    draws = calibration_draws(len(tiles), rng)
    for chosen in draws:
        members = [spectra[i] for i in chosen]
        if any(m is None for m in members):
            continue
        known = pixel_nm is not None and all(pixel_nm[i] is not None for i in range(len(tiles)))
        sizes = [float(pixel_nm[i]) if known else 1.0 for i in range(len(tiles))]  # type: ignore[index,arg-type]
        common = float(np.median([sizes[i] for i in chosen]))
        drawn = reference_log_power([m for m in members if m is not None], [sizes[i] / common for i in chosen])
        for i in (i for i in range(len(tiles)) if i not in chosen):
            scale = spectral_scale(common, sizes[i])  # as the detector reads a tile of that size
            if scale is None:
                continue
            reference = reference_at_scale(drawn, scale)
            sharp_called.append(_decision_px(spectra[i], reference) > sharp_px)
            for (family, sigma), tile_spectra in blurred[i].items():
                reading = None if tile_spectra is None else read_added_blur(tile_spectra, *reference)
                read = 0.0 if reading is None else reading.sigma_px  # no reading: nothing above the noise
                estimate = (None if tile_spectra is None else estimate_added_blur(tile_spectra, *reference)) or 0.0
                row = rows[family]
                row["called"].append(read <= sharp_px)
                row["ratio"].append(read / sigma)
                row["iso"].append(max(0.0, 0.0 if reading is None else reading.isotropic_px) / sigma)
                row["err"].append(abs(read - sigma) / sigma)
                row["estimate"].append(estimate / sigma)
                row["estimate_err"].append(abs(estimate - sigma) / sigma)
    return {
        "draws": len(draws),
        "sharp_called_nonsharp": float(np.mean(sharp_called)) if sharp_called else None,
        "blurred_called_sharp": float(np.mean([c for r in rows.values() for c in r["called"]])),
        "families": {
            f: {
                "blurred_called_sharp": float(np.mean(r["called"])),
                "read_over_true": _quartiles(r["ratio"]),
                "isotropic_over_true": _quartiles(r["iso"]),
                "median_rel_err": float(np.median(r["err"])),
                "estimate_over_true": _quartiles(r["estimate"]),
                "estimate_median_rel_err": float(np.median(r["estimate_err"])),
            }
            for f, r in rows.items()
        },
    }


HEADER = [
    "source",
    "sharp->non-sharp",
    "blurred->sharp",
    *(f"{f}: ->sharp / read÷true (iso) / estimate÷true / err read -> estimate" for f in FAMILIES),
]


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, entry in result["sources"].items():
        cells = [name, f"{entry['sharp_called_nonsharp']:.0%}", f"{entry['blurred_called_sharp']:.0%}"]
        for family in FAMILIES:
            f = entry["families"][family]
            cells.append(
                f"{f['blurred_called_sharp']:.0%} / {f['read_over_true']['median']:.2f} "
                f"({f['isotropic_over_true']['median']:.2f}) / {f['estimate_over_true']['median']:.2f} / "
                f"{f['median_rel_err']:.0%} -> {f['estimate_median_rel_err']:.0%}"
            )
        rows.append(cells)
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` ({result['machine']}, {result['runtime_s']:.0f} s)",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "spectral_reader.json")
    parser.add_argument("--seed", type=int, default=20261126)
    add_pixel_size_option(parser)
    args = parser.parse_args()
    use_pixel_sizes(not args.ignore_pixel_sizes)
    start = time.monotonic()
    sharp_px = DetectorConfig().sharp_sigma_px
    rng = np.random.default_rng(args.seed)
    sources = {}
    for source in load_sources(args.corpus):
        pixel_nm = [tile_pixel_size_nm(source.name, n) for n, _ in source.tiles]
        tiles = [t for _, t in source.tiles]
        sources[source.name] = {"note": source.note, **read_source(tiles, rng, sharp_px, pixel_nm)}
        print(f"{source.name}: {source.note}", flush=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "pixel_sizes": "ignored" if args.ignore_pixel_sizes else "as PIXEL_SIZE_NM states (rat SEM)",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs (shared)",
        "sharp_sigma_px": sharp_px,
        "sigmas_px": SIGMAS,
        "sources": sources,
        "runtime_s": time.monotonic() - start,
    }
    report(result, HEADER, table_rows(result), markdown(result), args.out)


if __name__ == "__main__":
    main()
