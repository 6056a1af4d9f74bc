"""Astigmatism of the blur: anisotropy and major-axis angle from the gradient structure tensor.

Patch-wise (numpy in, numpy out), backend independent. Over many patches of EM neuropil the content
has no preferred direction, so a direction in which gradients are weak is the PSF's major axis.
For content with a 1/f^2 power spectrum and a Gaussian PSF, the ratio of the tensor's eigenvalues is
r = sqrt((s_major^2 + c^2) / (s_minor^2 + c^2)), c^2 = the image's own blur plus the pre-smoothing;
with s_major * s_minor = s_geo^2 (the sigma a blur estimator reads for an elliptical PSF) this gives the
anisotropy a = s_major / s_minor in closed form (`anisotropy_from_ratio`).
"""

from __future__ import annotations

import math

import numpy as np

from appliance.noise import correlate_valid, patch_noise_sigma

_PRESMOOTH = 0.8  # px, tames noise before differentiation
# c^2 of the model above comes from the detector's sidecar (`intrinsic_c2`, fitted by
# models/detector/calibrate.py on the val split).
# Eigenvalue ratios this close to 1 are content texture, not astigmatism.
ISOTROPIC_BELOW = 1.2
# Beyond the trained/synthesised range (1.5-4) an estimate is a flat patch's noise, not a PSF.
MAX_ANISOTROPY = 6.0


def _gauss_taps(sigma: float) -> np.ndarray:
    x = np.arange(-3, 4, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


_SMOOTH = _gauss_taps(_PRESMOOTH)


_SOBEL_SMOOTH = np.array([1, 2, 1], np.float32)
_SOBEL_DIFF = np.array([-1, 0, 1], np.float32)


def _gradients(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    smooth = correlate_valid(correlate_valid(stack, _SMOOTH, 1), _SMOOTH, 2)
    gx = correlate_valid(correlate_valid(smooth, _SOBEL_SMOOTH, 1), _SOBEL_DIFF, 2)
    gy = correlate_valid(correlate_valid(smooth, _SOBEL_DIFF, 1), _SOBEL_SMOOTH, 2)
    return gx, gy


def _noise_gain() -> float:
    """Energy of gx for unit white noise: the sum of squares of the operator's impulse response."""
    delta = np.zeros((1, 21, 21), np.float32)
    delta[0, 10, 10] = 1.0
    return float((_gradients(delta)[0] ** 2).sum())


_NOISE_GAIN = _noise_gain()


def structure_tensors(patches: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """Per patch the trace-normalised, noise-corrected mean structure tensor [Jxx, Jyy, Jxy]: (N, 3).

    patches: float32 (N, H, W), H, W >= 16; noise: their appliance.noise.patch_noise_sigma when the caller
    has it already. Rows are zero where the patch has no gradient energy above the noise (signal gradient
    energy below the noise's: too little structure to show a direction).
    """
    stack = np.asarray(patches, np.float32)
    noise = patch_noise_sigma(stack) if noise is None else noise
    noise_energy = noise.astype(np.float64) ** 2 * _NOISE_GAIN
    gx, gy = _gradients(stack)
    # White noise adds the same energy to both directions: remove it, keep the PSF's signature.
    jxx = (gx * gx).mean(axis=(1, 2)) - noise_energy
    jyy = (gy * gy).mean(axis=(1, 2)) - noise_energy
    jxy = (gx * gy).mean(axis=(1, 2)).astype(np.float64)
    trace = jxx + jyy
    out = np.stack([jxx, jyy, jxy], axis=1) / np.where(trace > 0, trace, 1.0)[:, None]
    out[trace <= 2.0 * noise_energy] = 0.0
    return out


def anisotropy_from_ratio(ratio: float, sigma_geo: float, c2: float) -> float:
    """Solve r^2 (s^2 / a + c^2) = s^2 a + c^2 for a >= 1 (s = geometric-mean sigma, c2 = c^2, px)."""
    if ratio < ISOTROPIC_BELOW or sigma_geo <= 0.0:
        return 1.0
    s2, r2 = sigma_geo * sigma_geo, ratio * ratio
    b = c2 * (1.0 - r2)
    a = (-b + math.sqrt(b * b + 4.0 * s2 * s2 * r2)) / (2.0 * s2)
    return min(max(a, 1.0), MAX_ANISOTROPY)


def psf_shape(tensors: np.ndarray, weights: np.ndarray, sigma_geo: float, c2: float) -> tuple[float, float]:
    """Tile anisotropy (>= 1) and major-axis angle (deg in [0, 180), from +x towards +y); c2: px^2 (sidecar)."""
    if weights.sum() <= 0:
        return 1.0, 0.0
    jxx, jyy, jxy = (weights[:, None] * tensors).sum(axis=0) / weights.sum()
    half = math.hypot((jxx - jyy) / 2.0, jxy)
    big, small = (jxx + jyy) / 2.0 + half, (jxx + jyy) / 2.0 - half
    if small <= 0:
        return 1.0, 0.0
    anisotropy = anisotropy_from_ratio(big / small, sigma_geo, c2)
    if anisotropy == 1.0:
        return 1.0, 0.0
    # Strongest gradients run across the PSF's minor axis; the major axis is perpendicular.
    strong = 0.5 * math.degrees(math.atan2(2.0 * jxy, jxx - jyy))
    return anisotropy, (strong + 90.0) % 180.0
