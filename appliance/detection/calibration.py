"""Rig calibration of the blur detector: what "in focus" means on this microscope.

The detector was trained on one ssTEM volume, so its sigma scale has that volume's own blur as zero.
Another instrument's in-focus tiles read 0.5-3 px (pixel size, scan noise, detector PSF), and every
sharp tile would be called `soft`. Ranking is unaffected; what is missing is the rig's zero point.

`calibrate` learns it from a handful (MIN_TILES..) of known-good tiles of one rig: the robust median of
their tile sigmas (the baseline), of their region maps, the spread, noise level and contrast polarity.
`apply_calibration` then reports the blur *added* to that baseline. Defocus and the rig's own blur
convolve, and Gaussian blurs add in quadrature, so the added blur is
sqrt(max(0, sigma^2 - baseline^2)) (tile sigma and every region), and the label is re-derived from it
with the usual thresholds. bench/detector_sources.py measured this rule against an upper in-focus
baseline (median + k robust SDs in log-sigma) and a margin in log-sigma on every em-corpus source: each
is a threshold on the raw sigma and they only trade sharp false alarms for missed blur (mean sum of both
rates over 8 sources: quadrature-median 49 %, upper k=1 48 %, k=2 57 %, log margin 60-64 %); quadrature
from the median is kept because it also gives an unbiased added-blur estimate. What limits every rule is
the detector's spread of in-focus readings within a source (AUROC 0.78-0.86 at sigma 1-3 px on the
SEM/TEM sources), which no per-rig offset can remove.

Spectral reference (file version 2): the known-good tiles also give the rig's in-focus power spectrum
(appliance.spectral). A detector holding it reads each tile's blur added to that spectrum
(`spectral_sigma_px`), and apply_calibration takes that reading as the tile's sigma instead of the
quadrature rule: it does not depend on the learned model's view of an unseen instrument
(bench/detector_sources.py, "spectral" columns). A tile of another pixel size is read against the
reference rescaled to it (RigCalibration.spectral_arrays); tiles narrower than spectral.WINDOW_PX, or more
than 2x finer or coarser than the calibration's, keep the quadrature rule. Version-1 files load as before.

Pixel size: the rig's in-focus PSF is fixed in nm, so a calibration that records its tiles' pixel size
(`pixel_size_nm`) is scaled to each tile's: baseline_px(tile) = baseline_px * cal_nm / tile_nm
(`rig_reference`), and so is its spectrum's frequency axis (spectral.reference_at_scale). Its online
counterpart, the per-beam running baseline and focus-drift alarm, is appliance.detection.online_baseline;
both are described in docs/calibration.md.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance import spectral
from appliance.config import ConfigError, DetectorConfig
from appliance.detection.detector import (
    LOG_SIGMA_OFFSET_PX,
    PARTIAL_BLUR,
    BlurDetector,
    is_judged,
    label_for_sigma,
)
from appliance.messages import BlurAssessment, blur_score_from_sigma, sigma_from_blur_score
from appliance.noise import MAD_TO_SD, patch_noise_sigma
from appliance.spectral import SpectralReferenceArrays
from appliance.tile_io import TileError, check_tile_pixels

CALIBRATION_VERSION: Literal[3] = 3
MIN_TILES = 5
# A known-good tile reading this much more (in log(sigma + 0.5)) than the median of the others, and at
# least OUTLIER_ADDED_PX of added blur, is a blurred tile among the sharp ones.
OUTLIER_LOG_MARGIN = 0.45
OUTLIER_ADDED_PX = 1.0
# Sorted log(sigma + 0.5) of the tiles split by a gap this wide, with >= 2 tiles on each side: two rigs.
MIXED_LOG_GAP = 0.6
# Noise levels (Immerkaer) differing by more than this factor: not one detector setting.
MIXED_NOISE_RATIO = 10.0
# With a spectral reference, each known-good tile is read against the others' spectrum (leave one out). In
# focus, 20 random 5-tile draws of each of 7 real sources read at most 1.0 px added and 0.8 px sharper;
# a tile blurred by 1.5 px read 0.95-1.6 px (probe of 2026-11-26, docs/calibration.md).
SPECTRAL_OUTLIER_PX = 1.2
SPECTRAL_SHARPER_PX = 1.0
# A tile whose pixel size differs from the calibration's by more than this fraction is read against the
# reference rescaled to it (spectral.reference_at_scale). Its restoration takes the rescaled reference only
# when the tile is coarser: the rescaled reference has no bins in a finer tile's top band, where the rig
# Wiener would extrapolate its signal prior; on the rat SEM's real tiles that lost 0.1-0.9 dB per finer tile
# and gained 0.2-0.3 dB per coarser one (docs/calibration.md).
SPECTRAL_PIXEL_SIZE_TOLERANCE = 0.05
# Pixel sizes (tile / calibration) the spectral reading serves; beyond them, the quadrature rule.
SPECTRAL_PIXEL_SIZE_RATIO = (0.5, 2.0)


class CalibrationError(ValueError):
    """The known-good tiles cannot calibrate a rig; the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TileStats(_Strict):
    """What the detector and simple pixel statistics say about one known-good tile."""

    name: str = Field(description="File name (or label) of the tile.")
    shape: tuple[int, int] = Field(description="(height, width) in px.")
    dtype: Literal["uint8", "uint16"]
    sigma_px: float = Field(ge=0.0, description="Detector tile sigma (uncalibrated), px.")
    region_sigma_median_px: float = Field(ge=0.0, description="Median of the 8x8 region map's sigma, px.")
    anisotropy: float = Field(ge=1.0)
    noise_level: float = Field(ge=0.0, description="Immerkaer noise sigma, fraction of the dtype range.")
    mean_level: float = Field(ge=0.0, le=1.0, description="Mean grey, fraction of the dtype range.")
    contrast: float = Field(ge=0.0, description="Grey-level standard deviation, fraction of the dtype range.")
    skewness: float = Field(description="Grey-level skewness: < 0 dark features on light (TEM-like).")
    spectral_added_px: float | None = Field(
        None, description="Blur added to the other known-good tiles' spectrum (leave one out), px; None without one."
    )
    spectral_isotropic_px: float | None = Field(
        None, description="Its isotropic equivalent, negative when this tile is sharper than the others, px."
    )


_LAYOUT_FIELDS = ("window_px", "radial_bins", "angular_bins", "f_min", "f_max")


def _running_layout() -> tuple[int, int, int, float, float]:
    """How this appliance bins spectra, in _LAYOUT_FIELDS order: a reference binned otherwise is refused."""
    return spectral.WINDOW_PX, spectral.RADIAL_BINS, spectral.ANGULAR_BINS, spectral.F_MIN, spectral.F_MAX


class SpectralReference(_Strict):
    """The rig's in-focus log signal power per polar frequency bin (appliance.spectral)."""

    window_px: int = Field(description="Window side the spectra were taken on, px.")
    radial_bins: int
    angular_bins: int
    f_min: float = Field(allow_inf_nan=False, description="Lowest frequency binned, cycles/px.")
    f_max: float = Field(allow_inf_nan=False, description="Highest frequency binned, cycles/px.")
    log_power: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        description="Median over the known-good tiles of log(power - noise) per bin."
    )
    usable: list[bool] = Field(description="Bins where most known-good tiles have signal above their noise.")

    def model_post_init(self, __context: object) -> None:
        bins = self.radial_bins * self.angular_bins
        if len(self.log_power) != bins or len(self.usable) != bins:
            raise ValueError(f"spectral reference: {bins} bins, {len(self.log_power)} values, {len(self.usable)} flags")

    @classmethod
    def from_tiles(
        cls, tiles: Sequence[spectral.WindowSpectra], scales: Sequence[float] | None = None
    ) -> SpectralReference:
        """The reference of the known-good tiles' window spectra, in the running layout (scales: per tile, its
        pixel size over the calibration's; None: all at the calibration's)."""
        log_power, usable = spectral.reference_log_power(tiles, scales)
        layout = dict(zip(_LAYOUT_FIELDS, _running_layout(), strict=True))
        return cls(**layout, log_power=[round(float(v), 6) for v in log_power], usable=[bool(u) for u in usable])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(log power, usable) for BlurDetector.assess(spectral_references=...); CalibrationError for another layout."""
        layout, running = tuple(getattr(self, f) for f in _LAYOUT_FIELDS), _running_layout()
        if layout != running:
            raise CalibrationError(f"spectral reference binned as {layout}, this appliance bins {running}; recalibrate")
        return np.array(self.log_power, dtype=np.float64), np.array(self.usable, dtype=bool)


class RestorationBlend(_Strict):
    """How this rig's soft tiles are restored (appliance.restoration.rig_blend): the learned model's share of
    the output, the rest the Wiener filter against the rig's spectrum; measured on the known-good tiles."""

    deblur_model: str = Field(min_length=1, description="Deblur weights the share was measured with.")
    model_weight: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, description="The model's share, 0-1.")
    psnr_db: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        description="Mean PSNR (dB) of the probe tiles restored at each measured share (keys: the share)."
    )
    probes: int = Field(ge=1, description="Probe tiles (known-good tiles x probe PSFs) it was measured on.")


class RigCalibration(_Strict):
    """A rig's in-focus reference for the blur detector (JSON on disk, see save_calibration)."""

    version: Literal[1, 2, 3] = Field(
        CALIBRATION_VERSION,
        description="File format version (1: no spectral reference; 2: no restoration blend).",
    )
    model_version: str = Field(min_length=1, description="Detector model the baseline was measured with.")
    created_utc: datetime
    tile_count: int = Field(ge=MIN_TILES, description="Known-good tiles it was learned from.")
    tiles: list[TileStats]
    baseline_sigma_px: float = Field(ge=0.0, description="Median tile sigma of the known-good tiles, px.")
    region_baseline_sigma_px: float = Field(ge=0.0, description="Median region sigma of those tiles, px.")
    spread_log_sigma: float = Field(
        ge=0.0, description="Robust SD (1.4826 x MAD) of log(sigma + 0.5) over the known-good tiles."
    )
    noise_level: float = Field(ge=0.0, description="Median Immerkaer noise sigma, fraction of the dtype range.")
    contrast_polarity: Literal["dark_on_light", "light_on_dark", "mixed"] = Field(
        description="Sign of the grey-level skewness agreed by most tiles (informational)."
    )
    dtype: Literal["uint8", "uint16"]
    mapping: Literal["quadrature", "spectral"] = Field(
        "quadrature",
        description="How a tile's added blur is read: `spectral` against the reference spectrum where the tile "
        "has a spectral reading (else quadrature), `quadrature` from the baseline sigma.",
    )
    spectral: SpectralReference | None = Field(
        None, description="The rig's in-focus power spectrum; None in version-1 files and for tiles < 128 px."
    )
    pixel_size_nm: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="Pixel size of the known-good tiles (nm); the baseline is scaled to each tile's pixel size. "
        "None (unknown, also files written before it existed): the baseline is used in px as it is.",
    )

    restoration: RestorationBlend | None = Field(
        None,
        description="How soft tiles are restored on this rig (model and rig Wiener blend); None before version 3, "
        "without a spectral reference, or calibrated without a deblur model: the model alone.",
    )

    def restoration_inputs(
        self, pixel_size_nm: float | None = None
    ) -> tuple[SpectralReferenceArrays, float, str, float] | None:
        """(the rig's spectrum, the model's share, the deblur model it was measured with, the rig's noise power)
        for the restorer (appliance.restoration.rig_wiener.RigRestoration) of a tile of pixel_size_nm (None: as
        calibrated), or None without a restoration blend or a spectrum for that pixel size."""
        reference = self.spectral_arrays(pixel_size_nm, restoring=True)
        if self.restoration is None or reference is None:
            return None
        return reference, self.restoration.model_weight, self.restoration.deblur_model, self.noise_level**2

    def spectral_arrays(
        self, pixel_size_nm: float | None = None, restoring: bool = False
    ) -> SpectralReferenceArrays | None:
        """The rig's in-focus spectrum as BlurDetector.assess (restoring: the rig Wiener) takes it for a tile of
        pixel_size_nm (None: as calibrated), or None without one or beyond SPECTRAL_PIXEL_SIZE_RATIO."""
        if self.spectral is None:
            return None
        scale = spectral_scale(self.pixel_size_nm, pixel_size_nm, restoring)
        return None if scale is None else spectral.reference_at_scale(self.spectral.arrays(), scale)

    def model_post_init(self, __context: object) -> None:
        if len(self.tiles) != self.tile_count:
            raise ValueError(f"tile_count {self.tile_count} but {len(self.tiles)} tile stats")
        # `mapping` is written from `spectral` (a file states both); a hand-edited file could contradict itself.
        if (self.mapping == "spectral") != (self.spectral is not None):
            has = "a spectral reference" if self.spectral is not None else "no spectral reference"
            raise ValueError(f"mapping {self.mapping!r} with {has}: `spectral` mapping needs one, `quadrature` none")
        if self.version == 1 and self.spectral is not None:
            raise ValueError("version 1 holds no spectral reference; a file with one is version 2")
        if self.version < 3 and self.restoration is not None:
            raise ValueError(f"version {self.version} holds no restoration blend; a file with one is version 3")
        if self.restoration is not None and self.spectral is None:
            raise ValueError("a restoration blend needs the spectral reference it restores against")


# ---------------------------------------------------------------------------------------------------
# Per-tile statistics


def spectral_scale(calibration_nm: float | None, tile_nm: float | None, restoring: bool = False) -> float | None:
    """How a tile of tile_nm takes a reference spectrum taken at calibration_nm (the `scale` of
    spectral.reference_at_scale): 1 (as it is) when either is unknown, within SPECTRAL_PIXEL_SIZE_TOLERANCE, or
    (restoring) when the tile is finer; else rescaled; None beyond SPECTRAL_PIXEL_SIZE_RATIO (no reading)."""
    if calibration_nm is None or tile_nm is None:
        return 1.0
    ratio = tile_nm / calibration_nm
    low, high = SPECTRAL_PIXEL_SIZE_RATIO
    if not low <= ratio <= high:
        return None
    if abs(ratio - 1.0) <= SPECTRAL_PIXEL_SIZE_TOLERANCE or (restoring and ratio < 1.0):
        return 1.0
    return 1.0 / ratio


def noise_level(tile: np.ndarray) -> float:
    """Immerkaer (1996) noise sigma of a uint8/uint16 tile as a fraction of the dtype range."""
    unit = tile.astype(np.float32) / float(np.iinfo(tile.dtype).max)
    return float(patch_noise_sigma(unit[None])[0])


def region_sigma_px(assessment: BlurAssessment) -> np.ndarray:
    """The region map as sigma in px (inverse of blur_score_from_sigma), shape (GRID, GRID)."""
    return sigma_from_blur_score(np.clip(np.asarray(assessment.region_scores, dtype=np.float64), 0.0, 1.0 - 1e-9))


def tile_stats(
    tile: np.ndarray,
    name: str,
    assessment: BlurAssessment,
    reading: spectral.SpectralReading | None = None,
    sigma_scale: float = 1.0,
) -> TileStats:
    """Statistics of one known-good tile (H, W) uint8/uint16, its uncalibrated assessment and its spectral
    reading against the other known-good tiles (None without a spectral reference). sigma_scale: the tile's
    pixel size over the calibration's; the model's sigmas are recorded in px at the calibration's."""
    unit = tile.astype(np.float64) / float(np.iinfo(tile.dtype).max)
    sd = float(unit.std())
    skew = float(((unit - unit.mean()) ** 3).mean() / sd**3) if sd > 0 else 0.0
    return TileStats(
        name=name,
        shape=(int(tile.shape[0]), int(tile.shape[1])),
        dtype=str(tile.dtype),
        sigma_px=float(assessment.sigma_px) * sigma_scale,
        region_sigma_median_px=float(np.median(region_sigma_px(assessment))) * sigma_scale,
        anisotropy=float(assessment.anisotropy),
        noise_level=noise_level(tile),
        mean_level=float(unit.mean()),
        contrast=sd,
        skewness=skew,
        spectral_added_px=None if reading is None else round(reading.sigma_px, 4),
        spectral_isotropic_px=None if reading is None else round(reading.isotropic_px, 4),
    )


# ---------------------------------------------------------------------------------------------------
# Calibration


def _check_pixels(tiles: Sequence[np.ndarray], names: Sequence[str]) -> None:
    for tile, name in zip(tiles, names, strict=True):
        tile = np.asarray(tile)
        if tile.ndim == 3:
            raise CalibrationError(
                f"{name}: colour/multi-channel image (shape {tile.shape}); calibrate with 2-D grayscale tiles"
            )
        try:
            check_tile_pixels(tile, name)
        except TileError as exc:
            raise CalibrationError(f"{exc} (known-good tiles must be real in-focus tiles)") from exc


def _log_sigma(sigma_px: float | np.ndarray) -> np.ndarray:
    return np.log(np.asarray(sigma_px, dtype=np.float64) + LOG_SIGMA_OFFSET_PX)


def robust_spread(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation: the SD of a normal sample, immune to a few outliers."""
    return float(MAD_TO_SD * np.median(np.abs(values - np.median(values))))


def _check_one_rig(stats: Sequence[TileStats]) -> None:
    """Raise CalibrationError if the tiles are not one rig's in-focus tiles (mixed or blurred)."""
    dtypes = {s.dtype for s in stats}
    if len(dtypes) > 1:
        listing = ", ".join(f"{s.name}={s.dtype}" for s in stats)
        raise CalibrationError(f"mixed instruments: tiles have different pixel types ({listing}); one rig at a time")
    noise = np.array([s.noise_level for s in stats])
    lo, hi = int(noise.argmin()), int(noise.argmax())
    if noise[hi] > MIXED_NOISE_RATIO * max(noise[lo], 1e-6):
        raise CalibrationError(
            f"mixed instruments: noise level of {stats[hi].name} ({noise[hi]:.4f}) is "
            f"{noise[hi] / max(noise[lo], 1e-6):.0f}x that of {stats[lo].name} ({noise[lo]:.4f}); "
            "calibrate each rig (and detector setting) separately"
        )
    logs = _log_sigma(np.array([s.sigma_px for s in stats]))
    order = np.argsort(logs)
    gaps = np.diff(logs[order])
    k = int(gaps.argmax())
    if gaps[k] > MIXED_LOG_GAP and 2 <= k + 1 <= len(stats) - 2:
        low = ", ".join(f"{stats[i].name} ({stats[i].sigma_px:.2f} px)" for i in order[: k + 1])
        high = ", ".join(f"{stats[i].name} ({stats[i].sigma_px:.2f} px)" for i in order[k + 1 :])
        raise CalibrationError(
            f"mixed instruments or focus states: the tiles fall into two groups, sharper {low} and softer "
            f"{high}; give tiles of one rig, all in focus"
        )
    spectral_checks = all(s.spectral_added_px is not None and s.spectral_isotropic_px is not None for s in stats)
    if spectral_checks:
        _check_spectra_agree(stats)
    for i, s in enumerate(stats):
        others = np.delete(logs, i)
        margin = max(OUTLIER_LOG_MARGIN, 4.0 * robust_spread(others))
        reference = float(np.exp(np.median(others)) - LOG_SIGMA_OFFSET_PX)
        added = math.sqrt(max(s.sigma_px**2 - reference**2, 0.0))
        if logs[i] - np.median(others) > margin and added > OUTLIER_ADDED_PX:
            read = f"{s.name}: the model reads blur sigma {s.sigma_px:.2f} px against {reference:.2f} px for the other"
            if spectral_checks:
                # Its spectrum agrees with the others' (checked above): not blur, another instrument or unlike content.
                raise CalibrationError(
                    f"{read} known-good tiles, while its power spectrum agrees with theirs: a tile of another "
                    "instrument, or content unlike the others; use tiles of one rig with typical content"
                )
            raise CalibrationError(
                f"{read} known-good tiles (~{added:.1f} px of added blur): it looks out of focus; leave it out"
            )


def _check_spectra_agree(stats: Sequence[TileStats]) -> None:
    """With a spectral reference, the learned model's reading is not trusted on an unseen instrument: each tile
    is read against the others' spectrum instead. Raise CalibrationError for a blurred or a much sharper tile."""
    for s in stats:
        assert s.spectral_added_px is not None and s.spectral_isotropic_px is not None
        if s.spectral_added_px > SPECTRAL_OUTLIER_PX:
            raise CalibrationError(
                f"{s.name}: reads ~{s.spectral_added_px:.1f} px of blur added to the other known-good tiles' "
                "power spectrum: it looks out of focus; leave it out"
            )
        if s.spectral_isotropic_px < -SPECTRAL_SHARPER_PX:
            raise CalibrationError(
                f"mixed instruments or focus states: {s.name} is ~{-s.spectral_isotropic_px:.1f} px sharper than "
                "the other known-good tiles (power spectrum); give tiles of one rig, all in focus"
            )


def _polarity(stats: Sequence[TileStats]) -> Literal["dark_on_light", "light_on_dark", "mixed"]:
    signs = np.sign([s.skewness for s in stats])
    if (signs < 0).mean() >= 0.8:
        return "dark_on_light"
    if (signs > 0).mean() >= 0.8:
        return "light_on_dark"
    return "mixed"


def calibration_from_stats(
    stats: Sequence[TileStats],
    model_version: str,
    pixel_size_nm: float | None = None,
    reference: SpectralReference | None = None,
) -> RigCalibration:
    """Check the known-good tiles' statistics and summarise them into a RigCalibration.

    pixel_size_nm: the tiles' pixel size when known (recorded, see rig_reference); reference: their spectrum.
    """
    if len(stats) < MIN_TILES:
        raise CalibrationError(
            f"calibration needs at least {MIN_TILES} known-good in-focus tiles of one rig; got {len(stats)}"
        )
    _check_one_rig(stats)
    sigmas = np.array([s.sigma_px for s in stats])
    return RigCalibration(
        model_version=model_version,
        created_utc=datetime.now(UTC),
        tile_count=len(stats),
        tiles=list(stats),
        baseline_sigma_px=float(np.median(sigmas)),
        region_baseline_sigma_px=float(np.median([s.region_sigma_median_px for s in stats])),
        spread_log_sigma=robust_spread(_log_sigma(sigmas)),
        noise_level=float(np.median([s.noise_level for s in stats])),
        contrast_polarity=_polarity(stats),
        dtype=stats[0].dtype,
        pixel_size_nm=pixel_size_nm,
        mapping="quadrature" if reference is None else "spectral",
        spectral=reference,
    )


def calibrate(
    tiles: Sequence[np.ndarray],
    names: Sequence[str],
    detector: BlurDetector,
    pixel_size_nm: float | Sequence[float] | None = None,
) -> RigCalibration:
    """Learn a rig's in-focus reference from known-good tiles (2-D uint8/uint16 arrays, any size >= 32 px).

    pixel_size_nm: the tiles' pixel size (nm) when known, recorded so that tiles of another pixel size get the
    baseline and the spectrum scaled (rig_reference, RigCalibration.spectral_arrays). One value per tile (one
    rig's tiles at several magnifications): the calibration is at their median, each tile's spectrum and model
    sigma brought to it; they may differ by SPECTRAL_PIXEL_SIZE_RATIO at most.

    Raises CalibrationError naming the file and the problem: too few tiles, colour or constant images,
    a blurred tile among the sharp ones, tiles from mixed instruments.
    """
    if len(tiles) != len(names):
        raise ValueError(f"calibrate: {len(tiles)} tiles but {len(names)} names")
    if len(tiles) < MIN_TILES:
        raise CalibrationError(
            f"calibration needs at least {MIN_TILES} known-good in-focus tiles of one rig; got {len(tiles)}"
        )
    _check_pixels(tiles, names)
    calibration_nm, scales = _pixel_sizes(pixel_size_nm, names)
    assessments = detector.assess([np.asarray(t) for t in tiles], list(names))
    for a, name in zip(assessments, names, strict=True):
        if not is_judged(a):
            raise CalibrationError(f"{name}: {a.reason}; pick tiles with tissue in them")
    spectra = [spectral.window_spectra(np.asarray(t)) for t in tiles]
    readings = leave_one_out_readings(spectra, scales)
    readable = [s for s in spectra if s is not None]
    reference = None if readings is None else SpectralReference.from_tiles(readable, scales)
    read: list[spectral.SpectralReading | None] = list(readings) if readings else [None] * len(tiles)
    stats = [
        tile_stats(np.asarray(t), n, a, r, scale)
        for t, n, a, r, scale in zip(tiles, names, assessments, read, scales or [1.0] * len(tiles), strict=True)
    ]
    try:
        return calibration_from_stats(stats, detector.model_version, calibration_nm, reference)
    except CalibrationError as exc:
        if scales is None:
            raise
        sizes = ", ".join(f"{calibration_nm * scale:g}" for scale in sorted(set(scales)))  # type: ignore[operator]
        raise CalibrationError(
            f"{exc} (the tiles were taken at {sizes} nm and compared at {calibration_nm:g} nm: tiles of other "
            "acquisitions or beam settings differ in nm too; calibrate each pixel size separately)"
        ) from exc


def _pixel_sizes(
    pixel_size_nm: float | Sequence[float] | None, names: Sequence[str]
) -> tuple[float | None, list[float] | None]:
    """(the calibration's pixel size, per tile its pixel size over it, or None when all are the same)."""
    if pixel_size_nm is None or isinstance(pixel_size_nm, int | float):
        return pixel_size_nm, None
    sizes = [float(v) for v in pixel_size_nm]
    if len(sizes) != len(names):
        raise ValueError(f"calibrate: {len(names)} tiles but {len(sizes)} pixel sizes")
    for size, name in zip(sizes, names, strict=True):
        if not (math.isfinite(size) and size > 0):
            raise CalibrationError(f"{name}: pixel size {size} nm; must be a positive number")
    common = float(np.median(sizes))
    if max(sizes) == min(sizes):
        return common, None
    low, high = SPECTRAL_PIXEL_SIZE_RATIO
    for size, name in zip(sizes, names, strict=True):
        if not low <= size / common <= high:
            raise CalibrationError(
                f"{name}: pixel size {size:g} nm against {common:g} nm for the known-good tiles' median; one "
                f"calibration serves {low:g}-{high:g}x its pixel size: calibrate these magnifications separately"
            )
    return common, [size / common for size in sizes]


def leave_one_out_readings(
    spectra: Sequence[spectral.WindowSpectra | None], scales: Sequence[float] | None = None
) -> list[spectral.SpectralReading] | None:
    """Each known-good tile read against the others' spectrum; None (no spectral reference for this rig) when
    a tile is narrower than spectral.WINDOW_PX or has too little structure above its noise to be read.
    scales: per tile, its pixel size over the calibration's (None: all the same)."""
    if any(s is None for s in spectra):
        return None
    tiles = [s for s in spectra if s is not None]
    readings = []
    for i, own in enumerate(tiles):
        others = None if scales is None else list(scales[:i]) + list(scales[i + 1 :])
        reference = spectral.reference_log_power(tiles[:i] + tiles[i + 1 :], others)
        # As the runtime will read this tile (spectral_scale): within the tolerance, against the spectrum as it is.
        scale = 1.0 if scales is None else spectral_scale(1.0, scales[i])
        if scale is not None and scale != 1.0:
            reference = spectral.reference_at_scale(reference, scale)
        reading = spectral.read_added_blur(own, *reference)
        if reading is None:
            return None
        readings.append(reading)
    return readings


# ---------------------------------------------------------------------------------------------------
# Applying a calibration


def added_blur_px(sigma_px: float | np.ndarray, baseline_px: float) -> float | np.ndarray:
    """Blur added to the rig's own (quadrature): sqrt(max(0, sigma^2 - baseline^2)), px."""
    sigma = np.asarray(sigma_px, dtype=np.float64)
    added = np.sqrt(np.maximum(sigma * sigma - baseline_px * baseline_px, 0.0))
    return float(added) if added.ndim == 0 else added


@dataclass(frozen=True)
class FocusReference:
    """The in-focus blur a tile is measured from: px at that tile's pixel size.

    source: what it is, in the verdict's reason ("rig baseline", "beam 3 baseline").
    spectral: whether a tile's spectral reading (spectral_sigma_px) is its added blur: the calibration has a
    spectral reference for the tile's pixel size (RigCalibration.spectral_arrays: within
    SPECTRAL_PIXEL_SIZE_RATIO of the calibration's, or either unknown), and the reading was taken against it.
    """

    baseline_sigma_px: float
    region_baseline_sigma_px: float
    source: str = "rig baseline"
    spectral: bool = False


def scale_to_pixel_size(sigma_px: float, from_pixel_nm: float | None, to_pixel_nm: float | None) -> float:
    """A blur fixed in nm, read as sigma_px at from_pixel_nm, in px at to_pixel_nm; unchanged if either is unknown."""
    if from_pixel_nm is None or to_pixel_nm is None:
        return sigma_px
    return sigma_px * from_pixel_nm / to_pixel_nm


def rig_reference(calibration: RigCalibration, pixel_size_nm: float | None = None) -> FocusReference:
    """The calibration's baselines for a tile of pixel_size_nm (nm; None: as calibrated).

    The rig's in-focus PSF is fixed in nm: baseline_px(tile) = baseline_px(cal) * cal_nm / tile_nm, and
    unchanged when either pixel size is unknown. The spectral reading serves the pixel sizes the reference
    can be rescaled to (spectral_scale).
    """
    cal_nm = calibration.pixel_size_nm
    return FocusReference(
        scale_to_pixel_size(calibration.baseline_sigma_px, cal_nm, pixel_size_nm),
        scale_to_pixel_size(calibration.region_baseline_sigma_px, cal_nm, pixel_size_nm),
        spectral=calibration.spectral is not None and spectral_scale(cal_nm, pixel_size_nm) is not None,
    )


def apply_calibration(
    assessment: BlurAssessment, reference: RigCalibration | FocusReference, cfg: DetectorConfig
) -> BlurAssessment:
    """The assessment with sigma, regions, score and label measured from an in-focus baseline.

    reference: a RigCalibration (its baselines as calibrated) or a FocusReference (scaled to the tile's pixel
    size, or a beam's own: appliance.detection.online_baseline). An `empty` tile and a "not judgeable" retake
    stay as they are (there is no estimate to correct). Other retake reasons are recomputed from the
    calibrated sigma; the model_version is kept, the reason says it is calibrated and baseline_sigma_px
    records the baseline used.
    """
    if not is_judged(assessment):
        return assessment
    if isinstance(reference, RigCalibration):
        reference = rig_reference(reference)
    baseline = reference.baseline_sigma_px
    regions = added_blur_px(region_sigma_px(assessment), reference.region_baseline_sigma_px)
    if reference.spectral and assessment.spectral_sigma_px is not None:
        worst = assessment.spectral_sigma_px
        sigma = worst if assessment.spectral_estimate_px is None else assessment.spectral_estimate_px
        note = (
            f"calibrated: added blur {sigma:.2f} px against the rig's in-focus spectrum (worst region and axis "
            f"{worst:.2f} px; {assessment.sigma_px:.2f} px read by the model, {reference.source} {baseline:.2f} px)"
        )
    else:
        worst = sigma = float(added_blur_px(assessment.sigma_px, baseline))
        note = (
            f"calibrated: {assessment.sigma_px:.2f} px read, {reference.source} {baseline:.2f} px "
            f"(quadrature), added blur {sigma:.2f} px"
        )
    # Sharp or not is the worst region's major axis: blur along one axis or in one quadrant is soft focus too.
    # Soft or retake, and the sigma restored with, is the blur estimate (appliance.spectral.estimate_added_blur).
    label = label_for_sigma(sigma, cfg)
    if worst <= cfg.sharp_sigma_px:
        label = "sharp"
    elif label == "sharp":
        label = "soft"
    if label != "retake" and _local_blur_beyond_repair(assessment, baseline, reference.spectral, cfg):
        # The spectrum reads the tile and its quadrants; a 1/16 spot beyond repair is the model's to find (its
        # local windows), confirmed by the windows' own spectra around it (folds and charging fool the model).
        label = "retake"
    reason = note
    if label == "retake" and assessment.label == "retake" and assessment.reason:
        reason = f"{assessment.reason}; {note}"  # e.g. partial blur: the region wording still holds
    elif label == "retake":
        reason = (
            f"blur sigma ~{sigma:.1f} px above this rig's in-focus baseline exceeds the restorable limit "
            f"{cfg.max_restorable_sigma_px:g} px (detector.max_restorable_sigma_px): refocus; {note}"
        )
    return replace(
        assessment,
        sigma_px=round(sigma, 3),
        blur_score=round(float(blur_score_from_sigma(sigma)), 4),
        label=label,
        region_scores=[[round(float(v), 4) for v in row] for row in np.asarray(blur_score_from_sigma(regions))],
        reason=reason,
        baseline_sigma_px=round(baseline, 3),
    )


def _local_blur_beyond_repair(
    assessment: BlurAssessment, baseline_px: float, spectral: bool, cfg: DetectorConfig
) -> bool:
    """The model's own retake for blur beyond repair in part of the tile, still beyond repair above the baseline
    and, with a spectral reference, around the region it names (no reading there: as blurred as can be)."""
    limit = cfg.max_restorable_sigma_px
    partial = assessment.label == "retake" and assessment.reason.startswith(PARTIAL_BLUR)
    spot = assessment.spectral_spot_sigma_px
    confirmed = not spectral or spot is None or spot > limit
    return partial and confirmed and float(added_blur_px(assessment.sigma_px, baseline_px)) > limit


def apply_to_all(
    assessments: Sequence[BlurAssessment], calibration: RigCalibration | None, cfg: DetectorConfig
) -> list[BlurAssessment]:
    """apply_calibration on each assessment, the tiles taken as of the calibration's pixel size; unchanged without
    a calibration."""
    if calibration is None:
        return list(assessments)
    return [apply_calibration(a, calibration, cfg) for a in assessments]


# ---------------------------------------------------------------------------------------------------
# Files


def save_calibration(calibration: RigCalibration, path: Path) -> None:
    """Write the calibration as JSON at `path` via temp file + rename (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(calibration.model_dump_json(indent=2))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_calibration(path: Path, model_version: str | None = None) -> RigCalibration:
    """Read and validate a calibration file; raise CalibrationError naming the file and the field.

    model_version: the running detector's; a calibration made with another model is refused (its
    baseline is in that model's sigma scale).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read calibration: {exc}") from exc
    try:
        calibration = RigCalibration.model_validate_json(text)
    except ValidationError as exc:
        raise CalibrationError(f"{path}: not a valid rig calibration: {exc}") from exc
    if model_version is not None and calibration.model_version != model_version:
        raise CalibrationError(
            f"{path}: made with detector {calibration.model_version!r}, running {model_version!r}; "
            "recalibrate with the running model"
        )
    return calibration


def load_configured_calibration(cfg: DetectorConfig, model_version: str | None = None) -> RigCalibration | None:
    """The calibration named by detector.calibration (None when unset), checked against the detector model.

    model_version: the running detector's; None reads the configured model's sidecar (the start-up check,
    before any model is loaded). Raises ConfigError naming the field and the file.
    """
    if cfg.calibration is None:
        return None
    version = model_version if model_version is not None else BlurDetector.configured_model_version(cfg)
    try:
        return load_calibration(cfg.calibration, version)
    except CalibrationError as exc:
        raise ConfigError(f"detector.calibration: {exc}") from exc
