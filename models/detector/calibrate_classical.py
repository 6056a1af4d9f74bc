"""Calibrate the classical detector backend (raw re-blur sigma -> true added sigma) and write its sidecar.

    python -m models.detector.calibrate_classical

Prints the median raw estimate per true Gaussian sigma on the training split and writes the table into
appliance/weights/classical_detector.json (`appliance.sidecar.DetectorSidecar`). The raw value includes
the images' own blur and the pre-smoothing and under-reads large blur (few edges survive the noise
threshold): the table keeps the rows while the median still rises by at least MIN_RISE and most patches
have usable edges, and clamps beyond its end (the runtime cannot tell 2 px from 6 px there and relies on
"not judgeable" for strong blur). The PSF-shape constant is the learned model's (blur_detector.json).
"""

from __future__ import annotations

import numpy as np

from appliance.config import DetectorConfig
from appliance.detection.backends import reblur_sigma
from appliance.detection.patches import PATCH, extract_patches
from appliance.sidecar import DetectorSidecar, SigmaCalibration
from appliance.weights import BLUR_DETECTOR_MODEL, CLASSICAL_DETECTOR_SIDECAR
from models.blur_synth import BlurParams, load_image, load_split, synthesize

SIGMAS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
MODEL_VERSION = "classical-reblur-v1"
_LATTICE = DetectorConfig()  # the runtime's default patch lattice
MIN_RISE = 0.05  # px of raw sigma between rows: below it the estimate has stopped following the blur
MIN_USABLE_SHARE = 0.5  # share of patches with usable edges


def measure() -> list[tuple[float, float, float]]:
    """(true sigma, median raw sigma, usable patch share) per row of SIGMAS, printed as a table."""
    images = [load_image(p) for p in load_split("train")]
    rng = np.random.default_rng(0)
    rows = []
    print("true_sigma  median_raw  usable_patch_share")
    for sigma in SIGMAS:
        raws, usable = [], []
        for image in images:
            params = BlurParams("gaussian", sigma) if sigma > 0 else None
            patches, _ = extract_patches(synthesize(image, params, rng), _LATTICE.patch_rows, _LATTICE.patches_per_row)
            for patch in patches:
                raw, weight = reblur_sigma(patch)
                usable.append(weight > 0)
                if weight > 0:
                    raws.append(raw)
        median = float(np.median(raws)) if raws else float("nan")
        rows.append((sigma, median, float(np.mean(usable))))
        print(f"{sigma:10.1f}  {median:10.2f}  {np.mean(usable):18.2f}")
    return rows


def table_from(rows: list[tuple[float, float, float]]) -> SigmaCalibration:
    """The leading rows whose raw median still rises and is backed by usable patches (2 decimals)."""
    kept: list[tuple[float, float]] = []
    for sigma, median, usable in rows:
        raw = round(median, 2)
        if usable < MIN_USABLE_SHARE or (kept and raw < kept[-1][1] + MIN_RISE):
            break
        kept.append((sigma, raw))
    return SigmaCalibration(estimated=[r for _, r in kept], true=[s for s, _ in kept], beyond="clamp")


def main() -> None:
    table = table_from(measure())
    sidecar = DetectorSidecar(
        model_version=MODEL_VERSION,
        patch=PATCH,
        sigma_calibration=table,
        intrinsic_c2=DetectorSidecar.for_model(BLUR_DETECTOR_MODEL).intrinsic_c2,
    )
    sidecar.write(CLASSICAL_DETECTOR_SIDECAR)
    print(f"wrote {CLASSICAL_DETECTOR_SIDECAR}: {table.model_dump_json()}")


if __name__ == "__main__":
    main()
