"""How much of a restored tile should be the learned model's and how much the rig Wiener's, on this rig.

Measured once, at calibration, on the rig's own known-good tiles: each is blurred by a fixed set of probe
blurs (Gaussian, disk, astigmatic and tilted at sigma 1.5 and 3 px, with the tile's own noise level added
once more), restored by the deblur model and by the rig Wiener (appliance.restoration.rig_wiener), and
every weight of MODEL_WEIGHTS is scored by its mean PSNR against the tile as acquired. The best weight is
kept in the calibration file. On the em-corpus (bench/deblur_sources.py --calibrated, 2026-11-27) it was
0.25 or 0.5 depending on the source and the model (bundled: 0.25 on four sources, 0.25-0.5 on neubias, 0.5
on SBEM and ISBI; leave-one-source-out folds: 0.25 on the rat SEM and ISBI, 0.25-0.5 on MICrONS, 0.5 on the
others; 0 to 0.75 before the tilted probes), so no one weight fits all rigs. Nothing here is learned from
other instruments; the probes' blur and noise draws are seeded, so a calibration of the same tiles gives
the same weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from appliance.messages import BlurAssessment
from appliance.noise import patch_noise_sigma
from appliance.pixels import centre_crop, psnr_db, tilted_blur
from appliance.restoration.restorer import TileRestorer
from appliance.restoration.rig_wiener import blend, rig_wiener
from appliance.restoration.wiener import gaussian_psf
from appliance.spectral import SpectralReferenceArrays

MODEL_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# (family, sigma px): every family the detector's blur covers, at a mild and a strong restorable blur. Tilted
# blur (a non-flat field of view) has no single PSF: the rig Wiener restores it as one mean PSF and the model
# does better there. Without tilted probes the measured share followed the other three alone, and when a
# better disk reading moved it towards the Wiener, tilted tiles lost 0.1-0.4 dB on four em-corpus sources
# (bench/deblur_sources.py --calibrated, 2026-11-27).
PROBES: tuple[tuple[str, float], ...] = (
    ("gaussian", 1.5),
    ("gaussian", 3.0),
    ("disk", 1.5),
    ("disk", 3.0),
    ("astigmatic", 1.5),
    ("astigmatic", 3.0),
    ("tilted", 1.5),
    ("tilted", 3.0),
)
PROBE_ANISOTROPY = 2.0
PROBE_SIDE_PX = 512  # centre crop of each known-good tile: the weight, not the tile size, is measured
MAX_PROBE_TILES = 8  # a 20-tile calibration probes its first 8: 64 restorations bound the command's time
_DISK_SUPERSAMPLE = 8
_TILTED_LEVELS = 8  # uniformly blurred copies blended per pixel to render a tilted probe


@dataclass(frozen=True)
class BlendMeasurement:
    """The best model weight and every weight's mean PSNR (dB) over `probes` restored probe tiles."""

    model_weight: float
    psnr_db: dict[float, float]
    probes: int


def probe_kernel(family: str, sigma_px: float, angle_deg: float) -> np.ndarray:
    """A probe PSF (float32, odd sides, sums to 1): `disk` of radius 2 sigma (its second moment per axis
    is sigma^2), `gaussian`, or `astigmatic` (PROBE_ANISOTROPY, major axis at angle_deg)."""
    if family == "disk":
        radius = 2.0 * sigma_px
        half = math.ceil(radius)
        fine = (np.arange((2 * half + 1) * _DISK_SUPERSAMPLE) + 0.5) / _DISK_SUPERSAMPLE - half - 0.5
        inside = (fine[:, None] ** 2 + fine[None, :] ** 2 <= radius * radius).astype(np.float64)
        n = 2 * half + 1
        kernel = inside.reshape(n, _DISK_SUPERSAMPLE, n, _DISK_SUPERSAMPLE).sum(axis=(1, 3))
        return (kernel / kernel.sum()).astype(np.float32)
    anisotropy = PROBE_ANISOTROPY if family == "astigmatic" else 1.0
    return gaussian_psf(sigma_px, anisotropy, angle_deg)


def _filtered(unit: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return cv2.filter2D(unit, cv2.CV_32F, kernel, borderType=cv2.BORDER_REFLECT_101)


def _gaussian_at(unit: np.ndarray, sigma_px: float) -> np.ndarray:
    return unit if sigma_px == 0 else _filtered(unit, gaussian_psf(sigma_px))


def probe_blur(unit: np.ndarray, family: str, sigma_px: float, angle_deg: float) -> np.ndarray:
    """A float32 image blurred by a probe: `tilted` grows from sigma 0 at one edge to sigma_px at the far one
    along angle_deg (Gaussian-blurred copies blended per pixel), the others by probe_kernel."""
    if family != "tilted":
        return _filtered(unit, probe_kernel(family, sigma_px, angle_deg))
    return tilted_blur(unit, sigma_px, angle_deg, _TILTED_LEVELS, _gaussian_at)


def probe_tile(
    tile: np.ndarray, family: str, sigma_px: float, angle_deg: float, rng: np.random.Generator
) -> np.ndarray:
    """A known-good uint8/uint16 tile blurred by a probe (probe_blur), plus Gaussian noise at its own
    (Immerkaer) level, re-quantised: what the rig would acquire out of focus."""
    full = float(np.iinfo(tile.dtype).max)
    unit = tile.astype(np.float32) / full
    noise = float(patch_noise_sigma(unit[None])[0])
    blurred = probe_blur(unit, family, sigma_px, angle_deg)
    noisy = blurred + rng.normal(0.0, noise, size=unit.shape).astype(np.float32)
    return np.clip(np.rint(noisy * full), 0, full).astype(tile.dtype)


def measure_model_weight(
    restorer: TileRestorer,
    tiles: Sequence[np.ndarray],
    reference: SpectralReferenceArrays,
    own_noise_power: float,
    seed: int = 0,
    tile_references: Sequence[SpectralReferenceArrays | None] | None = None,
) -> BlendMeasurement | None:
    """The MODEL_WEIGHTS entry with the best mean PSNR on the probed known-good tiles (module docstring);
    None when the rig Wiener reads no tile (all narrower than the spectral window, or without structure).
    reference, own_noise_power: the rig's spectrum and noise power (RigRestoration); tile_references: per
    tile, the spectrum at its pixel size (RigCalibration.spectral_arrays) where they differ (None: skip it)."""
    rng = np.random.default_rng(seed)
    scores: dict[float, list[float]] = {w: [] for w in MODEL_WEIGHTS}
    for i, tile in enumerate(tiles[:MAX_PROBE_TILES]):
        tile_reference = reference if tile_references is None else tile_references[i]
        if tile_reference is None:
            continue
        truth = centre_crop(np.asarray(tile), PROBE_SIDE_PX)
        probes, assessments = [], []
        for family, sigma in PROBES:
            angle = float(rng.uniform(0.0, 180.0))
            probes.append(probe_tile(truth, family, sigma, angle, rng))
            anisotropy = PROBE_ANISOTROPY if family == "astigmatic" else 1.0
            assessments.append(BlurAssessment(0.5, "soft", sigma, anisotropy, angle))
        wieners = [rig_wiener(p, tile_reference, own_noise_power) for p in probes]
        read = [i for i, w in enumerate(wieners) if w is not None]
        if not read:
            continue
        models = restorer.restore([probes[i] for i in read], [assessments[i] for i in read])
        for i, model_output in zip(read, models, strict=True):
            wiener = wieners[i]
            assert wiener is not None
            for weight in MODEL_WEIGHTS:
                scores[weight].append(psnr_db(blend(model_output, wiener, weight), truth))
    count = len(scores[MODEL_WEIGHTS[0]])
    if count == 0:
        return None
    means = {w: float(np.mean(v)) for w, v in scores.items()}
    return BlendMeasurement(max(means, key=lambda w: means[w]), means, count)
