"""The safety rule of a section (stream.blur_share): pure logic, and the QC line of a suspended tile."""

from __future__ import annotations

import json

import pytest

from appliance.messages import BlurShareAlarm, TileLabel
from appliance.qc_record import QcTileRecord
from appliance.stream.blur_share import BlurShareGuard

pytestmark = pytest.mark.fast


def feed(guard: BlurShareGuard, labels: list[TileLabel], calibrated: bool = False) -> list[BlurShareAlarm | None]:
    return [guard.observe(label, calibrated) for label in labels]


def test_rule_waits_for_min_tiles_then_trips_once_and_stays_suspended() -> None:
    guard = BlurShareGuard(threshold=0.5, min_tiles=4)
    alarms = feed(guard, ["soft", "soft", "retake"])
    assert alarms == [None, None, None] and not guard.suspended  # 100 % soft/retake, but only 3 tiles
    alarm = guard.observe("soft", calibrated=False)
    assert alarm is not None and guard.suspended
    assert (alarm.n_judged, alarm.n_soft, alarm.n_retake, alarm.share) == (4, 3, 1, 1.0)
    assert (alarm.threshold, alarm.min_tiles, alarm.calibrated) == (0.5, 4, False)
    # Once per section: sharp tiles after it neither lift the suspension nor raise another alarm.
    assert feed(guard, ["sharp"] * 20 + ["soft"]) == [None] * 21
    assert guard.suspended


def test_share_must_exceed_the_threshold_and_is_judged_on_every_tile_after_min_tiles() -> None:
    guard = BlurShareGuard(threshold=0.5, min_tiles=4)
    assert feed(guard, ["soft", "sharp", "soft", "sharp"]) == [None] * 4  # exactly 50 %: not above
    assert not guard.suspended
    assert guard.observe("retake", calibrated=True) is not None  # 3 of 5 = 60 %, later than min_tiles
    # A plausible section (a few percent soft) never trips.
    calm = BlurShareGuard(threshold=0.5, min_tiles=50)
    assert feed(calm, (["sharp"] * 19 + ["soft"]) * 50) == [None] * 1000


def test_threshold_one_switches_the_rule_off() -> None:
    guard = BlurShareGuard(threshold=1.0, min_tiles=1)
    assert feed(guard, ["soft"] * 100) == [None] * 100 and not guard.suspended


def test_alarm_message_says_what_happened_and_what_to_do() -> None:
    alarm = BlurShareAlarm(n_judged=50, n_soft=40, n_retake=2, threshold=0.5, min_tiles=50, calibrated=False)
    text = alarm.message("s0412")
    assert "section s0412: 42 of 50 tiles read soft or retake (84% > 50%" in text
    assert "restoring is suspended" in text and "python -m appliance calibrate" in text
    calibrated = BlurShareAlarm(n_judged=50, n_soft=40, n_retake=2, threshold=0.5, min_tiles=50, calibrated=True)
    assert "recalibrate" in calibrated.message("s0412")


def test_qc_line_carries_restore_suspended_only_when_set() -> None:
    base = dict(
        t=1.0, section="s", tile_id="t", seq=0, action="written", path="s/t.tif", shape=[64, 64],
        pixel_size_nm=4.0, stage_x_um=0.0, stage_y_um=0.0, t_acquired=1.0, label="soft",
    )  # fmt: skip
    assert "restore_suspended" not in json.loads(QcTileRecord(**base).to_json_line())  # type: ignore[arg-type]
    line = QcTileRecord(**base, restore_suspended=True).to_json_line()  # type: ignore[arg-type]
    assert json.loads(line)["restore_suspended"] is True
