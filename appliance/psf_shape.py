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

import cv2
import numpy as np

_PRESMOOTH = 0.8  # px, tames noise before differentiation
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
# c^2 of the model above, fitted on the val split (models/detector/calibrate.py prints the fit).
INTRINSIC_C2 = 1.0
# Eigenvalue ratios this close to 1 are content texture, not astigmatism.
ISOTROPIC_BELOW = 1.2


def _noise_gain() -> float:
    delta = np.zeros((21, 21), np.float32)
    delta[10, 10] = 1.0
    response = cv2.Sobel(cv2.GaussianBlur(delta, (0, 0), _PRESMOOTH), cv2.CV_32F, 1, 0, ksize=3)
    return float((response**2).sum())


_NOISE_GAIN = _noise_gain()


def structure_tensors(patches: np.ndarray) -> np.ndarray:
    """Per patch the trace-normalised, noise-corrected mean structure tensor [Jxx, Jyy, Jxy]: (N, 3).

    patches: float32 (N, H, W). Rows are zero where the patch has no gradient energy above the noise.
    """
    out = np.zeros((len(patches), 3))
    for k, patch in enumerate(patches):
        noise = float(np.abs(cv2.filter2D(patch, cv2.CV_32F, _IMMERKAER)[1:-1, 1:-1]).mean())
        noise_energy = (noise * math.sqrt(math.pi / 2) / 6) ** 2 * _NOISE_GAIN
        smooth = cv2.GaussianBlur(patch, (0, 0), _PRESMOOTH)
        gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
        # White noise adds the same energy to both directions: remove it, keep the PSF's signature.
        j = np.array([(gx * gx).mean() - noise_energy, (gy * gy).mean() - noise_energy, (gx * gy).mean()])
        trace = j[0] + j[1]
        if trace > 0:
            out[k] = j / trace
    return out


def anisotropy_from_ratio(ratio: float, sigma_geo: float, c2: float | None = None) -> float:
    """Solve r^2 (s^2 / a + c^2) = s^2 a + c^2 for a >= 1 (s = geometric-mean sigma, px)."""
    if ratio < ISOTROPIC_BELOW or sigma_geo <= 0.0:
        return 1.0
    c2 = INTRINSIC_C2 if c2 is None else c2
    s2, r2 = sigma_geo * sigma_geo, ratio * ratio
    b = c2 * (1.0 - r2)
    a = (-b + math.sqrt(b * b + 4.0 * s2 * s2 * r2)) / (2.0 * s2)
    return max(a, 1.0)


def psf_shape(tensors: np.ndarray, weights: np.ndarray, sigma_geo: float) -> tuple[float, float]:
    """Tile anisotropy (>= 1) and major-axis angle (deg in [0, 180), from +x towards +y)."""
    if weights.sum() <= 0:
        return 1.0, 0.0
    jxx, jyy, jxy = (weights[:, None] * tensors).sum(axis=0) / weights.sum()
    half = math.hypot((jxx - jyy) / 2.0, jxy)
    big, small = (jxx + jyy) / 2.0 + half, (jxx + jyy) / 2.0 - half
    if small <= 0:
        return 1.0, 0.0
    anisotropy = anisotropy_from_ratio(big / small, sigma_geo)
    if anisotropy == 1.0:
        return 1.0, 0.0
    # Strongest gradients run across the PSF's minor axis; the major axis is perpendicular.
    strong = 0.5 * math.degrees(math.atan2(2.0 * jxy, jxx - jyy))
    return anisotropy, (strong + 90.0) % 180.0
