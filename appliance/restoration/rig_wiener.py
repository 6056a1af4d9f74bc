"""Restoration against the rig's own in-focus spectrum: a Wiener filter a rig calibration makes possible.

A blind model has to guess both the blur and what the specimen looked like in focus. A calibrated rig knows
the second: its in-focus power spectrum S(f) (appliance.spectral, from the known-good tiles), and a soft
tile's spectrum against it gives the PSF that was added (`fit_added_psf`: an elliptical Gaussian, or a
uniform disk where that fits better). With both, the minimum-mean-square-error linear restoration is

    X(f) = H*(f) S(f) / (|H(f)|^2 S(f) + N) . Y(f)

with N the tile's white noise power (Immerkaer) and S scaled by the fit's contrast (`rig_wiener` adds the
rig's own noise to S and follows the fit where the tile is sharper than the rig's typical tile). Given the
true PSF it came within 0.3 dB of the best Wiener/Richardson-Lucy oracle in every cell of six of the eight
em-corpus sources (prototype, 2026-11-27); given the fitted one it is the better restorer on some rigs and the
learned model on others, so the output is a blend whose weight a rig calibration measures on the rig's own
tiles (appliance.restoration.rig_blend). Nothing here is learned from other instruments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from appliance import spectral
from appliance.restoration.packed_dft import filter_by_real_gain
from appliance.spectral import SpectralReferenceArrays

# Reflect padding (px) so the FFT's wrap-around does not ring at the tile edges. The inverse of a disk rings
# far beyond its support: on the em-corpus 32 px lost up to 1.9 dB against 50 px, and 64 and 128 px gained a
# little more (prototype, 2026-11-27).
PAD_PX = 128


@dataclass(frozen=True)
class RigRestoration:
    """What a rig calibration gives the restorer; it travels with each soft tile (replicas are shared).

    reference: the rig's in-focus spectrum (RigCalibration.spectral_arrays); model_weight: the learned
    model's share of the output (1 - model_weight is the rig Wiener's), measured on the rig's known-good
    tiles; deblur_model: the model version that weight was measured with (another model gets none);
    own_noise_power: the rig's in-focus noise power (unit grey^2; the calibration's noise level squared).
    """

    reference: SpectralReferenceArrays
    model_weight: float
    deblur_model: str
    own_noise_power: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.model_weight <= 1.0:
            raise ValueError(f"model_weight must be in [0, 1], got {self.model_weight}")


def rig_signal_power(shape: tuple[int, int], reference: SpectralReferenceArrays) -> np.ndarray:
    """The rig's in-focus signal power (unit grey^2 per frequency, as spectral bins it) on the rfft2 grid of
    `shape` (float32, read-only: shared by every tile of that shape and reference).

    Bins the reference cannot vouch for (too few known-good tiles with signal there) take their ring's mean;
    rings with none, and frequencies outside F_MIN..F_MAX, a power law fitted to the ring means (natural
    images fall off as a power of |f|).
    """
    log_power, usable = reference
    # The reference as bytes (~1 KB) keys the cache: arrays are not hashable.
    return _rig_signal_power(
        (int(shape[0]), int(shape[1])),
        np.asarray(log_power, np.float64).tobytes(),
        np.asarray(usable, bool).tobytes(),
    )


# A rig's tiles share one shape and one reference; building this grid took 0.08 of the 0.40 s per 2400 px tile.
@lru_cache(maxsize=2)
def _rig_signal_power(shape: tuple[int, int], log_power_bytes: bytes, usable_bytes: bytes) -> np.ndarray:
    log_power = np.frombuffer(log_power_bytes, np.float64)
    usable = np.frombuffer(usable_bytes, bool)
    grid = np.where(usable, log_power, np.nan).reshape(spectral.RADIAL_BINS, spectral.ANGULAR_BINS)
    has = np.isfinite(grid).any(axis=1)
    if not has.any():
        raise ValueError("rig_signal_power: the reference has no usable bin")
    rings = np.full(spectral.RADIAL_BINS, np.nan)
    rings[has] = np.nanmean(grid[has], axis=1)
    centres = spectral.F_MIN + (np.arange(spectral.RADIAL_BINS) + 0.5) * (spectral.F_MAX - spectral.F_MIN) / (
        spectral.RADIAL_BINS
    )
    if has.sum() >= 2:
        slope, intercept = np.polyfit(np.log(centres[has]), rings[has], 1)
    else:
        slope, intercept = 0.0, float(rings[has][0])
    filled = np.where(has, rings, intercept + slope * np.log(centres))
    grid = np.where(np.isfinite(grid), grid, filled[:, None])

    bin_index, log_radius = _polar_grid(shape)
    inside = bin_index >= 0
    log_s = np.where(inside, grid.ravel()[np.maximum(bin_index, 0)], intercept + slope * log_radius)
    power = np.exp(log_s).astype(np.float32)
    power.flags.writeable = False  # shared by every call of that shape and reference
    return power


@lru_cache(maxsize=2)
def _polar_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per rfft2 coefficient of `shape`: its spectral bin (-1 outside F_MIN..F_MAX; int16) and log |f| (float32).

    A rig's tiles share one shape, and building the map took 0.15 of the 0.53 s per 2400 px tile (~20 MB kept).
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    fy, fx = np.broadcast_arrays(fy, fx)
    r, a = spectral.polar_bins(fx, fy)  # float64, as spectral bins a window: float32 moves bin edges
    inside = (r >= 0) & (r < spectral.RADIAL_BINS)
    bin_index = np.where(inside, r * spectral.ANGULAR_BINS + a, -1).astype(np.int16)
    log_radius = np.log(np.maximum(np.hypot(fx, fy), 1.0 / max(shape))).astype(np.float32)
    bin_index.flags.writeable = log_radius.flags.writeable = False  # shared by every call of that shape
    return bin_index, log_radius


@lru_cache(maxsize=2)
def _frequency_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(fy, fx) in cycles/px on the rfft2 grid of `shape`, float32, full arrays (read-only, shared)."""
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    fy, fx = (np.ascontiguousarray(g) for g in np.broadcast_arrays(fy, fx))
    fy.flags.writeable = fx.flags.writeable = False
    return fy, fx


def rig_wiener(
    pixels: np.ndarray, reference: SpectralReferenceArrays, own_noise_power: float = 0.0
) -> np.ndarray | None:
    """Restore a 2-D uint8/uint16 tile against the rig's spectrum: float32 (H, W) on the unit scale (the
    dtype's full range is 1; not clipped). None when the tile has no spectral reading (a side below
    spectral.WINDOW_PX, or too little structure above its noise).

    own_noise_power: the rig's own in-focus noise, counted as part of the look to restore: the target is
    the tile as the rig acquires it in focus, noise included, not a denoised one (an in-focus tile sent
    anyway then keeps its texture; on the em-corpus in-focus tiles gained 0.1-0.6 dB more on 6 of 8
    sources, blurred ones lost at most 0.1 dB; prototype, 2026-11-27). The signal spectrum also follows the
    fit where the tile is sharper than the rig's typical one (AddedPsf.sharper_px2, bounded).
    OpenCV and numpy release the GIL: TileRestorer runs a batch's tiles on the replica's threads.
    """
    pixels = np.asarray(pixels)
    spectra = spectral.window_spectra(pixels)
    if spectra is None:
        return None
    psf = spectral.fit_added_psf(spectra, *reference)
    if psf is None:
        return None
    unit = pixels.astype(np.float32) / float(np.iinfo(pixels.dtype).max)
    pad_y, pad_x = (min(PAD_PX, side - 1) for side in unit.shape)
    # Pad the far sides up to a size the FFT factors well: 2400 + 2 x 128 = 2656 = 32 x 83 took 0.34 s of
    # the 0.65 s per tile here, a smooth size is several times faster.
    (h, w), extra = unit.shape, []
    for side, pad in ((h, pad_y), (w, pad_x)):
        extra.append(min(cv2.getOptimalDFTSize(side + 2 * pad) - side - 2 * pad, side - 1 - pad))
    padded: np.ndarray = cv2.copyMakeBorder(
        unit, pad_y, pad_y + extra[0], pad_x, pad_x + extra[1], cv2.BORDER_REFLECT_101
    )
    mean = np.float32(padded.mean())
    padded -= mean
    fy, fx = _frequency_grid(padded.shape)
    # The filter in float32 too, in place: within 4e-6 (unit scale) of the float64 one on ISBI tiles, and a
    # 2400 px tile took 0.24 s instead of 0.42 (Gaussian), 0.30 instead of 0.45 (disk) on this 2-core CPU;
    # with OpenCV's DFTs 0.15 and 0.20 s (bench/rig_wiener_speed.py).
    transfer = np.asarray(psf.transfer(fx, fy), dtype=np.float32)
    signal = rig_signal_power(padded.shape, reference) * np.float32(math.exp(psf.log_contrast))
    if any(psf.sharper_px2):
        signal = signal * psf.signal_tilt(fx, fy).astype(np.float32)
    signal += np.float32(own_noise_power)
    noise = np.float32(max(float(spectra.noise.mean()), 1e-12))
    gain = transfer * signal
    gain /= transfer * gain + noise
    restored = filter_by_real_gain(padded, gain)  # OpenCV's real DFT pair: ~3x faster than numpy's (packed_dft.py)
    restored += mean
    return restored[pad_y : pad_y + unit.shape[0], pad_x : pad_x + unit.shape[1]].astype(np.float32)


def blend(model_output: np.ndarray, wiener_unit: np.ndarray, model_weight: float) -> np.ndarray:
    """model_weight x the model's restored tile (uint8/uint16) + the rest x the rig Wiener's (unit scale),
    rounded to the model output's dtype."""
    full = float(np.iinfo(model_output.dtype).max)
    mixed = model_weight * model_output.astype(np.float32) + (1.0 - model_weight) * full * wiener_unit
    return np.clip(np.rint(mixed), 0, full).astype(model_output.dtype)
