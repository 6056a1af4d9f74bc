"""Blur added to a rig's in-focus look, read from the power spectrum against the rig's own (numpy).

The learned detector reads blur from the content of 64 px patches; on an instrument it never saw, its
reading of an in-focus tile depends on that instrument's noise, pixel size and texture, and no offset
removes the tile-to-tile spread (models/detector/MODEL_CARD.md, "Per EM source"). A rig calibration
holds 5-20 known-good tiles of the rig, and with them the rig's in-focus power spectrum. Defocus
multiplies a tile's spectrum by |H(f)|^2 of the PSF; for a Gaussian PSF of covariance S (px^2),
log|H(f)|^2 = -4 pi^2 f'Sf, and for any PSF that is its leading term (f in cycles/px). So

    log(P_tile(f) - N) - log(P_rig(f)) = c - 4 pi^2 (a fx^2 + 2 b fx fy + e fy^2)

where N is the tile's (white) noise power and c absorbs contrast and the tissue fraction. A weighted
least-squares fit over the frequency bins where the tile's signal stands above its noise gives S, the
blur *added* to the rig's: sigma_px = sqrt of S's largest eigenvalue (the major axis, as BlurParams
defines it), the anisotropy and angle from its eigenvectors. Nothing is learned from other instruments:
the rig's own tiles are the reference.

Windows: up to MAX_WINDOWS_PER_SIDE^2 Hann-windowed WINDOW_PX squares spread evenly over the tile, the
periodogram binned in polar bins (RADIAL_BINS x ANGULAR_BINS, F_MIN..F_MAX cycles/px). The whole tile
is the mean of its windows; each quadrant (tiles with >= 2 windows per side) is the mean of its own, and
the reading is the largest of the whole and the quadrants, so blur that grows across the tile (a tilted
section) is read where it is worst.

Pixel size: the specimen and the in-focus PSF are fixed in nm, so a tile of another pixel size than the
reference's is read against the reference with its frequency axis rescaled (reference_at_scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

import cv2
import numpy as np

from appliance.noise import patch_noise_sigma

WINDOW_PX = 128
MAX_WINDOWS_PER_SIDE = 4  # 16 windows: the bench tiles (<= 512 px) never had more; the FFT dominates the cost
RADIAL_BINS = 16
ANGULAR_BINS = 8
BINS = RADIAL_BINS * ANGULAR_BINS
F_MIN, F_MAX = 0.02, 0.5  # cycles/px: below F_MIN lie gain shading and charging, not focus
SNR_MIN = 2.0  # a bin is used where power >= SNR_MIN x the noise power, in the tile and in the reference
MIN_BINS = 6  # fewer usable bins than this: no reading (too little structure above the noise)
# A quadrant is read only when its signal power in the lowest radial bin (0.02-0.05 cycles/px, which blur of
# 3 px keeps to ~2/3) is at least this share of the whole tile's: a quadrant of resin or flat fill beyond a
# section edge has little, and its fit on the few bins left is not a blur reading.
QUADRANT_MIN_SIGNAL_SHARE = 0.25
_FOUR_PI2 = 4.0 * math.pi**2

# A rig's in-focus spectrum as the detector takes it: (log signal power, usable) per bin, shapes (BINS,).
SpectralReferenceArrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class WindowSpectra:
    """Binned power spectra of a tile's windows.

    power: (n_windows, BINS) mean periodogram per polar bin (unit grey^2, Hann-normalised, so white noise
    of std s reads s^2). noise: (n_windows,) the window's Immerkaer noise power s^2. quadrant: (n_windows,)
    0-3 (row-major) or -1 when the tile is too small for quadrants.
    """

    power: np.ndarray
    noise: np.ndarray
    quadrant: np.ndarray


@dataclass(frozen=True)
class SpectralReading:
    """Blur added to the rig's in-focus look (px): the worst of the whole tile and its quadrants.

    sigma_px: major-axis sigma; anisotropy: major / minor (1 when the minor is ~0 or isotropic);
    angle_deg: major axis from +x towards +y in [0, 180); where: "tile" or "quadrant r,c";
    isotropic_px: the whole tile's isotropic equivalent, sign(t) sqrt(|t|) with t the mean of the two axes'
    variances: negative when the tile is *sharper* than the reference (calibration's consistency check).
    """

    sigma_px: float
    anisotropy: float
    angle_deg: float
    where: str
    isotropic_px: float


def polar_bins(fx: np.ndarray, fy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(radial, angular) bin of each frequency (cycles/px); radial < 0 below F_MIN, >= RADIAL_BINS from F_MAX."""
    radius = np.hypot(fx, fy)
    angle = np.mod(np.arctan2(fy, fx), np.pi)
    r = np.floor((radius - F_MIN) / (F_MAX - F_MIN) * RADIAL_BINS).astype(np.int64)
    a = np.minimum((angle / np.pi * ANGULAR_BINS).astype(np.int64), ANGULAR_BINS - 1)
    return r, a


@cache
def _window_frequencies() -> tuple[np.ndarray, np.ndarray]:
    """(fx, fy) in cycles/px of every rfft2 coefficient of a WINDOW_PX window, shape (WINDOW_PX, WINDOW_PX//2+1)."""
    fy = np.fft.fftfreq(WINDOW_PX)[:, None]
    fx = np.fft.rfftfreq(WINDOW_PX)[None, :]
    fx, fy = np.broadcast_arrays(fx, fy)
    return fx, fy


@cache
def _bin_geometry() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bin index of every rfft2 coefficient of a WINDOW_PX window, bin counts, mean fx^2, fy^2, fx fy, Hann."""
    fx, fy = _window_frequencies()
    r, a = polar_bins(fx, fy)
    index = np.where((r >= 0) & (r < RADIAL_BINS), r * ANGULAR_BINS + a, BINS).ravel()
    count = np.bincount(index, minlength=BINS + 1)[:BINS].astype(np.float64)

    def mean_of(values: np.ndarray) -> np.ndarray:
        return np.bincount(index, values.ravel(), BINS + 1)[:BINS] / np.maximum(count, 1)

    hann = np.outer(np.hanning(WINDOW_PX), np.hanning(WINDOW_PX)).astype(np.float32)
    return index, count, mean_of(fx * fx), mean_of(fy * fy), mean_of(fx * fy), hann


@dataclass(frozen=True)
class _Binning:
    """Per-bin sums by one gather and np.add.reduceat: coefficients sorted by bin (gather), each bin's first
    position among them (starts, clipped; a bin without coefficients is masked by count), Hann window."""

    gather: np.ndarray
    starts: np.ndarray
    count: np.ndarray
    hann: np.ndarray
    hann_power: float


@cache
def _binning() -> _Binning:
    index, count, *_, hann = _bin_geometry()
    gather = np.flatnonzero(index < BINS)
    gather = gather[np.argsort(index[gather], kind="stable")]
    starts = np.minimum(np.searchsorted(index[gather], np.arange(BINS)), len(gather) - 1)
    return _Binning(gather, starts, count, hann, float((hann.astype(np.float64) ** 2).sum()))


def _starts(length: int) -> np.ndarray:
    """Evenly spread window origins along one axis (at most MAX_WINDOWS_PER_SIDE, non-overlapping if room)."""
    n = min(MAX_WINDOWS_PER_SIDE, length // WINDOW_PX)
    return np.linspace(0, length - WINDOW_PX, n).round().astype(int)


def _power_spectra(windows: np.ndarray) -> np.ndarray:
    """|rfft2|^2 of each float32 window (n, W, W) -> (n, W, W // 2 + 1), numpy's rfft2 layout.

    OpenCV's DFT: ~6x faster here than numpy's on 128 px float32 windows (the spectral reading runs on
    every judged tile of a calibrated rig, next to the model).
    """
    half = WINDOW_PX // 2 + 1
    out = np.empty((len(windows), WINDOW_PX, half), np.float32)
    for i, window in enumerate(windows):
        spectrum = cv2.dft(window, flags=cv2.DFT_COMPLEX_OUTPUT)[:, :half]
        out[i] = spectrum[..., 0] ** 2 + spectrum[..., 1] ** 2
    return out


def window_spectra(tile: np.ndarray) -> WindowSpectra | None:
    """Binned spectra of a 2-D uint8/uint16 tile's windows; None when a side is below WINDOW_PX."""
    tile = np.asarray(tile)
    h, w = tile.shape
    if min(h, w) < WINDOW_PX:
        return None
    ys, xs = _starts(h), _starts(w)
    power, noise = _binned_spectra(tile, [(y, x) for y in ys for x in xs])
    if len(ys) >= 2 and len(xs) >= 2:
        quadrant = np.array([2 * int(y >= (h - WINDOW_PX) / 2) + int(x >= (w - WINDOW_PX) / 2) for y in ys for x in xs])
    else:
        quadrant = np.full(len(power), -1)
    return WindowSpectra(power, noise, quadrant)


def _binned_spectra(tile: np.ndarray, origins: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(power (n, BINS), noise power (n,)) of the WINDOW_PX windows of a uint8/uint16 tile at `origins` (y, x)."""
    raw = np.stack([tile[y : y + WINDOW_PX, x : x + WINDOW_PX] for y, x in origins])
    windows = raw.astype(np.float32) / float(np.iinfo(tile.dtype).max)
    noise = patch_noise_sigma(windows).astype(np.float64) ** 2
    binning = _binning()
    centred = (windows - windows.mean(axis=(1, 2), keepdims=True)) * binning.hann
    periodogram = _power_spectra(centred) / binning.hann_power
    # rfft2 keeps fx >= 0 only; columns 1..N/2-1 stand for their mirror too, which has the same power
    # and the same bin, so the per-bin mean is unchanged.
    sums = np.add.reduceat(periodogram.reshape(len(windows), -1)[:, binning.gather], binning.starts, axis=1)
    power = np.where(binning.count > 0, sums, 0.0).astype(np.float64) / np.maximum(binning.count, 1)
    return power, noise


def read_around(
    tile: np.ndarray, centre_yx: tuple[float, float], half_px: float, reference: SpectralReferenceArrays
) -> float | None:
    """The largest single-window reading (px) among WINDOW_PX windows, 3/4 of a window apart, within half_px of
    centre_yx: does a spot the model calls blurred beyond repair read so against the rig's spectrum?

    A window of tissue blurred by 4-6 px reads 4-8 px; in-focus windows with folds, charging or seams read
    <= 1.2 px on 4 em-corpus sources (probe of 2026-11-26). None: no window there has a reading.
    """
    tile = np.asarray(tile)
    h, w = tile.shape
    if min(h, w) < WINDOW_PX:
        return None
    ys, xs = (_around(c, half_px, n) for c, n in zip(centre_yx, (h, w), strict=True))
    power, noise = _binned_spectra(tile, [(y, x) for y in ys for x in xs])
    fits = [fit_added_blur(p, float(n), 1, *reference) for p, n in zip(power, noise, strict=True)]
    readings = [f[0] for f in fits if f is not None]
    return max(readings) if readings else None


def _around(centre: float, half_px: float, length: int) -> np.ndarray:
    """Window origins along one axis covering [centre - half_px, centre + half_px], 3/4 of a window apart."""
    low = int(np.clip(centre - half_px, 0, length - WINDOW_PX))
    high = int(np.clip(centre + half_px - WINDOW_PX, low, length - WINDOW_PX))
    count = int(np.ceil((high - low) / (0.75 * WINDOW_PX))) + 1
    return np.linspace(low, high, count).round().astype(int)


def _signal_log_power(power: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """log(power - noise) per bin and where it is usable (power >= SNR_MIN x noise, a bin with pixels)."""
    _, count, *_ = _bin_geometry()
    usable = (power >= SNR_MIN * noise) & (count > 0) & (power > 0)
    return np.log(np.where(usable, power - noise, 1.0)), usable


def reference_log_power(
    tiles: Sequence[WindowSpectra], scales: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The rig's in-focus log signal power per bin: median over known-good tiles; (BINS,) values, usable mask.

    A bin is usable when more than half the tiles have signal above their noise there. scales: per tile, its
    pixel size over the reference's (tiles of several pixel sizes; reference_at_scale), None: all the same.
    """
    logs = np.full((len(tiles), BINS), np.nan)
    for i, spectra in enumerate(tiles):
        log_power, usable = _signal_log_power(spectra.power.mean(axis=0), float(spectra.noise.mean()))
        if scales is not None:
            log_power, usable = reference_at_scale((log_power, usable), scales[i])
        logs[i, usable] = log_power[usable]
    usable = np.isfinite(logs).sum(axis=0) * 2 > len(tiles)
    median = np.zeros(BINS)
    if usable.any():
        median[usable] = np.nanmedian(logs[:, usable], axis=0)
    return median, usable


@cache
def _bin_radius() -> np.ndarray:
    """Mean |f| (cycles/px) of each polar bin's coefficients, shape (RADIAL_BINS, ANGULAR_BINS); 0 for an empty bin."""
    index, count, *_ = _bin_geometry()
    fx, fy = _window_frequencies()
    total = np.bincount(index, np.hypot(fx, fy).ravel(), BINS + 1)[:BINS]
    return (total / np.maximum(count, 1)).reshape(RADIAL_BINS, ANGULAR_BINS)


def reference_at_scale(reference: SpectralReferenceArrays, scale: float) -> SpectralReferenceArrays:
    """A spectrum binned at one pixel size as a tile of another sees it: the tile's frequency f (cycles/px) is
    the spectrum's f x scale, scale = the spectrum's pixel size / the tile's (a tile of coarser pixels sees the
    specimen's finer detail at lower f). The rig's in-focus PSF is fixed in nm, so it scales with the specimen.

    Log power is interpolated along each angular bin, linearly in log |f|, between the reference's usable
    bins; a bin outside their range is not usable (a tile twice as fine as the reference has none above 0.25
    cycles/px). The overall level (power per px^2) changes too, and the fits' contrast term absorbs it.
    """
    log_power, usable = reference
    if scale == 1.0:
        return log_power, usable
    radius = _bin_radius()
    values = np.asarray(log_power, np.float64).reshape(radius.shape)
    ok = np.asarray(usable, bool).reshape(radius.shape) & (radius > 0)
    out_values, out_usable = np.zeros(radius.shape), np.zeros(radius.shape, bool)
    for a in range(ANGULAR_BINS):
        known = np.flatnonzero(ok[:, a])
        if len(known) < 2:
            continue
        x = np.log(radius[known, a])
        wanted = np.log(np.maximum(radius[:, a], 1e-12) * scale)
        out_values[:, a] = np.interp(wanted, x, values[known, a])
        out_usable[:, a] = (radius[:, a] > 0) & (wanted >= x[0]) & (wanted <= x[-1])
    return np.where(out_usable, out_values, 0.0).ravel(), out_usable.ravel()


@dataclass(frozen=True)
class _FitInputs:
    """The bins a fit uses (use: mask over BINS), their weights and targets log(P_tile - N) - log(P_rig), and
    the bins' mean fx^2, fy^2 and fx fy."""

    use: np.ndarray
    weight: np.ndarray
    target: np.ndarray
    fx2: np.ndarray
    fy2: np.ndarray
    fxy: np.ndarray


def _fit_inputs(
    power: np.ndarray, noise: float, windows: int, reference: np.ndarray, reference_usable: np.ndarray
) -> _FitInputs | None:
    """What the added-blur fits take from a tile's binned spectrum; None with fewer than MIN_BINS usable bins."""
    _, count, fx2, fy2, fxy, _ = _bin_geometry()
    log_power, usable = _signal_log_power(power, noise)
    use = usable & reference_usable
    if use.sum() < MIN_BINS:
        return None
    # log of a mean of `count x windows` periodogram values: variance ~ 1/n, inflated where noise was removed.
    weight = np.sqrt(count[use] * windows) * (power[use] - noise) / power[use]
    return _FitInputs(use, weight, log_power[use] - reference[use], fx2[use], fy2[use], fxy[use])


def _gaussian_fit(inputs: _FitInputs) -> tuple[np.ndarray, float]:
    """Weighted least squares of the target on c - 4 pi^2 (a fx^2 + 2 b fx fy + e fy^2): ([c, a, e, b], SSE)."""
    w = inputs.weight
    design = np.stack(
        [np.ones(len(w)), -_FOUR_PI2 * inputs.fx2, -_FOUR_PI2 * inputs.fy2, -2 * _FOUR_PI2 * inputs.fxy], 1
    )
    coef = np.linalg.lstsq(design * w[:, None], inputs.target * w, rcond=None)[0]
    return coef, float(np.sum((w * (inputs.target - design @ coef)) ** 2))


def fit_added_blur(
    power: np.ndarray, noise: float, windows: int, reference: np.ndarray, reference_usable: np.ndarray
) -> tuple[float, float, float, float] | None:
    """(sigma_px, anisotropy, angle_deg, isotropic_px) of the PSF added to the reference (SpectralReading);
    None with fewer than MIN_BINS usable bins.

    power: (BINS,) mean periodogram of `windows` windows; noise: their mean noise power.
    """
    inputs = _fit_inputs(power, noise, windows, reference, reference_usable)
    if inputs is None:
        return None
    (_, a, e, b), _ = _gaussian_fit(inputs)
    values, vectors = np.linalg.eigh(np.array([[a, b], [b, e]]))
    major = math.sqrt(max(values[1], 0.0))
    minor = math.sqrt(max(values[0], 0.0))
    anisotropy = major / minor if minor > 1e-3 * max(major, 1e-9) else 1.0
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1])) % 180.0
    mean = (values[0] + values[1]) / 2
    return major, anisotropy, angle, math.copysign(math.sqrt(abs(mean)), mean)


@dataclass(frozen=True)
class AddedPsf:
    """The PSF added to the rig's in-focus look, as a restoration needs it (not only its size).

    kind: "gaussian" (covariance_px2 = (var_x, cov_xy, var_y), px^2; x right, y down) or "disk" (a uniform
    disk of radius_px, the defocus of a round aperture); log_contrast: the fit's c, log of the tile's signal
    power over the rig's at equal blur (contrast and tissue fraction); sharper_px2: the fitted covariance's
    negative part (a Gaussian fit only), where the tile is sharper than the rig's typical tile.
    """

    kind: Literal["gaussian", "disk"]
    covariance_px2: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radius_px: float = 0.0
    log_contrast: float = 0.0
    sharper_px2: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def signal_tilt(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """How this tile's signal spectrum exceeds the rig's beyond the blur: exp(-4 pi^2 f' sharper f) >= 1."""
        vxx, vxy, vyy = self.sharper_px2
        return np.exp(-_FOUR_PI2 * (vxx * fx * fx + 2.0 * vxy * fx * fy + vyy * fy * fy))

    def transfer(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """The PSF's optical transfer function at frequencies (fx, fy) in cycles/px (real: both are symmetric)."""
        if self.kind == "disk":
            return disk_transfer(np.hypot(fx, fy), self.radius_px)
        vxx, vxy, vyy = self.covariance_px2
        return np.exp(-2.0 * math.pi**2 * (vxx * fx * fx + 2.0 * vxy * fx * fy + vyy * fy * fy))


# A tile is taken as at most this much sharper than the rig's typical tile (px^2 per axis). The signal spectrum
# is tilted by exp(4 pi^2 |f|^2 x this) at most, 2.7x at 0.5 cycles/px; with 1 px^2 the tilt (1.9e4x there)
# followed noise on the heterogeneous 16-bit SEM crops and cost 2 dB, with 0.25 px^2 0.3 dB (prototype on the
# em-corpus, 2026-11-27).
MAX_SHARPER_PX2 = 0.1
# A disk and the Gaussian of its second moment differ within the usable band only from this radius on
# (prototype on the em-corpus, 2026-11-27: below it the fits chose either and restored alike).
DISK_MIN_RADIUS_PX = 1.5
# Largest disk fitted: sigma R/2 = 3.5 px, the top of the deblur models' training range (a tile is restored
# only up to DetectorConfig.max_restorable_sigma_px, 3 px by default, R = 6). With radii up to 10 px, disks of
# 7.4-8.3 px fitted Gaussian and astigmatic blur of sigma 2-3 whose spectra dipped where those disks' zeros
# fall, and restored 8-28 dB below the Gaussian fit (probe on the em-corpus, 2026-11-27, 492 blurred tiles).
DISK_MAX_RADIUS_PX = 7.0
_DISK_RADII_PX = np.round(np.arange(0.5, DISK_MAX_RADIUS_PX + 1e-9, 0.1), 1)
_BESSEL_NODES = (np.arange(64) + 0.5) * math.pi / 64
# 2 J1(x) / x tabulated up to x = 2 pi R |f| for the largest disk at the grid's corner (7 px x 0.71 cycles/px
# = 31.1) and read by linear interpolation (error < 1e-6 at this spacing). Evaluated directly, the Bessel
# integral over a 2400 px tile's padded grid made the rig Wiener of a disk take 4.5 s against 0.4 s for a
# Gaussian, on this 2-core CPU (bench/rig_wiener_speed.py --family disk, 2026-11-27).
_AIRY_X_MAX = 40.0
_AIRY_STEP = 1.0 / 256


def _bessel_j1(x: np.ndarray) -> np.ndarray:
    """J1(x) by its integral (1/pi) int_0^pi cos(t - x sin t) dt, midpoint rule (error < 1e-6 for x < 40)."""
    return np.mean(np.cos(_BESSEL_NODES - np.asarray(x, dtype=np.float64)[..., None] * np.sin(_BESSEL_NODES)), -1)


@cache
def _airy_table() -> tuple[np.ndarray, np.ndarray]:
    """(x, 2 J1(x) / x) on [0, _AIRY_X_MAX] every _AIRY_STEP."""
    x = np.arange(0.0, _AIRY_X_MAX + _AIRY_STEP / 2, _AIRY_STEP)
    safe = np.maximum(x, 1e-9)
    return x, 2.0 * _bessel_j1(safe) / safe


def disk_transfer(f: np.ndarray, radius_px: float | np.ndarray) -> np.ndarray:
    """OTF of a uniform disk of radius_px at radial frequency f (cycles/px): 2 J1(2 pi R f) / (2 pi R f)."""
    x = 2.0 * math.pi * np.asarray(radius_px, dtype=np.float64) * np.abs(np.asarray(f, dtype=np.float64))
    table_x, table = _airy_table()
    out = np.asarray(np.interp(x, table_x, table))
    beyond = x > _AIRY_X_MAX
    if np.any(beyond):  # not reached by the radii and frequencies fitted here; exact, slowly, where needed
        out[beyond] = 2.0 * _bessel_j1(x[beyond]) / x[beyond]
    return out


# Spectral slope of the power-law signal that weights a disk's |H|^2 within each bin (natural images fall off
# as |f|^-2 to -3; noise-free fields of slope 1.5-3.5 blurred by disks of radius 2-6 px read the same radii).
_BIN_WEIGHT_SLOPE = 2.5


def _bin_averaged_log_h2(transfer_squared: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """log of each candidate's |H|^2 as a bin sees it: (candidates, BINS), from transfer_squared(|f|) ->
    (candidates, coefficients) over a window's rfft2 coefficients.

    A bin's power is the mean over its coefficients of the signal times |H|^2, so the model is that mean too
    (a power-law signal, _BIN_WEIGHT_SLOPE): a bin is 0.03 cycles/px wide, and at the bin's mean frequency
    alone |H|^2 dips to a disk's zeros that the bin never shows. Read at the mean frequency, radii of 4-6 px
    came out 0.2-0.4 px off on noise-free fields, and on the em-corpus disks of 6 px read 5.6 (5.9 averaged).
    """
    index, *_ = _bin_geometry()
    f = np.hypot(*_window_frequencies()).ravel()
    weight = np.maximum(f, 1.0 / WINDOW_PX) ** -_BIN_WEIGHT_SLOPE
    weight_sum = np.bincount(index, weight, BINS + 1)[:BINS]
    sums = np.stack([np.bincount(index, weight * row, BINS + 1)[:BINS] for row in transfer_squared(f)])
    return np.log(np.maximum(sums / np.maximum(weight_sum, 1e-30), 1e-12))


@cache
def _disk_log_h2() -> np.ndarray:
    """log of each candidate disk's |H|^2 as a bin sees it: (len(_DISK_RADII_PX), BINS)."""
    return _bin_averaged_log_h2(lambda f: disk_transfer(f[None, :], _DISK_RADII_PX[:, None]) ** 2)


@dataclass(frozen=True)
class _AllBins:
    """Every bin the reference vouches for, noise-dominated ones included: log of the tile's mean periodogram
    (y), its weight (sqrt of the periodogram values averaged: the log's spread, whatever the SNR), the rig's
    log signal power there, and the tile's noise power."""

    use: np.ndarray
    y: np.ndarray
    weight: np.ndarray
    reference: np.ndarray
    noise: float


def _all_bins(power: np.ndarray, noise: float, windows: int, reference: np.ndarray, usable: np.ndarray) -> _AllBins:
    _, count, *_ = _bin_geometry()
    use = usable & (count > 0) & (power > 0)
    return _AllBins(use, np.log(power[use]), np.sqrt(count[use] * windows), reference[use], max(noise, 1e-30))


def _gaussian_all_bins_sse(bins: _AllBins, coef: np.ndarray) -> float:
    """Weighted SSE over every bin of log(e^c P_rig G + N), the Gaussian fit `coef` ([c, a, e, b]) as it is."""
    c, a, e, b = coef
    _, _, fx2, fy2, fxy, _ = _bin_geometry()
    blur = a * fx2[bins.use] + e * fy2[bins.use] + 2.0 * b * fxy[bins.use]
    model = np.log(np.exp(c + bins.reference - _FOUR_PI2 * blur) + bins.noise)
    return float(np.sum((bins.weight * (bins.y - model)) ** 2))


# Newton steps for a disk's log contrast over every bin. From the usable-bin fit the SSE is within 1e-7 of its
# limit after 8 (ISBI slice 27 blurred by each family at sigma 1-3, 128-512 px; 2e-11 after 12).
_DISK_NEWTON_STEPS = 12


def _contrast_fits(bins: _AllBins, log_h2: np.ndarray, start: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate row of log_h2 (a transfer's log |H|^2 per bin, as _bin_averaged_log_h2 gives): its log
    contrast c fitted over every bin (`steps` Newton steps from `start`) and the weighted SSE of
    log(e^c P_rig |H|^2 + N) there. (candidates,) each."""
    signal = log_h2[:, bins.use] + bins.reference[None, :]
    w2 = bins.weight[None, :] ** 2
    c = np.array(start, dtype=np.float64)
    for _ in range(steps):
        u = np.exp(np.minimum(c[:, None] + signal, 700.0))
        share = u / (u + bins.noise)  # d log(u + N) / dc
        residual = bins.y[None, :] - np.log(u + bins.noise)
        c = c + (w2 * residual * share).sum(axis=1) / np.maximum((w2 * share * share).sum(axis=1), 1e-30)
    model = np.log(np.exp(np.minimum(c[:, None] + signal, 700.0)) + bins.noise)
    return c, (w2 * (bins.y[None, :] - model) ** 2).sum(axis=1)


def fit_added_psf(spectra: WindowSpectra, reference: np.ndarray, reference_usable: np.ndarray) -> AddedPsf | None:
    """The PSF added to the reference over the whole tile: the Gaussian fit (fit_added_blur), or a uniform disk
    of radius >= DISK_MIN_RADIUS_PX where the disk explains the spectrum better. None when the tile has too
    few usable bins.

    The two are compared over every bin the reference vouches for, noise included (log of the tile's power
    against log(e^c P_rig |H|^2 + N)), not only over the bins with signal 2x above the noise that the
    Gaussian is fitted on: a disk differs from a Gaussian mostly at and beyond its first zero, where the tile
    is down to its noise. Compared on the usable bins alone, most disk blurs on the em-corpus were read as
    Gaussians, and restored 0.5 dB below the true disk on average (docs/calibration.md)."""
    power, noise = spectra.power.mean(axis=0), float(spectra.noise.mean())
    inputs = _fit_inputs(power, noise, len(spectra.power), reference, reference_usable)
    if inputs is None:
        return None
    coef, _ = _gaussian_fit(inputs)
    c, a, e, b = coef
    w2 = inputs.weight**2
    offsets = ((inputs.target[None, :] - _disk_log_h2()[:, inputs.use]) * w2).sum(axis=1) / w2.sum()
    bins = _all_bins(power, noise, len(spectra.power), reference, reference_usable)
    disk_c, disk_sse = _contrast_fits(bins, _disk_log_h2(), offsets, _DISK_NEWTON_STEPS)
    disk_sse = np.where(_DISK_RADII_PX >= DISK_MIN_RADIUS_PX, disk_sse, np.inf)
    best = int(np.argmin(disk_sse))
    if disk_sse[best] < _gaussian_all_bins_sse(bins, coef):
        return AddedPsf("disk", radius_px=float(_DISK_RADII_PX[best]), log_contrast=float(disk_c[best]))
    values, vectors = np.linalg.eigh(np.array([[a, b], [b, e]]))
    # A blur cannot sharpen: an axis fitted negative is a tile sharper than the rig's typical one (its specimen
    # or focus), which the restoration takes into the signal spectrum instead (`sharper_px2`).
    blur = vectors @ np.diag(np.maximum(values, 0.0)) @ vectors.T
    sharper = vectors @ np.diag(np.clip(values, -MAX_SHARPER_PX2, 0.0)) @ vectors.T
    return AddedPsf(
        "gaussian",
        (float(blur[0, 0]), float(blur[0, 1]), float(blur[1, 1])),
        log_contrast=float(c),
        sharper_px2=(float(sharper[0, 0]), float(sharper[0, 1]), float(sharper[1, 1])),
    )


def _lowest_bin_signal(spectra: WindowSpectra, members: np.ndarray) -> float:
    """Mean signal power (power - noise) of the members' windows in the lowest radial bin."""
    power = spectra.power[members].mean(axis=0)[:ANGULAR_BINS]
    return float(np.mean(power) - spectra.noise[members].mean())


def _readable_quadrants(spectra: WindowSpectra) -> Iterator[tuple[int, np.ndarray]]:
    """(q, window mask) of each quadrant that holds windows and at least QUADRANT_MIN_SIGNAL_SHARE of the whole
    tile's lowest-bin signal (a quadrant of resin beyond a section edge has no blur reading)."""
    lowest = _lowest_bin_signal(spectra, np.ones(len(spectra.power), bool))
    for q in range(4):
        members = spectra.quadrant == q
        if members.any() and _lowest_bin_signal(spectra, members) >= QUADRANT_MIN_SIGNAL_SHARE * lowest:
            yield q, members


def read_added_blur(
    spectra: WindowSpectra, reference: np.ndarray, reference_usable: np.ndarray
) -> SpectralReading | None:
    """The worst reading of the whole tile and its quadrants; None when the whole tile has no usable bins."""

    def fit(members: np.ndarray) -> tuple[float, float, float, float] | None:
        power, noise = spectra.power[members].mean(axis=0), float(spectra.noise[members].mean())
        return fit_added_blur(power, noise, int(members.sum()), reference, reference_usable)

    tile = fit(np.ones(len(spectra.power), bool))
    if tile is None:
        return None
    isotropic = tile[3]
    best = SpectralReading(tile[0], tile[1], tile[2], "tile", isotropic)
    for q, members in _readable_quadrants(spectra):
        quadrant = fit(members)
        if quadrant is not None and quadrant[0] > best.sigma_px:
            best = SpectralReading(quadrant[0], quadrant[1], quadrant[2], f"quadrant {q // 2},{q % 2}", isotropic)
    return best


# ---------------------------------------------------------------------------------------------------
# The blur estimate: what the restoration and the restorable limit take (read_added_blur is what decides
# that a tile is not sharp)

# The elliptical fit is reported (its major axis) only where it explains the spectrum better than the isotropic
# one by F >= this (F over the two extra parameters). Tissue with a direction (axons, membranes along one
# axis) differs from the rig's typical tile by angle too, so for an isotropic blur F exceeded 10 on a third to
# two thirds of the rat SEM, TEM mouse cc and neubias tiles, where the astigmatic family (anisotropy 1.5-4) reads
# F far above 30. Chosen on bench/spectral_reader.py among 10, 20, 30 and 100 (models/detector/MODEL_CARD.md).
ANISOTROPY_F = 30.0
# A quadrant's estimate is taken only where it exceeds the whole tile's by this many combined standard
# deviations (each fit's least-squares variance of its sigma^2): the worst of five noisy estimates of a
# uniform blur would otherwise lift it (chosen with ANISOTROPY_F among 2, 3 and 6).
QUADRANT_EXCESS_SD = 3.0
# Most Gauss-Newton steps from the usable-bin fit (it stops once the SSE stops falling). With 6, 2 of 479 blurred
# em-corpus crops (disk, 3 px) stopped 0.07 and 1.4 px short of their 30-step estimate; with 12, all were
# within 0.01 px of it.
_ESTIMATE_STEPS = 12
# The PSF's shape behind an isotropic estimate: log|H|^2 = (1 - t) log G + t log D, G a Gaussian of sigma and D
# a uniform disk of radius 2 sigma, which has the same second moment (sigma is the per-axis standard deviation
# of every mix; a defocused round aperture is a disk, a beam's probe Gaussian). Beyond its second moment a
# disk's spectrum falls faster than a Gaussian's, so a Gaussian fitted to it read disks 14-23 % high on the
# em-corpus; one tile's spectrum cannot tell the shapes apart (an F-test rarely preferred the disk), so the
# estimate is the mean of each mix's best sigma weighted by its likelihood, the Gaussian's prior weight
# SHAPE_GAUSSIAN_PRIOR times the others'. Chosen among 3, 10 and 30 on bench/spectral_reader.py (two seeds) and
# ten held-out ISBI slices (tests/detection/test_spectral.py): a Gaussian blur reads a little lower the more the
# other shapes weigh (ISBI slices: 9.6 % median error before, 9.8 % at 10, 10.8 % at 3).
SHAPE_MIX = (0.0, 0.25, 0.5, 0.75, 1.0)
SHAPE_GAUSSIAN_PRIOR = 10.0
_SHAPE_STEP_PX = 0.1
_SHAPE_MAX_PX = 8.0
_SHAPE_NEWTON_STEPS = 4  # from the isotropic fit's contrast: 4 and 8 agree to 1e-4 px


@dataclass(frozen=True)
class _Estimate:
    """One region's blur estimate: sigma_px (the Gaussian fits'), its square (px^2), the least-squares variance of
    the isotropic fit's sigma^2 (px^4); isotropic: sigma_px is the isotropic fit's, which _shape_sigma refines
    from `bins` and the fit's log contrast (else it is the elliptical fit's major axis)."""

    sigma_px: float
    sigma2_px2: float
    sigma2_variance_px4: float
    isotropic: bool
    bins: _AllBins
    log_contrast: float


@cache
def _shape_log_h2() -> np.ndarray:
    """log of each shape mix's |H|^2 as a bin sees it, per candidate sigma: (len(SHAPE_MIX), sigmas, BINS)."""
    sigmas = _shape_sigmas()[:, None]
    gaussian = _bin_averaged_log_h2(lambda f: np.exp(-_FOUR_PI2 * sigmas**2 * f[None, :] ** 2))
    disk = _bin_averaged_log_h2(lambda f: disk_transfer(f[None, :], np.maximum(2.0 * sigmas, 1e-6)) ** 2)
    disk[0] = 0.0  # sigma 0: no blur
    return np.stack([(1.0 - t) * gaussian + t * disk for t in SHAPE_MIX])


@cache
def _shape_sigmas() -> np.ndarray:
    return np.round(np.arange(0.0, _SHAPE_MAX_PX + 1e-9, _SHAPE_STEP_PX), 6)


def _shape_sigma(estimate: _Estimate) -> float:
    """The isotropic estimate over PSF shapes (SHAPE_MIX): each mix's best sigma (a parabola through the SSE's
    lowest grid point and its neighbours), averaged with weights prior x exp(-(SSE - SSE_min) / 2 s^2), s^2 the
    best fit's residual variance. Candidates lie within 0.6-1.15x the Gaussian fit's sigma (a disk's reads
    ~0.85x of it), which keeps the cost near 0.5 ms."""
    sigmas = _shape_sigmas()
    window = np.flatnonzero(
        (sigmas >= 0.6 * estimate.sigma_px - 2 * _SHAPE_STEP_PX)
        & (sigmas <= 1.15 * estimate.sigma_px + 2 * _SHAPE_STEP_PX)
    )
    if estimate.sigma_px > _SHAPE_MAX_PX or len(window) < 3:
        return estimate.sigma_px
    table = _shape_log_h2()[:, window]
    mixes, candidates, _ = table.shape
    rows = table.reshape(mixes * candidates, -1)
    _, sse = _contrast_fits(estimate.bins, rows, np.full(len(rows), estimate.log_contrast), _SHAPE_NEWTON_STEPS)
    best_sse, best_sigma = np.empty(mixes), np.empty(mixes)
    for m, row in enumerate(sse.reshape(mixes, candidates)):
        k = int(np.argmin(row))
        best_sse[m], best_sigma[m] = row[k], sigmas[window[k]]
        if 0 < k < candidates - 1:
            left, right, curvature = row[k - 1], row[k + 1], row[k - 1] - 2 * row[k] + row[k + 1]
            if curvature > 0:
                offset = 0.5 * (left - right) / curvature
                best_sse[m] = row[k] - 0.25 * (left - right) * offset
                best_sigma[m] += offset * _SHAPE_STEP_PX
    variance = max(float(best_sse.min()) / max(int(estimate.bins.use.sum()) - 3, 1), 1e-12)
    weight = np.exp(-(best_sse - best_sse.min()) / (2.0 * variance))
    weight[np.asarray(SHAPE_MIX) == 0.0] *= SHAPE_GAUSSIAN_PRIOR
    return max(float(weight @ best_sigma / weight.sum()), 0.0)


def _all_bins_fit(bins: _AllBins, design: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Gauss-Newton fit of log P = log(e^(design @ theta) P_rig + N) over every bin (step halving where the
    weighted SSE would rise): (theta, SSE, covariance of theta)."""
    w2 = bins.weight**2

    def model(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        signal = np.exp(np.minimum(design @ theta + bins.reference, 700.0))
        return signal, np.log(signal + bins.noise)

    theta = np.asarray(start, dtype=np.float64)
    signal, fitted = model(theta)
    sse = float(w2 @ (bins.y - fitted) ** 2)
    for _ in range(_ESTIMATE_STEPS):
        jacobian = design * (signal / (signal + bins.noise))[:, None]
        normal = (jacobian * w2[:, None]).T @ jacobian
        step = np.linalg.lstsq(normal, (jacobian * w2[:, None]).T @ (bins.y - fitted), rcond=None)[0]
        for _halving in range(4):
            trial_signal, trial_fitted = model(theta + step)
            trial_sse = float(w2 @ (bins.y - trial_fitted) ** 2)
            if trial_sse <= sse:
                break
            step = step / 2
        else:
            break
        theta, signal, fitted, gained, sse = theta + step, trial_signal, trial_fitted, sse - trial_sse, trial_sse
        if gained < 1e-6 * max(sse, 1e-12):
            break
    jacobian = design * (signal / (signal + bins.noise))[:, None]
    normal = (jacobian * w2[:, None]).T @ jacobian
    covariance = np.linalg.pinv(normal) * sse / max(len(bins.y) - design.shape[1], 1)
    return theta, sse, covariance


def _estimate(
    power: np.ndarray, noise: float, windows: int, reference: np.ndarray, usable: np.ndarray, elliptical_too: bool
) -> _Estimate | None:
    """The blur estimate of one region (mean periodogram of `windows` windows); None without MIN_BINS usable
    bins. The Gaussian fits run over every bin the reference vouches for, the noise in the model (dropping
    the bins below SNR_MIN x the noise, as the usable-bin fit must, reads blur low where few bins are left),
    started from the usable-bin fit. elliptical_too: also fit the elliptical Gaussian (F-test, ANISOTROPY_F);
    else the isotropic sigma."""
    inputs = _fit_inputs(power, noise, windows, reference, usable)
    if inputs is None:
        return None
    (c, a, e, b), _ = _gaussian_fit(inputs)
    bins = _all_bins(power, noise, windows, reference, usable)
    _, _, fx2, fy2, fxy, _ = _bin_geometry()
    ones = np.ones(int(bins.use.sum()))
    fx2, fy2, fxy = fx2[bins.use], fy2[bins.use], fxy[bins.use]
    isotropic = np.stack([ones, -_FOUR_PI2 * (fx2 + fy2)], 1)
    theta_i, sse_i, covariance_i = _all_bins_fit(bins, isotropic, np.array([c, (a + e) / 2]))
    sigma2, is_isotropic = max(float(theta_i[1]), 0.0), True
    extra = len(ones) - 4  # degrees of freedom of the elliptical fit
    if elliptical_too and extra > 0:
        elliptical = np.stack([ones, -_FOUR_PI2 * fx2, -_FOUR_PI2 * fy2, -2 * _FOUR_PI2 * fxy], 1)
        theta_e, sse_e, _ = _all_bins_fit(bins, elliptical, np.array([c, a, e, b]))
        if sse_e > 0 and (sse_i - sse_e) / 2 / (sse_e / extra) >= ANISOTROPY_F:
            _, a, e, b = theta_e
            sigma2 = max(float(np.linalg.eigvalsh(np.array([[a, b], [b, e]]))[1]), 0.0)
            is_isotropic = False
    return _Estimate(math.sqrt(sigma2), sigma2, float(covariance_i[1, 1]), is_isotropic, bins, float(theta_i[0]))


def estimate_added_blur(spectra: WindowSpectra, reference: np.ndarray, reference_usable: np.ndarray) -> float | None:
    """The blur added to the reference (px, Gaussian-equivalent sigma) as a restoration needs it; None when the
    whole tile has too few usable bins (read_added_blur has no reading either).

    read_added_blur reports the largest major axis of five least-squares fits: for an isotropic blur noise
    in the fitted anisotropy and the worst of five noisy readings both lengthen it (1.07-1.15x the true sigma
    on the 256-512 px em-corpus crops), which is the right bias for deciding that a tile is not sharp and the
    wrong one for its size. Here: the isotropic sigma unless the elliptical fit is better by ANISOTROPY_F
    (then its major axis), and a quadrant's isotropic sigma only where it stands QUADRANT_EXCESS_SD above the
    whole tile's; an isotropic sigma is then read over PSF shapes from Gaussian to disk (_shape_sigma; the
    choices above compare the Gaussian fits). An astigmatism is the lens's, over the whole tile: fitting each
    quadrant's ellipse too cost ~1 ms more per 16-window tile and moved no Gaussian or astigmatic error on
    bench/spectral_reader.py by more than half a point."""

    def fit(members: np.ndarray, elliptical_too: bool = False) -> _Estimate | None:
        power, noise = spectra.power[members].mean(axis=0), float(spectra.noise[members].mean())
        return _estimate(power, noise, int(members.sum()), reference, reference_usable, elliptical_too)

    tile = fit(np.ones(len(spectra.power), bool), elliptical_too=True)
    if tile is None:
        return None
    best = tile
    for _, members in _readable_quadrants(spectra):
        quadrant = fit(members)
        if quadrant is None or quadrant.sigma_px <= best.sigma_px:
            continue
        if quadrant.sigma2_px2 - best.sigma2_px2 > QUADRANT_EXCESS_SD * math.sqrt(
            quadrant.sigma2_variance_px4 + tile.sigma2_variance_px4
        ):
            best = quadrant
    return _shape_sigma(best) if best.isotropic else best.sigma_px
