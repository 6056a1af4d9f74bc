"""What the parts of the appliance hand each other about one tile (plain data, no I/O).

In the order a tile meets them: the detector's verdict (`BlurAssessment`, Serve "BlurDetectorDeployment"
-> ingest, deblur, sink, CLI), a restored tile (`RestoredTile`, Serve "DeblurDeployment" -> ingest) and
what the ingest learned (`TileOutcome`, ingest -> sink). The sink turns a TileOutcome into the QC record
(`appliance.qc_record`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # only names: the detector and the offline tools need neither Ray nor the wire protocol
    import ray

    from appliance.stream.protocol import TileHeader

TileLabel = Literal["sharp", "soft", "retake", "empty"]
# blur_score = tanh(sigma / SCORE_SCALE_PX): 0 = sharp, 0.32 at 1 px, 0.76 at 3 px, 0.96 at 6 px.
SCORE_SCALE_PX = 3.0
TILE_LABELS: tuple[TileLabel, ...] = ("sharp", "soft", "retake", "empty")


def blur_score_from_sigma(sigma_px: float | np.ndarray) -> float | np.ndarray:
    """Map a blur sigma (px, >= 0) to the blur score in [0, 1) (0 = sharp)."""
    return np.tanh(np.maximum(sigma_px, 0.0) / SCORE_SCALE_PX)


def sigma_from_blur_score(scores: np.ndarray) -> np.ndarray:
    """Inverse of blur_score_from_sigma (px), float64; clip scores below 1 first (1 is infinitely blurred)."""
    return np.arctanh(np.asarray(scores, dtype=np.float64)) * SCORE_SCALE_PX


@dataclass(frozen=True)
class BlurAssessment:
    """Focus verdict for one tile.

    blur_score: 0 = sharp ... 1 = very blurred.
    label: `sharp` (write as is) | `soft` (restore with the deblur model) | `retake` (beyond repair or
        not judgeable; flagged to the controller) | `empty` (no tissue: bare resin, beyond the section
        edge, blank; written as acquired, never restored or flagged).
    sigma_px: estimated blur as the Gaussian-equivalent PSF sigma in pixels (major axis).
    anisotropy: sigma_major / sigma_minor (1.0 = isotropic defocus, > 1 = astigmatism).
    angle_deg: orientation of the major axis, degrees in [0, 180).
    region_scores: coarse grid (rows of floats, e.g. 8x8) of blur_score per region, to catch partial blur.
    reason: why the label is `retake` or `empty` ("" otherwise), in words an operator understands.
    model_version: which detector produced this (recorded in the QC record).
    baseline_sigma_px: the in-focus baseline (px at this tile's pixel size) a calibrated verdict was measured
        from: the rig's, or the tile's beam's own (docs/calibration.md); None for an uncalibrated verdict.
    spectral_sigma_px: blur added to the rig's in-focus power spectrum (px, major axis), read when the detector
        holds a rig calibration with a spectral reference (appliance.spectral); None otherwise.
    spectral_estimate_px: with spectral_sigma_px, the blur estimate against the same spectrum (px): the
        isotropic sigma unless the blur is clearly elliptical, the worst quadrant only where it clearly stands
        out (appliance.spectral.estimate_added_blur). spectral_sigma_px, the worst region's major axis, decides
        that a tile is not sharp; this is the sigma a calibrated verdict reports and restores with.
    spectral_spot_sigma_px: for a partial-blur retake read with a spectral reference, the largest single-window
        reading around the region it names (px): what confirms the spot against the rig's spectrum.
    """

    blur_score: float
    label: TileLabel
    sigma_px: float
    anisotropy: float = 1.0
    angle_deg: float = 0.0
    region_scores: list[list[float]] = field(default_factory=list)
    reason: str = ""
    model_version: str = ""
    baseline_sigma_px: float | None = None
    spectral_sigma_px: float | None = None
    spectral_estimate_px: float | None = None
    spectral_spot_sigma_px: float | None = None

    def to_record(self) -> dict[str, Any]:
        """Plain dict for JSON/msgpack (QC record, CLI output); the calibrated fields only when set."""
        record = asdict(self)
        for key in ("baseline_sigma_px", "spectral_sigma_px", "spectral_estimate_px", "spectral_spot_sigma_px"):
            if record[key] is None:
                del record[key]
        return record


@dataclass(frozen=True)
class RestoredTile:
    """A restored tile left in the object store: the caller hands `pixels_ref` on without copying it.

    replica: which replica restored it; busy_s: its share of that replica's batch time (s), so the
    shares summed per replica are the replica's compute time (utilisation in the metrics).
    """

    pixels_ref: ray.ObjectRef
    model_version: str
    replica: str = ""
    busy_s: float = 0.0


# The `kind` of the `alarm` feedback (docs/protocol.md) a BlurShareAlarm becomes.
IMPLAUSIBLE_BLUR_SHARE = "implausible_blur_share"


@dataclass(frozen=True)
class BlurShareAlarm:
    """The ingest stopped restoring a section: too many of its tiles read soft or retake (stream.blur_share).

    Counts are the section's judged tiles up to and including the tile that tripped the rule; threshold and
    min_tiles are ingest.implausible_blur_share and ingest.implausible_blur_min_tiles; calibrated: whether
    the detector ran with a rig calibration (detector.calibration).
    """

    n_judged: int
    n_soft: int
    n_retake: int
    threshold: float
    min_tiles: int
    calibrated: bool

    @property
    def share(self) -> float:
        return (self.n_soft + self.n_retake) / self.n_judged

    def message(self, section: str) -> str:
        """What happened and what to do, in an operator's words (the alarm's `message`, the log line)."""
        what = (
            f"section {section}: {self.n_soft + self.n_retake} of {self.n_judged} tiles read soft or retake "
            f"({self.share:.0%} > {self.threshold:.0%}, ingest.implausible_blur_share): restoring is suspended "
            "for the rest of this section, soft tiles are written as acquired (restore_suspended)"
        )
        if not self.calibrated:
            return (
                f"{what}. The detector runs uncalibrated: calibrate it on this rig "
                "(python -m appliance calibrate, then detector.calibration) unless the section really is out of focus"
            )
        return f"{what}. Check the focus; if tiles that look sharp read soft, recalibrate (detector.calibration)"


# The `kind`s of the `alarm` feedback a FocusDriftAlarm becomes: a beam's focus drifted, and it came back.
FocusAlarmKind = Literal["focus_drift", "focus_ok"]
FOCUS_DRIFT: FocusAlarmKind = "focus_drift"
FOCUS_OK: FocusAlarmKind = "focus_ok"
# The beam of tiles whose header carries none (single-beam microscopes): one baseline for all of them.
NO_BEAM = "none"


@dataclass(frozen=True)
class FocusDriftAlarm:
    """A beam's running in-focus baseline left its reference (focus_drift) or came back (focus_ok).

    beam: the header's beam, None for tiles sent without one. baseline_sigma_px: the beam's running median
    of sharp-looking tiles; reference_sigma_px: the rig calibration's baseline, or without a calibration the
    beam's own first baseline; both px at pixel_size_nm (the tile that raised it). drift_log: their distance
    in log(sigma + 0.5 px); threshold: detector.online_baseline.drift_log_threshold.
    """

    kind: FocusAlarmKind
    beam: int | None
    baseline_sigma_px: float
    reference_sigma_px: float
    drift_log: float
    threshold: float
    pixel_size_nm: float
    n_tiles: int
    calibrated: bool

    def wire_fields(self) -> dict[str, Any]:
        """The alarm's keys besides the tile ids and `message` (docs/protocol.md, `focus_drift`)."""
        fields = asdict(self)
        del fields["n_tiles"]
        return fields

    @property
    def beam_name(self) -> str:
        return NO_BEAM if self.beam is None else str(self.beam)

    def message(self) -> str:
        """What happened and what to do, in an operator's words (the alarm's `message`, the log line)."""
        reference = "rig calibration" if self.calibrated else "its own first baseline"
        where = f"beam {self.beam_name}: in-focus blur baseline {self.baseline_sigma_px:.2f} px"
        if self.kind == FOCUS_OK:
            return f"{where} is back within the threshold of {reference} ({self.reference_sigma_px:.2f} px)"
        direction = "softer" if self.drift_log > 0 else "sharper"
        what = (
            f"{where} over its last {self.n_tiles} sharp-looking tiles, {direction} than {reference} "
            f"({self.reference_sigma_px:.2f} px) by {abs(self.drift_log):.2f} in log-sigma "
            f"(> {self.threshold:g}, detector.online_baseline.drift_log_threshold)"
        )
        if self.drift_log > 0:
            return f"{what}: check this beam's focus and stigmation"
        return f"{what}: the calibration no longer fits this beam; recalibrate (detector.calibration)"


@dataclass
class TileOutcome:
    """What the ingest learned about one tile, handed to the sink with the pixels.

    timings_s: seconds per stage the ingest timed (detect_s, deblur_s); failure: why processing failed
    ("" = it did not; the tile is then written as acquired). restore_suspended: a soft tile not restored
    because its section tripped the safety rule; alarm: set on the one tile that tripped it; focus_alarm: set
    on the tile whose beam's baseline drifted or came back (appliance.detection.online_baseline).
    """

    header: TileHeader
    t_received: float
    assessment: BlurAssessment | None = None
    deblur_version: str = ""
    failure: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    restore_suspended: bool = False
    alarm: BlurShareAlarm | None = None
    focus_alarm: FocusDriftAlarm | None = None
