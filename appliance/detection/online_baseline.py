"""Per-beam running in-focus baseline: focus-drift alarms, and each beam judged against its own zero point.

Most tiles of a section are in focus, so the median blur reading of a beam's sharp-looking tiles is that
beam's in-focus baseline. `OnlineBaseline` keeps one per beam (the header's `beam`; tiles without one
share the beam "none") for as long as the appliance runs: beams keep their focus across sections, so
nothing resets at a section boundary; a restart of the appliance (or of its ingest) starts afresh.

For every judged tile, with the *uncalibrated* detector reading:
1. The tile counts towards its beam's baseline when its reading is within `accept_log_margin` of the
   reference (in log(sigma + 0.5 px)): the rig calibration's baseline scaled to the tile's pixel size, or
   without a calibration the beam's own first baseline (the median of its first `min_tiles` tiles; until
   it has one, every judged tile counts). Readings are kept in nm (sigma_px x pixel_size_nm): the in-focus
   PSF is fixed in nm, so tiles of another pixel size feed the same baseline.
2. Drift: once the beam has `min_tiles` counted tiles, its running median (the last `window` of them) is
   compared with the reference; beyond `drift_log_threshold` one `focus_drift` alarm is raised for the
   excursion, and one `focus_ok` when the baseline is back within half the threshold (hysteresis, so a
   beam hovering at the threshold does not flap).
3. Label: with a rig calibration, a beam with `min_tiles` counted tiles is judged against its own
   baseline, clamped to the calibration's baseline +- `drift_log_threshold` (in log(sigma + 0.5 px)): a
   slowly defocusing beam cannot drag its zero point along further than the drift alarm allows. Before
   that, the calibration's baseline (scaled to the pixel size). Without a calibration the verdict stays
   the detector's own (drift alarms only).

Pure logic (no I/O): the ingest keeps one and asks it about every verdict, before the verdict decides
restore or retake; the alarm travels with the tile's outcome to the sink, which sends it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from appliance.config import DetectorConfig
from appliance.detection.calibration import (
    FocusReference,
    RigCalibration,
    apply_calibration,
    rig_reference,
)
from appliance.detection.detector import LOG_SIGMA_OFFSET_PX, is_judged
from appliance.messages import FOCUS_DRIFT, FOCUS_OK, NO_BEAM, BlurAssessment, FocusAlarmKind, FocusDriftAlarm

# A drifting beam is back in focus once its drift is within this fraction of the threshold.
CLEAR_FRACTION = 0.5


def log_sigma(sigma_px: float) -> float:
    """log(sigma + 0.5 px): the scale on which the detector's in-focus spread is even (calibration.py)."""
    return math.log(sigma_px + LOG_SIGMA_OFFSET_PX)


def sigma_from_log(log: float) -> float:
    """Inverse of log_sigma (px), never below 0."""
    return max(0.0, math.exp(log) - LOG_SIGMA_OFFSET_PX)


def drift_log(baseline_px: float, reference_px: float) -> float:
    """How far a running baseline is from its reference, log(sigma + 0.5 px) units (> 0: softer)."""
    return log_sigma(baseline_px) - log_sigma(reference_px)


def clamp_baseline_px(baseline_px: float, reference_px: float, max_log_shift: float) -> float:
    """baseline_px bounded to reference_px +- max_log_shift in log(sigma + 0.5 px), px."""
    low, high = log_sigma(reference_px) - max_log_shift, log_sigma(reference_px) + max_log_shift
    return sigma_from_log(min(max(log_sigma(baseline_px), low), high))


@dataclass
class BeamBaseline:
    """One beam's counted readings (nm, newest last), its own first baseline (nm) and its excursion state."""

    sigmas_nm: deque[float]
    first_nm: float | None = None
    drifting: bool = False

    def median_nm(self) -> float:
        return float(np.median(self.sigmas_nm))


@dataclass(frozen=True)
class OnlineVerdict:
    """The verdict to act on (calibrated against the beam's or the rig's baseline) and the alarm, if any."""

    assessment: BlurAssessment
    alarm: FocusDriftAlarm | None = None


@dataclass
class OnlineBaseline:
    """Running in-focus baseline per beam of one tile stream (one microscope); see the module docstring.

    cfg: the detector's thresholds (labels) and detector.online_baseline; calibration: the rig's, or None.
    """

    cfg: DetectorConfig
    calibration: RigCalibration | None = None
    _beams: dict[int | None, BeamBaseline] = field(default_factory=dict, init=False)

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def observe(self, beam: int | None, pixel_size_nm: float, assessment: BlurAssessment) -> OnlineVerdict:
        """Count one uncalibrated verdict of a tile of `beam` (pixel_size_nm > 0); the verdict to act on.

        Raises ValueError for a reading that is not a finite sigma >= 0 or a pixel size <= 0.
        """
        if not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
            raise ValueError(f"OnlineBaseline.observe: beam {beam} pixel_size_nm={pixel_size_nm}; must be > 0")
        if not is_judged(assessment):
            return OnlineVerdict(assessment)
        if not (math.isfinite(assessment.sigma_px) and assessment.sigma_px >= 0):
            raise ValueError(f"OnlineBaseline.observe: beam {beam} sigma_px={assessment.sigma_px}; must be >= 0")
        if not self.cfg.online_baseline.enabled:
            return OnlineVerdict(self._judge(assessment, beam, None, pixel_size_nm))
        state = self._beams.setdefault(beam, BeamBaseline(deque(maxlen=self.cfg.online_baseline.window)))
        self._count(state, assessment.sigma_px, pixel_size_nm)
        baseline_px = self.baseline_px(beam, pixel_size_nm)
        alarm = self._excursion(state, beam, baseline_px, pixel_size_nm)
        return OnlineVerdict(self._judge(assessment, beam, baseline_px, pixel_size_nm), alarm)

    def baseline_px(self, beam: int | None, pixel_size_nm: float) -> float | None:
        """The beam's running median (px at pixel_size_nm), or None before min_tiles counted tiles."""
        state = self._beams.get(beam)
        if state is None or len(state.sigmas_nm) < self.cfg.online_baseline.min_tiles:
            return None
        return state.median_nm() / pixel_size_nm

    def reference_px(self, beam: int | None, pixel_size_nm: float) -> float | None:
        """What the beam's baseline is compared with (px at pixel_size_nm): the calibration's baseline, or the
        beam's own first baseline without one (None until it has it)."""
        return self._reference_of(self._beams.get(beam), pixel_size_nm)

    def drifting_beams(self) -> list[int | None]:
        """Beams in a drift excursion now (alarm sent, not cleared)."""
        return [beam for beam, state in self._beams.items() if state.drifting]

    def _count(self, state: BeamBaseline, sigma_px: float, pixel_size_nm: float) -> None:
        margin = self.cfg.online_baseline.accept_log_margin
        reference_px = self._reference_of(state, pixel_size_nm)
        if reference_px is not None and abs(drift_log(sigma_px, reference_px)) > margin:
            return  # clearly blurred (or far off): it must not move the baseline
        state.sigmas_nm.append(sigma_px * pixel_size_nm)
        if state.first_nm is None and len(state.sigmas_nm) >= self.cfg.online_baseline.min_tiles:
            state.first_nm = state.median_nm()

    def _reference_of(self, state: BeamBaseline | None, pixel_size_nm: float) -> float | None:
        if self.calibration is not None:
            return rig_reference(self.calibration, pixel_size_nm).baseline_sigma_px
        return None if state is None or state.first_nm is None else state.first_nm / pixel_size_nm

    def _excursion(
        self, state: BeamBaseline, beam: int | None, baseline_px: float | None, pixel_size_nm: float
    ) -> FocusDriftAlarm | None:
        """focus_drift once when the beam leaves its reference, focus_ok once when it is back (hysteresis)."""
        reference_px = self._reference_of(state, pixel_size_nm)
        if baseline_px is None or reference_px is None:
            return None
        threshold = self.cfg.online_baseline.drift_log_threshold
        drift = drift_log(baseline_px, reference_px)
        kind: FocusAlarmKind
        if not state.drifting and abs(drift) > threshold:
            state.drifting = True
            kind = FOCUS_DRIFT
        elif state.drifting and abs(drift) <= CLEAR_FRACTION * threshold:
            state.drifting = False
            kind = FOCUS_OK
        else:
            return None
        return FocusDriftAlarm(
            kind=kind,
            beam=beam,
            baseline_sigma_px=round(baseline_px, 3),
            reference_sigma_px=round(reference_px, 3),
            drift_log=round(drift, 4),
            threshold=threshold,
            pixel_size_nm=pixel_size_nm,
            n_tiles=len(state.sigmas_nm),
            calibrated=self.calibrated,
        )

    def _judge(
        self, assessment: BlurAssessment, beam: int | None, baseline_px: float | None, pixel_size_nm: float
    ) -> BlurAssessment:
        """Calibrated against the beam's own baseline (clamped) when it has one, else the rig's; raw uncalibrated."""
        if self.calibration is None:
            return assessment
        return apply_calibration(assessment, self.label_reference(beam, baseline_px, pixel_size_nm), self.cfg)

    def label_reference(self, beam: int | None, baseline_px: float | None, pixel_size_nm: float) -> FocusReference:
        """The zero point a calibrated tile of `beam` is judged against (px at pixel_size_nm).

        The rig's baseline scaled to the pixel size; with the beam's own baseline_px, that one, clamped to
        the rig's +- drift_log_threshold, the region baseline scaled by the same factor.
        """
        assert self.calibration is not None
        rig = rig_reference(self.calibration, pixel_size_nm)
        if baseline_px is None:
            return rig
        own = clamp_baseline_px(baseline_px, rig.baseline_sigma_px, self.cfg.online_baseline.drift_log_threshold)
        ratio = own / rig.baseline_sigma_px if rig.baseline_sigma_px > 0 else 1.0
        name = NO_BEAM if beam is None else str(beam)
        return FocusReference(own, rig.region_baseline_sigma_px * ratio, f"beam {name} baseline", rig.spectral)
