"""Calibrate the exported model on the val split (never test) and store the results in its sidecar.

    python -m models.detector.calibrate            # run by train.py after export

Three constants, all written into appliance/weights/blur_detector.json (`appliance.sidecar.DetectorSidecar`):
- `sigma_calibration`: the network's tile-level sigma is biased (it over-reads disk blur and under-reads
  the major axis of astigmatic blur); the soft/retake boundary needs sigma in true px. For each true sigma
  on a grid, the median tile estimate over the val images (8 flips/rotations, gaussian + disk) is
  measured with calibration off; the runtime maps every patch estimate through that monotone table.
- `intrinsic_c2`: the PSF-shape constant of appliance/detection/psf_shape.py, the candidate with the
  smallest median astigmatism error on val astigmatic tiles.
- `local_window_scale`: the table above is fitted to the tile-level reading (the worst of the whole-tile
  mean and the worst region, so it takes up the worst region's upward bias); a local-blur window reads a
  plain patch mean. The median ratio tile reading / whole-tile patch log-mean (+0.5 px) on uniformly
  blurred val tiles (gaussian + disk, true sigma 2-4 px) puts a window on the label's scale.

    python -m models.detector.calibrate --only local_window_scale   # that constant alone
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.config import DetectorConfig
from appliance.detection.backends import OnnxBackend
from appliance.detection.calibration import noise_level
from appliance.detection.detector import LOG_SIGMA_OFFSET_PX, BlurDetector
from appliance.detection.patches import extract_patches
from appliance.sidecar import DetectorSidecar, SigmaCalibration
from appliance.weights import BLUR_DETECTOR_MODEL
from models.blur_synth import BlurParams, blur_with_noise, dihedral_tiles, sample_blur, synthesize
from models.detector.corpus import ISBI_SOURCE, corpus_sources, same_source

GRID_SIGMA = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
FAMILIES = ("gaussian", "disk")  # isotropic: astigmatism is psf_shape.py's job
C2_CANDIDATES = (0.5, 0.75, 1.0, 1.5, 2.0)  # px^2; the first stands in until the first fit
CORPUS_TILES = 4  # per em-corpus source: each instrument weighs about as much as 4 ISBI flips
CORPUS_CROP = 256


def _detector(model_path: Path, sidecar: DetectorSidecar) -> BlurDetector:
    return BlurDetector(OnnxBackend(model_path, sidecar=sidecar), DetectorConfig())


@dataclass(frozen=True)
class TableTile:
    """A sharp tile the constants are measured on; noise None = ISBI (synthetic Poisson-Gaussian noise),
    else a real em-corpus tile blurred and given its own rig noise (as bench/detector_sources.py does)."""

    pixels: np.ndarray
    noise: float | None

    def render(self, params: BlurParams | None, rng: np.random.Generator) -> np.ndarray:
        if self.noise is None:
            return synthesize(self.pixels, params, rng)
        return self.pixels if params is None else blur_with_noise(self.pixels, params, self.noise, rng)


def table_tiles(use_corpus: bool, holdout: str | None = None) -> list[TableTile]:
    """ISBI val tiles (8 flips each) unless ISBI is held out; with use_corpus, up to CORPUS_TILES centre
    crops of each training em-corpus source (never the held-out one)."""
    tiles = []
    if holdout is None or not same_source(holdout, ISBI_SOURCE):
        tiles += [TableTile(t, None) for t in dihedral_tiles("val")]
    if use_corpus:
        for source in corpus_sources(holdout=holdout):
            for tile in source.tiles[:CORPUS_TILES]:
                h, w = tile.pixels.shape
                y, x = max((h - CORPUS_CROP) // 2, 0), max((w - CORPUS_CROP) // 2, 0)
                crop = np.ascontiguousarray(tile.pixels[y : y + CORPUS_CROP, x : x + CORPUS_CROP])
                tiles.append(TableTile(crop, noise_level(crop)))
    return tiles


def fit_intrinsic_c2(
    model_path: Path = BLUR_DETECTOR_MODEL, seed: int = 8, tiles: list[TableTile] | None = None
) -> float:
    """Median |log anisotropy error| on val astigmatic tiles per candidate c^2 (printed); returns the best."""
    sidecar = DetectorSidecar.for_model(model_path)
    rng = np.random.default_rng(seed)
    cases = []
    for tile in (tiles if tiles is not None else table_tiles(False))[::2]:
        for sigma in (1.5, 2.0, 3.0, 4.0, 6.0):
            params = sample_blur(rng, "astigmatic", sigma_range=(sigma, sigma))
            cases.append((tile.render(params, rng), params))
    errors = {}
    for c2 in C2_CANDIDATES:
        found = _detector(model_path, sidecar.model_copy(update={"intrinsic_c2": c2})).assess([t for t, _ in cases])
        errors[c2] = float(
            np.median([abs(math.log(a.anisotropy / p.anisotropy)) for a, (_, p) in zip(found, cases, strict=True)])
        )
        print(f"c2={c2}: median |log anisotropy error| {errors[c2]:.3f}")
    return min(errors, key=errors.__getitem__)


def calibrate(
    model_path: Path = BLUR_DETECTOR_MODEL, seed: int = 7, tiles: list[TableTile] | None = None
) -> SigmaCalibration:
    """Measure the sigma table (with the sidecar's c^2) and write it into model_path's sidecar; returns it."""
    sidecar_path = model_path.with_suffix(".json")
    sidecar = DetectorSidecar.load(sidecar_path)
    raw = sidecar.model_copy(
        update={
            "sigma_calibration": None,
            "intrinsic_c2": sidecar.intrinsic_c2 or C2_CANDIDATES[0],
        }
    )
    detector = _detector(model_path, raw)  # measures the raw network
    rng = np.random.default_rng(seed)
    tiles = tiles if tiles is not None else table_tiles(False)
    estimated = []
    for sigma in GRID_SIGMA:
        rendered = []
        for family in FAMILIES:
            for tile in tiles:
                drawn = sample_blur(rng, family, sigma_range=(max(sigma, 0.1), max(sigma, 0.1)))
                params = BlurParams(family, sigma, drawn.anisotropy, drawn.angle_deg) if sigma > 0 else None
                rendered.append(tile.render(params, rng))
        estimated.append(float(np.median([a.sigma_px for a in detector.assess(rendered)])))
    # Strictly increasing, so the runtime's interpolation is a proper monotone map.
    est = np.maximum.accumulate(np.array(estimated))
    est = est + 1e-3 * np.arange(len(est))
    table = SigmaCalibration(estimated=[round(float(v), 4) for v in est], true=list(GRID_SIGMA))
    raw.model_copy(update={"sigma_calibration": table}).write(sidecar_path)
    print("sigma calibration (val split):", table.model_dump_json())
    return table


def fit_local_window_scale(
    model_path: Path = BLUR_DETECTOR_MODEL, seed: int = 9, tiles: list[TableTile] | None = None
) -> float:
    """Median (tile sigma + 0.5) / exp(patch log-mean) on uniformly blurred val tiles; written to the sidecar."""
    sidecar_path = model_path.with_suffix(".json")
    sidecar = DetectorSidecar.load(sidecar_path).model_copy(update={"local_window_scale": None})
    detector = _detector(model_path, sidecar)
    cfg, rng, ratios = DetectorConfig(), np.random.default_rng(seed), []
    for sigma in (2.0, 3.0, 4.0):
        for family in FAMILIES:
            for tile in tiles if tiles is not None else table_tiles(False):
                drawn = sample_blur(rng, family, sigma_range=(sigma, sigma))
                rendered = tile.render(BlurParams(family, sigma, drawn.anisotropy, drawn.angle_deg), rng)
                patches, _ = extract_patches(rendered, cfg.patch_rows, cfg.patches_per_row)
                est = detector.backend.estimate(patches)
                logs = np.log(est.sigma_px + LOG_SIGMA_OFFSET_PX)
                patch_mean = math.exp(float((est.weight * logs).sum() / max(float(est.weight.sum()), 1e-300)))
                tile_read = detector.assess([rendered])[0].sigma_px + LOG_SIGMA_OFFSET_PX
                ratios.append(tile_read / patch_mean)
    scale = round(float(np.median(ratios)), 4)
    sidecar.model_copy(update={"local_window_scale": scale}).write(sidecar_path)
    print(f"local_window_scale (val split, {len(ratios)} tiles): {scale} written to {sidecar_path}")
    return scale


def calibrate_all(model_path: Path = BLUR_DETECTOR_MODEL, use_corpus: bool = False, holdout: str | None = None) -> None:
    """The sigma table, then c^2 (the order the bundled sidecar was made in), both written to the sidecar.

    use_corpus (a model trained on the em-corpus): both are measured on ISBI val plus the training
    sources' tiles, never on `holdout`.
    """
    tiles = table_tiles(use_corpus, holdout)
    calibrate(model_path, tiles=tiles)
    c2 = fit_intrinsic_c2(model_path, tiles=tiles)
    sidecar_path = model_path.with_suffix(".json")
    DetectorSidecar.load(sidecar_path).model_copy(update={"intrinsic_c2": c2}).write(sidecar_path)
    print(f"intrinsic_c2 (val split): {c2} written to {sidecar_path}")
    fit_local_window_scale(model_path, tiles=tiles)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["local_window_scale"], help="fit that constant alone")
    if parser.parse_args().only == "local_window_scale":
        fit_local_window_scale()
    else:
        calibrate_all()
