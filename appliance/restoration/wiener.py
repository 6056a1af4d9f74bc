"""Wiener deconvolution given a PSF: the `classical` deblur backend (numpy in, numpy out, no I/O).

Also the benchmark's oracle baseline (bench/deblur_eval.py; Richardson–Lucy lives in bench/deconvolution.py).
Images are 2-D float32 arrays in [0, 1] (H, W); PSFs are 2-D float arrays with odd sides that sum to 1.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from appliance.noise import image_noise_sigma

# Truncate Gaussian PSFs at this many sigmas: beyond it the weight is < 1e-4 of the peak.
PSF_TRUNCATE_SIGMAS = 3.5
# Below this sigma (px) a Gaussian PSF is narrower than a pixel: deconvolving it only amplifies noise.
MIN_DECONV_SIGMA_PX = 0.3


def gaussian_psf(sigma_px: float, anisotropy: float = 1.0, angle_deg: float = 0.0) -> np.ndarray:
    """Elliptical Gaussian PSF from a blur estimate; float32 (K, K), K odd, sums to 1.

    sigma_px: sigma along the major axis (px); anisotropy: sigma_major / sigma_minor (>= 1);
    angle_deg: direction of the major axis in image axes (x to the right, y down), measured from +x
    towards +y: the convention of `BlurAssessment.angle_deg` and of `models/blur_synth.py`.
    """
    if not (math.isfinite(sigma_px) and sigma_px > 0):
        raise ValueError(f"sigma_px must be a positive finite number of pixels, got {sigma_px}")
    if not (math.isfinite(anisotropy) and anisotropy >= 1.0):
        raise ValueError(f"anisotropy must be >= 1 (sigma_major / sigma_minor), got {anisotropy}")
    sigma_major = float(sigma_px)
    sigma_minor = sigma_major / float(anisotropy)
    radius = max(1, math.ceil(PSF_TRUNCATE_SIGMAS * sigma_major))
    coords = np.arange(-radius, radius + 1, dtype=np.float64)
    x, y = np.meshgrid(coords, coords)  # y grows with the row index (down)
    theta = math.radians(angle_deg)
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    psf = np.exp(-0.5 * ((u / sigma_major) ** 2 + (v / sigma_minor) ** 2))
    return (psf / psf.sum()).astype(np.float32)


def check_inputs(image: np.ndarray, psf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise ValueError(f"psf must be 2-D with odd sides, got shape {psf.shape}")
    psf = np.asarray(psf, dtype=np.float64)
    total = psf.sum()
    if not (total > 0 and np.all(psf >= 0)):
        raise ValueError("psf must be non-negative with a positive sum")
    return np.asarray(image, dtype=np.float32), psf / total


def _psf_to_otf(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Real FFT of `psf` centred at the origin of an array of `shape` (no phase shift)."""
    padded = np.zeros(shape, dtype=np.float64)
    kh, kw = psf.shape
    padded[:kh, :kw] = psf
    padded = np.roll(padded, (-(kh // 2), -(kw // 2)), axis=(0, 1))
    return np.fft.rfft2(padded)


def _pad_for_fft(image: np.ndarray, psf: np.ndarray) -> tuple[np.ndarray, int, int]:
    # Reflect-pad by the PSF extent so the FFT's periodic wrap-around does not ring at the tile edges.
    pad_y, pad_x = 2 * psf.shape[0], 2 * psf.shape[1]
    pad_y, pad_x = min(pad_y, image.shape[0] - 1), min(pad_x, image.shape[1] - 1)
    padded = cv2.copyMakeBorder(image, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_REFLECT_101)
    return padded, pad_y, pad_x


def _gradient_power(shape: tuple[int, int]) -> np.ndarray:
    """|D(f)|^2 of the finite-difference gradient on the rfft2 grid of `shape`: 0 at DC, up to 8."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return 4.0 * np.sin(np.pi * fy) ** 2 + 4.0 * np.sin(np.pi * fx) ** 2


def wiener_deconvolve(image: np.ndarray, psf: np.ndarray, nsr: float) -> np.ndarray:
    """Wiener deconvolution assuming a 1/|f|^2 signal spectrum; `nsr` (> 0) scales the noise term.

    A flat noise-to-signal ratio would also damp the DC term and darken the tile; with the natural-image
    1/|f|^2 prior the regulariser is nsr * |gradient(f)|^2, zero at DC, strongest at high frequencies.
    image: float32 (H, W), any range; returns float32 (H, W), not clipped.
    """
    if not nsr > 0:
        raise ValueError(f"nsr must be > 0, got {nsr}")
    image, psf = check_inputs(image, psf)
    padded, pad_y, pad_x = _pad_for_fft(image, psf)
    otf = _psf_to_otf(psf, padded.shape)
    spectrum = np.fft.rfft2(padded.astype(np.float64))
    regulariser = nsr * _gradient_power(padded.shape)
    restored = np.fft.irfft2(spectrum * np.conj(otf) / (np.abs(otf) ** 2 + regulariser), s=padded.shape)
    return restored[pad_y : pad_y + image.shape[0], pad_x : pad_x + image.shape[1]].astype(np.float32)


def auto_nsr(image: np.ndarray) -> float:
    """`nsr` for `wiener_deconvolve` from the image itself (float, clamped to [1e-4, 1]).

    Ratio of the estimated noise variance to the image variance, times 0.4: the factor that was best
    on average on ISBI tiles blurred with sigma 1-3 px at two noise levels (hand sweep, 2026-11).
    """
    noise_var = image_noise_sigma(image) ** 2
    signal_var = max(float(np.var(image)), 1e-8)
    return float(np.clip(0.4 * noise_var / signal_var, 1e-4, 1.0))
