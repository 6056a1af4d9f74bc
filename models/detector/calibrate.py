"""Calibrate the exported model's sigma scale on the val split (never test) and store it in its JSON.

    python -m models.detector.calibrate            # run by train.py after export

The network's tile-level sigma is biased (it over-reads disk blur and under-reads the major axis of
astigmatic blur); the soft/retake boundary needs sigma in true px. For each true sigma on a grid, the
median tile estimate over the val images (8 flips/rotations, gaussian + disk) is measured
with calibration off; the runtime maps every patch estimate through that monotone table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from appliance import psf_shape
from appliance.blur_detection import BUNDLED_MODEL, BlurDetector, OnnxBackend
from appliance.config import DetectorConfig
from models.blur_synth import BlurParams, dihedral_tiles, sample_blur, synthesize

GRID_SIGMA = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
FAMILIES = ("gaussian", "disk")  # isotropic: astigmatism is psf_shape.py's job


def fit_intrinsic_c2(model_path: Path = BUNDLED_MODEL, seed: int = 8) -> float:
    """Print the astigmatism error on val astigmatic tiles per candidate c^2 (psf_shape.INTRINSIC_C2)."""
    detector = BlurDetector(OnnxBackend(model_path), DetectorConfig())
    rng = np.random.default_rng(seed)
    cases = []
    for tile in dihedral_tiles("val")[::2]:
        for sigma in (1.5, 2.0, 3.0, 4.0, 6.0):
            params = sample_blur(rng, "astigmatic", sigma_range=(sigma, sigma))
            cases.append((synthesize(tile, params, rng), params))
    saved, errors = psf_shape.INTRINSIC_C2, {}
    try:
        for c2 in (0.5, 0.75, 1.0, 1.5, 2.0):
            psf_shape.INTRINSIC_C2 = c2
            found = detector.assess([tile for tile, _ in cases])
            errors[c2] = float(np.median([abs(math.log(a.anisotropy / p.anisotropy))
                                          for a, (_, p) in zip(found, cases, strict=True)]))
            print(f"c2={c2}: median |log anisotropy error| {errors[c2]:.3f}")
    finally:
        psf_shape.INTRINSIC_C2 = saved
    return min(errors, key=errors.__getitem__)


def calibrate(model_path: Path = BUNDLED_MODEL, seed: int = 7) -> dict[str, list[float]]:
    """Measure the table and write it into model_path's .json sidecar; returns it."""
    meta_path = model_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.pop("sigma_calibration", None)
    meta_path.write_text(json.dumps(meta, indent=2))  # measure the raw network
    detector = BlurDetector(OnnxBackend(model_path), DetectorConfig())
    rng = np.random.default_rng(seed)
    tiles = dihedral_tiles("val")
    estimated = []
    for sigma in GRID_SIGMA:
        rendered = []
        for family in FAMILIES:
            for tile in tiles:
                drawn = sample_blur(rng, family, sigma_range=(max(sigma, 0.1), max(sigma, 0.1)))
                params = BlurParams(family, sigma, drawn.anisotropy, drawn.angle_deg) if sigma > 0 else None
                rendered.append(synthesize(tile, params, rng))
        estimated.append(float(np.median([a.sigma_px for a in detector.assess(rendered)])))
    # Strictly increasing, so the runtime's interpolation is a proper monotone map.
    est = np.maximum.accumulate(np.array(estimated))
    est = est + 1e-3 * np.arange(len(est))
    table = {"estimated": [round(float(v), 4) for v in est], "true": list(GRID_SIGMA)}
    meta["sigma_calibration"] = table
    meta_path.write_text(json.dumps(meta, indent=2))
    print("sigma calibration (val split):", json.dumps(table))
    return table


if __name__ == "__main__":
    calibrate()
    print("best psf_shape.INTRINSIC_C2 on val:", fit_intrinsic_c2())
