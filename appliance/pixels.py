"""Small operations on 2-D pixel arrays that the runtime, the benchmarks and training share (numpy).

One copy: the rig blend's measurement (appliance.restoration.rig_blend) and the benches that report it must
crop and score alike, and its tilted probes are rendered as the training data's tilted blur is
(models/blur_synth.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def centre_crop(pixels: np.ndarray, side: int) -> np.ndarray:
    """The central at most side x side px of a 2-D image, contiguous (unchanged in size if already smaller)."""
    h, w = pixels.shape
    top, left = max((h - side) // 2, 0), max((w - side) // 2, 0)
    return np.ascontiguousarray(pixels[top : top + side, left : left + side])


def psnr_db(image: np.ndarray, truth: np.ndarray, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio (dB) of `image` against `truth`; peak defaults to the full range of an integer
    truth's dtype (255 for uint8) and must be given for a float one. inf when they are equal."""
    if peak is None:
        if not np.issubdtype(truth.dtype, np.integer):
            raise ValueError(f"psnr_db: give the peak for a {truth.dtype} truth")
        peak = float(np.iinfo(truth.dtype).max)
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(truth, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def tilted_sigma_map(shape: tuple[int, int], sigma_px: float, angle_deg: float) -> np.ndarray:
    """Per-pixel blur sigma (px) of a tilted blur: 0 at the sharp edge/corner, sigma_px at the far one."""
    h, w = shape
    theta = math.radians(angle_deg)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    proj = math.cos(theta) * xs + math.sin(theta) * ys
    corners = [math.cos(theta) * x + math.sin(theta) * y for x in (0, w - 1) for y in (0, h - 1)]
    lo, hi = min(corners), max(corners)
    return (np.clip((proj - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * sigma_px).astype(np.float32)


def tilted_blur(
    image: np.ndarray,
    sigma_px: float,
    angle_deg: float,
    levels: int,
    blur_at: Callable[[np.ndarray, float], np.ndarray],
) -> np.ndarray:
    """A float32 (H, W) image under a tilted blur (a non-flat field of view): `levels` copies uniformly blurred
    at sigma 0..sigma_px by blur_at(image, sigma), blended per pixel by linear interpolation along
    tilted_sigma_map."""
    sigma_map = tilted_sigma_map(image.shape, sigma_px, angle_deg)
    grid = np.linspace(0.0, sigma_px, levels)
    step = grid[1] - grid[0] if sigma_px > 0 else 1.0
    position = sigma_map / step  # fractional index into the stack of blurred copies
    out = np.zeros_like(image)
    for k, level in enumerate(grid):
        weight = np.clip(1.0 - np.abs(position - k), 0.0, 1.0)
        if weight.any():
            out += weight * blur_at(image, float(level))
    return out
