"""Per-beam running baseline: counting, drift alarms once per excursion, bounded labels, pixel size."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.config import DetectorConfig, OnlineBaselineConfig
from appliance.detection.calibration import MIN_TILES, RigCalibration, TileStats, calibration_from_stats
from appliance.detection.online_baseline import (
    OnlineBaseline,
    clamp_baseline_px,
    drift_log,
    log_sigma,
    sigma_from_log,
)
from appliance.messages import BlurAssessment, FocusDriftAlarm, blur_score_from_sigma

pytestmark = pytest.mark.fast

ONLINE = OnlineBaselineConfig(window=10, min_tiles=5, accept_log_margin=1.2, drift_log_threshold=0.25)
CFG = DetectorConfig(online_baseline=ONLINE)


def _calibration(baseline: float = 1.5, pixel_size_nm: float | None = 4.0) -> RigCalibration:
    stats = [
        TileStats(
            name=f"t{i}.png",
            shape=(512, 512),
            dtype="uint8",
            sigma_px=baseline,
            region_sigma_median_px=baseline,
            anisotropy=1.0,
            noise_level=0.01,
            mean_level=0.5,
            contrast=0.15,
            skewness=-0.3,
        )
        for i in range(MIN_TILES)
    ]
    return calibration_from_stats(stats, "blurnet-test", pixel_size_nm)


def _raw(sigma_px: float, label: str = "soft", reason: str = "") -> BlurAssessment:
    score = float(blur_score_from_sigma(sigma_px))
    return BlurAssessment(
        blur_score=score,
        label=label,  # type: ignore[arg-type]
        sigma_px=sigma_px,
        region_scores=[[score] * 8] * 8,
        reason=reason,
        model_version="blurnet-test",
    )


def _feed(online: OnlineBaseline, beam: int | None, sigmas: list[float], pixel_nm: float = 4.0) -> list[object]:
    """Observe each reading; the alarms raised, in order (None where none)."""
    return [online.observe(beam, pixel_nm, _raw(s)).alarm for s in sigmas]


def _alarms(results: list[object]) -> list[FocusDriftAlarm]:
    return [a for a in results if isinstance(a, FocusDriftAlarm)]


def test_log_scale_helpers_and_clamp() -> None:
    assert sigma_from_log(log_sigma(1.5)) == pytest.approx(1.5)
    assert drift_log(1.5, 1.5) == 0.0 and drift_log(2.0, 1.5) > 0 > drift_log(1.0, 1.5)
    assert clamp_baseline_px(1.6, 1.5, 0.25) == pytest.approx(1.6)  # within the bound: its own
    assert clamp_baseline_px(5.0, 1.5, 0.25) == pytest.approx(2.0 * np.exp(0.25) - 0.5)  # 2.07 px at most
    assert clamp_baseline_px(0.0, 1.5, 0.25) == pytest.approx(2.0 * np.exp(-0.25) - 0.5)
    assert sigma_from_log(-5.0) == 0.0


def test_each_beam_has_its_own_baseline_and_blurred_tiles_do_not_count() -> None:
    online = OnlineBaseline(CFG, _calibration(1.5))
    rng = np.random.default_rng(3)
    _feed(online, 1, [float(1.5 * np.exp(rng.normal(0, 0.05))) for _ in range(8)])
    _feed(online, 2, [1.8] * 4)
    assert online.baseline_px(1, 4.0) == pytest.approx(1.5, rel=0.05)
    assert online.baseline_px(2, 4.0) is None  # 4 < min_tiles
    assert online.baseline_px(3, 4.0) is None
    # 8 px is beyond the accept margin (6.1 px from 1.5 px): no in-focus reading, it does not count.
    before = online.baseline_px(1, 4.0)
    _feed(online, 1, [8.0] * 20)
    assert online.baseline_px(1, 4.0) == before
    # Tiles without a beam share one baseline ("none").
    _feed(online, None, [1.4] * 5)
    assert online.baseline_px(None, 4.0) == pytest.approx(1.4)


def test_drift_alarm_once_per_excursion_then_a_clearing_message() -> None:
    online = OnlineBaseline(CFG, _calibration(1.5))
    assert _alarms(_feed(online, 7, [1.5] * 10)) == []
    assert _alarms(_feed(online, 0, [1.5] * 10)) == []
    drifting = _alarms(_feed(online, 7, [2.4] * 10))  # beam 7 goes soft; beam 0 stays in focus
    assert len(drifting) == 1
    alarm = drifting[0]
    assert (alarm.kind, alarm.beam, alarm.calibrated, alarm.threshold) == ("focus_drift", 7, True, 0.25)
    assert alarm.reference_sigma_px == 1.5 and alarm.baseline_sigma_px == 2.4 and alarm.drift_log > 0.25
    assert "beam 7" in alarm.message() and "check this beam's focus" in alarm.message()
    assert online.drifting_beams() == [7]
    assert _alarms(_feed(online, 0, [1.5] * 5)) == []  # another beam is not affected
    back = _alarms(_feed(online, 7, [1.5] * 10))
    assert [a.kind for a in back] == ["focus_ok"] and online.drifting_beams() == []
    assert "back within the threshold" in back[0].message()
    assert set(back[0].wire_fields()) == {
        "kind",
        "beam",
        "baseline_sigma_px",
        "reference_sigma_px",
        "drift_log",
        "threshold",
        "pixel_size_nm",
        "calibrated",
    }


def test_hysteresis_a_beam_hovering_at_the_threshold_does_not_flap() -> None:
    online = OnlineBaseline(CFG, _calibration(1.5))
    just_over = sigma_from_log(log_sigma(1.5) + 0.26)
    just_under = sigma_from_log(log_sigma(1.5) + 0.24)
    results = _feed(online, 1, [just_over] * 10 + [just_under] * 10 + [just_over] * 10)
    assert [a.kind for a in _alarms(results)] == ["focus_drift"]


def test_a_drifting_beam_is_judged_against_its_own_baseline_but_only_up_to_the_bound() -> None:
    online = OnlineBaseline(CFG, _calibration(1.5))
    _feed(online, 1, [1.7] * 10)  # beam 1's own in-focus reading is a little softer than the rig's
    own = online.observe(1, 4.0, _raw(1.7)).assessment
    assert (own.label, own.sigma_px, own.baseline_sigma_px) == ("sharp", 0.0, 1.7)
    assert "beam 1 baseline 1.70 px" in own.reason
    # A beam that drifted far: its zero point stops at calibration + threshold (2.07 px), so its tiles
    # still read soft instead of being called sharp by a baseline that followed the defocus.
    _feed(online, 2, [3.0] * 10)
    drifted = online.observe(2, 4.0, _raw(3.0)).assessment
    bound = sigma_from_log(log_sigma(1.5) + 0.25)
    assert drifted.baseline_sigma_px == pytest.approx(bound, abs=1e-3)
    assert drifted.label == "soft" and drifted.sigma_px == pytest.approx(np.sqrt(9.0 - bound**2), abs=1e-3)
    # A beam without min_tiles yet is judged against the rig's baseline.
    first = online.observe(3, 4.0, _raw(1.7)).assessment
    assert first.baseline_sigma_px == 1.5 and "rig baseline 1.50 px" in first.reason


def test_pixel_size_scales_the_reference_and_the_running_baseline_is_kept_in_nm() -> None:
    online = OnlineBaseline(CFG, _calibration(1.5, pixel_size_nm=4.0))
    # The same in-focus PSF (6 nm) read at 2 nm pixels is 3 px: in focus, no drift.
    verdicts = [online.observe(0, 2.0, _raw(3.0)) for _ in range(10)]
    assert all(v.alarm is None for v in verdicts)
    assert verdicts[-1].assessment.label == "sharp" and verdicts[-1].assessment.baseline_sigma_px == 3.0
    # The beam's baseline is 6 nm: 1.5 px at 4 nm pixels, 3 px at 2 nm.
    assert online.baseline_px(0, 4.0) == pytest.approx(1.5) and online.baseline_px(0, 2.0) == pytest.approx(3.0)
    assert online.reference_px(0, 8.0) == pytest.approx(0.75)
    # A calibration without a pixel size: px as calibrated, whatever the tile's pixel size.
    unknown = OnlineBaseline(CFG, _calibration(1.5, pixel_size_nm=None))
    assert unknown.observe(0, 2.0, _raw(3.0)).assessment.label == "soft"


def test_without_calibration_drift_is_measured_from_the_beams_first_baseline_and_labels_are_kept() -> None:
    online = OnlineBaseline(CFG, None)
    raw = _raw(0.9)
    verdict = online.observe(4, 4.0, raw)
    assert verdict.assessment is raw  # no relabelling without a rig calibration
    assert online.reference_px(4, 4.0) is None
    _feed(online, 4, [0.9] * 4)
    assert online.reference_px(4, 4.0) == pytest.approx(0.9)  # the median of its first min_tiles tiles
    alarms = _alarms(_feed(online, 4, [1.6] * 10))
    assert [(a.kind, a.calibrated, a.reference_sigma_px) for a in alarms] == [("focus_drift", False, 0.9)]
    assert "its own first baseline" in alarms[0].message()


def test_empty_and_unjudgeable_tiles_are_passed_on_and_not_counted() -> None:
    online = OnlineBaseline(CFG, _calibration(1.5))
    empty = _raw(0.0, label="empty", reason="no tissue")
    unjudgeable = _raw(9.0, label="retake", reason="not judgeable: too dark")
    assert online.observe(0, 4.0, empty).assessment is empty
    assert online.observe(0, 4.0, unjudgeable).assessment is unjudgeable
    assert online.baseline_px(0, 4.0) is None and online.drifting_beams() == []
    with pytest.raises(ValueError, match="pixel_size_nm=0.0"):
        online.observe(0, 0.0, _raw(1.5))
    with pytest.raises(ValueError, match="sigma_px=nan"):
        online.observe(0, 4.0, _raw(float("nan")))


def test_switched_off_it_only_calibrates() -> None:
    off = DetectorConfig(online_baseline=OnlineBaselineConfig(enabled=False))
    online = OnlineBaseline(off, _calibration(1.5))
    results = [online.observe(0, 4.0, _raw(3.0)) for _ in range(300)]
    assert all(r.alarm is None for r in results) and online.baseline_px(0, 4.0) is None
    assert results[-1].assessment.baseline_sigma_px == 1.5


def test_config_refuses_min_tiles_above_window() -> None:
    with pytest.raises(ValueError, match="min_tiles .* must not exceed .*window"):
        OnlineBaselineConfig(window=5, min_tiles=6)
