"""Small operations on 2-D pixel arrays that the runtime, the benchmarks and training share (numpy).

One copy: the rig blend's measurement (appliance.restoration.rig_blend) and the benches that report it must
crop and score alike.
"""

from __future__ import annotations

import math

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
