"""Classical focus metrics (numpy in, float out): the baselines the learned blur detector must beat.

All take a 2-D image (any real dtype; converted to float64 as is, so pass [0, 1] floats to compare
tiles of different bit depth). Higher = sharper for every metric here. Each is content dependent by
construction: blank resin or a smooth nucleus scores "blurred" however well focused it is.
"""

from __future__ import annotations

import cv2
import numpy as np


def _as_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"focus metric: expected a 2-D image, got shape {image.shape}")
    if min(image.shape) < 3:
        raise ValueError(f"focus metric: image {image.shape} too small; need at least 3x3 px")
    return image.astype(np.float64, copy=False)


def variance_of_laplacian(image: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian response (Pech-Pacheco et al. 2000); units: intensity^2 / px^4."""
    lap = cv2.Laplacian(_as_float(image), cv2.CV_64F, ksize=1, borderType=cv2.BORDER_REFLECT_101)
    return float(lap.var())


def brenner_gradient(image: np.ndarray) -> float:
    """Brenner focus measure: mean squared difference of pixels two apart, horizontal + vertical."""
    f = _as_float(image)
    dx = f[:, 2:] - f[:, :-2]
    dy = f[2:, :] - f[:-2, :]
    return float(np.mean(dx * dx) + np.mean(dy * dy))


def fft_highfreq_ratio(image: np.ndarray, cutoff: float = 0.25) -> float:
    """Share of (non-DC) spectral power above `cutoff` x Nyquist radius, Hann-windowed; in [0, 1]."""
    if not 0.0 < cutoff < 1.0:
        raise ValueError(f"fft_highfreq_ratio: cutoff={cutoff}; must be in (0, 1) of the Nyquist radius")
    f = _as_float(image)
    f = f - f.mean()
    window = np.outer(np.hanning(f.shape[0]), np.hanning(f.shape[1]))  # no edge leakage
    power = np.abs(np.fft.rfft2(f * window)) ** 2
    fy = np.fft.fftfreq(f.shape[0])[:, None]
    fx = np.fft.rfftfreq(f.shape[1])[None, :]
    radius = np.sqrt(fx * fx + fy * fy) / 0.5  # 1.0 = Nyquist
    total = float(power[radius > 0].sum())
    if total <= 0.0:
        return 0.0
    return float(power[radius > cutoff].sum() / total)


BASELINES = {
    "var_laplacian": variance_of_laplacian,
    "brenner": brenner_gradient,
    "fft_ratio": fft_highfreq_ratio,
}
