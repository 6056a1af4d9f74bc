"""PSF planes: the blur detector's estimate as constant/interpolated input planes of the deblur model.

Pure numpy, used by the runtime's tiled path (`appliance.restoration.restorer`); its torch twin
(`appliance/restoration/psf_planes_torch.py`, tested equal to it) builds the same planes on the device for the
whole-tile GPU path (`appliance.restoration.torch_backend`) and for training (`models/deblur/gpu_synth.py`). Plane order
(`PLANE_NAMES`), each float32 (H, W) over the tile:

- ``known``       1 where the detector gave an estimate, 0 on the blind path (then every plane is 0);
- ``sigma_tile``  the tile's major-axis sigma (`BlurAssessment.sigma_px`) / SIGMA_SCALE_PX, constant;
- ``sigma_local`` the 8x8 region map converted back to sigma (px) / SIGMA_SCALE_PX, bilinearly
                  interpolated between cell centres (spatially varying blur of tilted sections);
                  equals ``sigma_tile`` when there is no region map;
- ``astig_cos``, ``astig_sin``  log(anisotropy) * cos / sin of twice the major-axis angle: the
                  ellipticity as a vector that is continuous at 0 == 180 deg and 0 when isotropic.

The sigma scale keeps the planes near [0, 1.5] over the restorable range (sigma <= 3 px + error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from appliance.messages import SCORE_SCALE_PX, BlurAssessment, sigma_from_blur_score

PLANE_NAMES: tuple[str, ...] = ("known", "sigma_tile", "sigma_local", "astig_cos", "astig_sin")
PLANE_VERSION = 1  # bump when the meaning of a plane changes (the sidecar records it)
SIGMA_SCALE_PX = 3.0
# Region scores are blur_score_from_sigma (appliance.messages) rounded to 4 decimals, so 0.9999 (sigma
# ~14.8 px) is the largest readable; clamp to a blur we train on.
MAX_REGION_SIGMA_PX = 8.0
MAX_ANISOTROPY = 6.0


@dataclass(frozen=True)
class PsfEstimate:
    """What the planes encode: the detector's blur estimate for one tile.

    sigma_px: major-axis Gaussian-equivalent sigma (px); anisotropy: major / minor (>= 1);
    angle_deg: major-axis angle from +x towards +y; region_sigma_px: float32 (gh, gw) sigma per region
    cell over the tile (cells split the tile evenly), or None.
    """

    sigma_px: float
    anisotropy: float = 1.0
    angle_deg: float = 0.0
    region_sigma_px: np.ndarray | None = None


def region_sigma_from_scores(region_scores: list[list[float]]) -> np.ndarray | None:
    """Invert blur_score = tanh(sigma / 3 px) per cell: float32 (gh, gw) sigma (px), None if no map."""
    scores = np.asarray(region_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        return None
    scores = np.clip(scores, 0.0, math.tanh(MAX_REGION_SIGMA_PX / SCORE_SCALE_PX))
    return sigma_from_blur_score(scores).astype(np.float32)


def estimate_from_assessment(assessment: BlurAssessment | None) -> PsfEstimate | None:
    """The detector's verdict as a PsfEstimate; None (blind path) when it carries no usable sigma."""
    if assessment is None or not math.isfinite(assessment.sigma_px) or assessment.sigma_px < 0:
        return None
    return PsfEstimate(
        sigma_px=float(assessment.sigma_px),
        anisotropy=float(assessment.anisotropy),
        angle_deg=float(assessment.angle_deg),
        region_sigma_px=region_sigma_from_scores(assessment.region_scores),
    )


def interpolation_taps(grid: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps from `grid` cell centres to `length` pixel centres (half-pixel convention, edges
    clamped): (lower index int64 (length,), upper index, weight of the upper float32)."""
    position = (np.arange(length, dtype=np.float32) + np.float32(0.5)) * np.float32(grid / length)
    position = np.clip(position - np.float32(0.5), np.float32(0.0), np.float32(grid - 1))
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, grid - 1)
    return lower, upper, (position - lower).astype(np.float32)


def upsample_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (gh, gw) values at cell centres -> float32 (height, width), bilinear between centres."""
    grid = np.asarray(grid, dtype=np.float32)
    y0, y1, wy = interpolation_taps(grid.shape[0], height)
    x0, x1, wx = interpolation_taps(grid.shape[1], width)
    rows = grid[y0] * (1 - wy[:, None]) + grid[y1] * wy[:, None]  # (height, gw)
    return rows[:, x0] * (1 - wx[None, :]) + rows[:, x1] * wx[None, :]


def psf_planes(height: int, width: int, estimate: PsfEstimate | None) -> np.ndarray:
    """float32 (len(PLANE_NAMES), height, width) planes for one tile; all zero when estimate is None."""
    planes = np.zeros((len(PLANE_NAMES), height, width), dtype=np.float32)
    if estimate is None:
        return planes
    scale = np.float32(1.0 / SIGMA_SCALE_PX)
    ellipticity = math.log(min(max(estimate.anisotropy, 1.0), MAX_ANISOTROPY))
    double_angle = math.radians(2.0 * estimate.angle_deg)
    planes[0] = 1.0
    planes[1] = np.float32(estimate.sigma_px) * scale
    if estimate.region_sigma_px is None:
        planes[2] = planes[1]
    else:
        planes[2] = upsample_grid(estimate.region_sigma_px, height, width) * scale
    planes[3] = np.float32(ellipticity * math.cos(double_angle))
    planes[4] = np.float32(ellipticity * math.sin(double_angle))
    return planes
