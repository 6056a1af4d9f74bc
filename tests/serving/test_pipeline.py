"""The running appliance end to end: real Ray Serve, real ZeroMQ on loopback, real files."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import (
    ConfigError,
    DeblurConfig,
    DetectorConfig,
    IngestConfig,
    MetricsConfig,
    OnlineBaselineConfig,
    OutputConfig,
    RigConfig,
)
from appliance.detection.calibration import RestorationBlend, calibrate, save_calibration
from appliance.detection.detector import BlurDetector
from appliance.qc_record import QC_FILENAME, QcRejection, QcTileRecord, read_qc_lines
from appliance.restoration.restorer import CLASSICAL_VERSION
from appliance.serving.pipeline import Appliance
from appliance.stream.protocol import encode_end, encode_start
from appliance.tile_io import read_tile
from appliance.tools.reference_controller import ReferenceController, cycle_tiles, tile_frames
from models.blur_synth import DATA_DIR, BlurParams, apply_blur, quantize, to_unit_float

pytestmark = pytest.mark.system

LOOPBACK = dict(tile_endpoint="tcp://127.0.0.1:*", feedback_endpoint="tcp://127.0.0.1:*")


KERNEL_BUFFER_BYTES = 64 * 1024


def rig(tmp_path: Path, **ingest: object) -> RigConfig:
    return RigConfig(
        ingest=IngestConfig(**{**LOOPBACK, **ingest}),  # type: ignore[arg-type]
        output=OutputConfig(directory=tmp_path / "out"),
        metrics=MetricsConfig(address="127.0.0.1:0"),  # a free port: tests never collide with a running rig
    )


def tile_records(output_dir: Path) -> list[QcTileRecord]:
    return [r for r in read_qc_lines(output_dir / QC_FILENAME) if isinstance(r, QcTileRecord)]


def rejections(output_dir: Path) -> list[QcRejection]:
    return [r for r in read_qc_lines(output_dir / QC_FILENAME) if isinstance(r, QcRejection)]


def test_replay_of_120_tiles_arrives_complete_once_each(
    start_appliance: Callable[..., object], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    appliance = start_appliance(rig(tmp_path))
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        report = controller.send_section("s1", cycle_tiles(real_em_tiles, 120), rate_hz=None, timeout_s=180)
    assert (report.sent, report.done, report.lost, report.duplicated) == (120, 120, 0, 0)
    assert report.section_done is not None and report.section_done["n_done"] == 120
    assert report.section_done["n_expected"] == 120
    assert report.retake_flags == report.results["retake"]

    out = Path(endpoints.output_dir)
    records = [r for r in tile_records(out) if r.section == "s1"]
    assert sorted(r.seq for r in records) == list(range(120))
    for record in records:
        written = read_tile(out / record.path)
        assert written.shape == (512, 512) and written.dtype == np.uint8
        if record.action == "restored":
            assert record.original_path and (out / record.original_path).is_file()
    # No half-written temp files are left behind.
    assert not list(out.rglob("*.part"))
    # A sharp tile is delivered bit-identical to what was sent.
    sharp = next(r for r in records if r.label == "sharp")
    sent = dict(cycle_tiles(real_em_tiles, 120))[sharp.tile_id]
    np.testing.assert_array_equal(read_tile(out / sharp.path), sent)


def test_fast_controller_is_slowed_not_dropped(
    start_appliance: Callable[..., object], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    # Kernel buffers bounded on both ends (the test tiles are 256 KiB, a real one 5.6 MB): the OS's own autotune
    # up to tens of MB and could swallow all 40 tiles (10 MiB) before the controller's send had to wait.
    cfg = rig(tmp_path, max_in_flight=3, receive_hwm=1, receive_buffer_bytes=KERNEL_BUFFER_BYTES)
    # Serve queues so short that Serve itself rejects calls: the ingest must retry them.
    tight = dict(num_replicas=1, max_ongoing_requests=1, max_queued_requests=1, max_batch_size=1)
    # The deblur replica also warms up on a tile of the section's shape before it reports ready.
    deblur = DeblurConfig(**tight, warmup_tile_shape=(512, 512))
    cfg = cfg.model_copy(update={"detector": DetectorConfig(**tight), "deblur": deblur})
    appliance = start_appliance(cfg)
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    controller = ReferenceController(
        endpoints.tile, endpoints.feedback, send_hwm=1, send_buffer_bytes=KERNEL_BUFFER_BYTES
    )
    with controller:
        report = controller.send_section("fast", cycle_tiles(real_em_tiles, 40), rate_hz=None, timeout_s=180)
    stats = appliance.stats()["ingest"]  # type: ignore[attr-defined]
    assert (report.done, report.lost, report.duplicated) == (40, 0, 0)
    assert stats["max_in_flight_seen"] <= 3
    assert stats["backpressure_retries"] > 0
    assert report.send_blocked_s > 0.2, "the controller's send should have blocked while the appliance was full"


def test_each_bad_input_gets_its_error_and_the_stream_continues(
    start_appliance: Callable[..., object], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    appliance = start_appliance(rig(tmp_path, max_tile_bytes=600_000))
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    good = real_em_tiles[0][1]
    good_frames = tile_frames("bad", "good_0", 0, good)
    header = bytes(good_frames[0])
    fields = msgpack.unpackb(header)
    bad_messages: list[tuple[str, list[bytes | memoryview]]] = [
        ("bad_message", [b"\xc1 not msgpack"]),
        ("unknown_version", [msgpack.packb({**fields, "v": 7, "seq": 101}), good_frames[1]]),
        ("bad_field", [msgpack.packb({**fields, "dtype": "float64", "seq": 102}), good_frames[1]]),
        ("bad_frame", [msgpack.packb({**fields, "seq": 103}), bytes(good_frames[1])[:1000]]),
        ("oversized", tile_frames("bad", "big", 104, np.tile(good, (2, 2)))),
        ("duplicate_seq", [msgpack.packb({**fields, "tile_id": "other"}), good_frames[1]]),
        ("bad_pixels", tile_frames("bad", "blank", 105, np.full((512, 512), 7, np.uint8))),
    ]
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        controller.send_raw(good_frames)
        for _, frames in bad_messages:
            controller.send_raw(frames)
        controller.send_raw(tile_frames("bad", "good_1", 1, real_em_tiles[1][1]))
        assert controller.wait_for(
            lambda fb: sum(m["type"] == "result" for m in fb) == 2 and sum(m["type"] == "error" for m in fb) == 7,
            timeout_s=60,
        ), controller.feedback()
        # An empty section (start, end, no tiles) is still closed with its counts.
        controller.send_raw(encode_start("empty"))
        controller.send_raw(encode_end("empty", 0))
        assert controller.wait_for(
            lambda fb: any(m["type"] == "section_done" and m["section"] == "empty" for m in fb), timeout_s=30
        )
        feedback = controller.feedback()
    empty_done = next(m for m in feedback if m["type"] == "section_done" and m["section"] == "empty")
    assert (empty_done["n_done"], empty_done["n_expected"]) == (0, 0)
    errors = [m for m in feedback if m["type"] == "error"]
    assert sorted(m["code"] for m in errors) == sorted(code for code, _ in bad_messages)
    truncated = next(m for m in errors if m["code"] == "bad_frame")
    assert (truncated["section"], truncated["seq"]) == ("bad", 103)
    assert {m["tile_id"] for m in feedback if m["type"] == "result"} == {"good_0", "good_1"}
    rejected = rejections(Path(endpoints.output_dir))
    assert sorted(r.code for r in rejected) == sorted(code for code, _ in bad_messages)
    # The duplicate did not overwrite the first tile's file (kept as acquired in originals/ if restored).
    section_dir = Path(endpoints.output_dir) / "bad"
    as_acquired = section_dir / "originals" / "good_0.tif"
    np.testing.assert_array_equal(read_tile(as_acquired if as_acquired.exists() else section_dir / "good_0.tif"), good)


@pytest.mark.parametrize("dtype", [np.uint16])
def test_16_bit_tiles_keep_their_dtype_through_the_pipeline(
    start_appliance: Callable[..., object],
    tmp_path: Path,
    real_em_tiles: list[tuple[str, np.ndarray]],
    dtype: type,
) -> None:
    appliance = start_appliance(rig(tmp_path))
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    tiles16 = [(name, pixels.astype(dtype) * 257) for name, pixels in real_em_tiles]
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        report = controller.send_section("s16", iter(tiles16), rate_hz=None, timeout_s=120)
    assert (report.done, report.lost) == (len(tiles16), 0)
    for record in tile_records(Path(endpoints.output_dir)):
        written = read_tile(Path(endpoints.output_dir) / record.path)
        assert written.dtype == np.uint16 and written.shape == (512, 512)


def _soft_tiles(real_em_tiles: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    return [(name, pixels) for name, pixels in real_em_tiles if name.startswith("soft")]


def test_implausible_blur_share_suspends_restoring_and_raises_one_alarm(
    start_appliance: Callable[..., object], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    # One credit: tiles are judged in seq order, so the rule trips exactly at the 4th soft tile.
    cfg = rig(tmp_path, max_in_flight=1, implausible_blur_share=0.5, implausible_blur_min_tiles=4)
    cfg = cfg.model_copy(update={"deblur": DeblurConfig(backend="classical")})
    appliance = start_appliance(cfg)
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    sent = dict(cycle_tiles(_soft_tiles(real_em_tiles), 10))
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        report = controller.send_section("storm", iter(sent.items()), rate_hz=None, timeout_s=180)
        # The next section starts with a clean slate: its soft tile is restored again.
        calm = controller.send_section("calm", cycle_tiles(_soft_tiles(real_em_tiles), 1), rate_hz=None)
        feedback = controller.feedback()
    assert (report.done, report.lost, report.duplicated) == (10, 0, 0)
    assert calm.actions == {"restored": 1}
    alarms = [m for m in feedback if m["type"] == "alarm"]
    assert len(alarms) == 1
    alarm = alarms[0]
    assert (alarm["kind"], alarm["section"], alarm["seq"]) == ("implausible_blur_share", "storm", 3)
    assert (alarm["n_judged"], alarm["n_soft"], alarm["n_retake"], alarm["share"]) == (4, 4, 0, 1.0)
    assert (alarm["threshold"], alarm["min_tiles"], alarm["calibrated"]) == (0.5, 4, False)
    assert "restoring is suspended" in alarm["message"] and "uncalibrated" in alarm["message"]
    # The alarm is sent just before the result of the tile that tripped it.
    storm = [m for m in feedback if m.get("section") == "storm" and m["type"] in ("alarm", "result")]
    assert storm.index(alarm) == 3 and storm[4]["seq"] == 3
    out = Path(endpoints.output_dir)
    records = sorted((r for r in tile_records(out) if r.section == "storm"), key=lambda r: r.seq)
    assert [r.label for r in records] == ["soft"] * 10
    assert [r.action for r in records] == ["restored"] * 3 + ["written"] * 7  # none restored after the alarm
    assert [bool(r.restore_suspended) for r in records] == [False] * 3 + [True] * 7
    for record in records[3:]:  # written as acquired, no original kept
        np.testing.assert_array_equal(read_tile(out / record.path), sent[record.tile_id])
        assert record.original_path is None
    with urllib.request.urlopen(endpoints.metrics, timeout=15) as response:
        metrics = {f.name: f.samples for f in text_string_to_metric_families(response.read().decode())}
    alarms = {(s.labels["kind"], s.labels["microscope"]): s.value for s in metrics["em_appliance_alarms"]}
    assert alarms == {("implausible_blur_share", "rig"): 1, ("focus_drift", "rig"): 0, ("focus_ok", "rig"): 0}
    assert [s.value for s in metrics["em_appliance_restore_suspended_tiles"] if s.name.endswith("_total")] == [7]
    assert [s.value for s in metrics["em_appliance_detector_calibrated"]] == [0]
    results = [m for m in feedback if m["type"] == "result" and m["section"] == "storm"]
    assert [m.get("restore_suspended", False) for m in sorted(results, key=lambda m: m["seq"])] == [False] * 3 + [
        True
    ] * 7


def test_calibration_is_applied_in_the_running_appliance_and_checked_at_start(
    start_appliance: Callable[..., object], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    isbi = [read_tile(DATA_DIR / f"{i}.png") for i in range(6)]
    measured = calibrate(isbi, [f"{i}.png" for i in range(6)], BlurDetector.from_config(DetectorConfig()))
    # A rig whose own in-focus blur is 2.5 px: the 1.5-2 px soft samples are in focus on it. Its calibration
    # has no spectral reference (as a version-1 file, or tiles < 128 px): the quadrature rule judges.
    path = tmp_path / "calibration.json"
    rig_2_5 = {"baseline_sigma_px": 2.5, "region_baseline_sigma_px": 2.5, "spectral": None, "mapping": "quadrature"}
    save_calibration(measured.model_copy(update=rig_2_5), path)
    cfg = rig(tmp_path)
    cfg = cfg.model_copy(update={"detector": DetectorConfig(calibration=path)})
    appliance = start_appliance(cfg)
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        report = controller.send_section("cal", cycle_tiles(_soft_tiles(real_em_tiles), 4), rate_hz=None)
    assert (report.done, report.lost) == (4, 0)
    records = tile_records(Path(endpoints.output_dir))
    assert {r.label for r in records} == {"sharp"}, [(r.sigma_px, r.reason) for r in records]
    assert all(r.reason and r.reason.startswith("calibrated: ") and "rig baseline 2.50 px" in r.reason for r in records)
    # A calibration of another detector model is refused before anything starts, naming field and file.
    other = tmp_path / "other.json"
    save_calibration(measured.model_copy(update={"model_version": "blurnet-v0"}), other)
    refused = cfg.model_copy(update={"detector": DetectorConfig(calibration=other)})
    with pytest.raises(ConfigError, match=rf"detector\.calibration: {other}: made with detector 'blurnet-v0'"):
        Appliance(refused).start()


def test_tiles_of_another_pixel_size_are_judged_and_restored_against_the_rig_spectrum_rescaled_to_it(
    start_appliance: Callable[..., object], tmp_path: Path
) -> None:
    """A rig calibrated at 4 nm images a section at 6 nm: its tiles are read against the rig's spectrum rescaled
    to 6 nm and soft ones restored with the rig Wiener at 6 nm; at 10 nm (beyond 2x) the quadrature rule judges
    and the model restores alone."""
    isbi = [read_tile(DATA_DIR / f"{i}.png") for i in range(6)]
    measured = calibrate(isbi[:5], [f"{i}.png" for i in range(5)], BlurDetector.from_config(DetectorConfig()), 4.0)
    blend = RestorationBlend(deblur_model=CLASSICAL_VERSION, model_weight=0.25, psnr_db={"0.25": 30.0}, probes=1)
    path = tmp_path / "calibration.json"
    save_calibration(measured.model_copy(update={"restoration": blend}), path)
    cfg = rig(tmp_path)
    cfg = cfg.model_copy(
        update={"detector": DetectorConfig(calibration=path), "deblur": DeblurConfig(backend="classical")}
    )
    appliance = start_appliance(cfg)
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    coarse = [cv2.resize(t, (341, 341), interpolation=cv2.INTER_AREA) for t in isbi[4:6]]  # 4 nm -> 6 nm
    blurred = [quantize(apply_blur(to_unit_float(c), BlurParams("gaussian", 2.5))) for c in coarse]
    tiles = [("sharp0", coarse[0]), ("sharp1", coarse[1]), ("soft0", blurred[0]), ("soft1", blurred[1])]
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        for section, pixel_nm in (("at6", 6.0), ("at10", 10.0)):
            report = controller.send_section(section, iter(tiles), rate_hz=None, pixel_size_nm=pixel_nm)
            assert (report.done, report.lost) == (4, 0)
    records = {(r.section, r.tile_id): r for r in tile_records(Path(endpoints.output_dir))}
    at6 = [records["at6", name] for name, _ in tiles]
    assert all("in-focus spectrum" in (r.reason or "") for r in at6), [r.reason for r in at6]
    assert [r.label for r in at6] == ["sharp", "sharp", "soft", "soft"], [(r.sigma_px, r.reason) for r in at6]
    assert {r.deblur_version for r in at6[2:]} == {f"{CLASSICAL_VERSION}+rig-wiener-0.75"}
    at10 = [records["at10", name] for name, _ in tiles]
    assert all("quadrature" in (r.reason or "") for r in at10), [r.reason for r in at10]
    assert {r.deblur_version for r in at10 if r.label == "soft"} <= {CLASSICAL_VERSION}


def _crops(count: int, side: int = 256) -> list[np.ndarray]:
    """`count` real in-focus ISBI crops (side x side uint8), two per image."""
    images = [read_tile(DATA_DIR / f"{i}.png") for i in range((count + 1) // 2)]
    return [image[o : o + side, o : o + side].copy() for image in images for o in (0, side)][:count]


def test_a_beam_that_defocuses_raises_focus_drift_then_focus_ok_and_other_beams_are_unaffected(
    start_appliance: Callable[..., object], tmp_path: Path
) -> None:
    crops = _crops(12)
    measured = calibrate(crops[:6], [f"c{i}" for i in range(6)], BlurDetector.from_config(DetectorConfig()), 4.0)
    # Its restoration blend (made by hand here: measuring it is tests/restoration's) travels with each soft
    # tile to the shared deblur replica, which blends a quarter of its output with three of the rig Wiener's.
    blend = RestorationBlend(deblur_model=CLASSICAL_VERSION, model_weight=0.25, psnr_db={"0.25": 30.0}, probes=1)
    measured = measured.model_copy(update={"restoration": blend})
    path = tmp_path / "calibration.json"
    save_calibration(measured, path)
    online = OnlineBaselineConfig(window=4, min_tiles=3)
    cfg = rig(tmp_path, max_in_flight=1)  # tiles judged in seq order
    detector = DetectorConfig(calibration=path, online_baseline=online)
    cfg = cfg.model_copy(update={"detector": detector, "deblur": DeblurConfig(backend="classical")})
    appliance = start_appliance(cfg)
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    blurred = [quantize(apply_blur(to_unit_float(c), BlurParams("gaussian", 1.0))) for c in crops]
    # Beam = seq % 2. 8 tiles in focus, then beam 1 defocuses for 12 tiles (6 of its own), then refocuses.
    phases = [(8, False), (12, True), (12, False)]
    tiles, seq = [], 0
    for n, defocused in phases:
        for _ in range(n):
            pixels = blurred[seq % 12] if defocused and seq % 2 == 1 else crops[seq % 12]
            tiles.append((f"t{seq:03d}", pixels))
            seq += 1
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        report = controller.send_section("drift", iter(tiles), rate_hz=None, beams=2, timeout_s=180)
        feedback = controller.feedback()
    assert (report.done, report.lost) == (32, 0)
    alarms = [m for m in feedback if m["type"] == "alarm"]
    assert [(a["kind"], a["beam"]) for a in alarms] == [("focus_drift", 1), ("focus_ok", 1)], alarms
    drift, ok = alarms
    assert 8 <= drift["seq"] < 20 and drift["seq"] % 2 == 1  # raised by a defocused beam-1 tile
    assert ok["seq"] >= 20 and ok["seq"] % 2 == 1
    assert drift["reference_sigma_px"] == pytest.approx(measured.baseline_sigma_px, abs=1e-3)
    assert drift["drift_log"] > drift["threshold"] == 0.25 and drift["calibrated"] is True
    assert drift["baseline_sigma_px"] > drift["reference_sigma_px"] and drift["pixel_size_nm"] == 4.0
    assert "beam 1" in drift["message"]
    records = tile_records(Path(endpoints.output_dir))
    beam0 = [r for r in records if r.beam == 0]
    assert len(beam0) == 16 and {r.label for r in beam0} == {"sharp"}, [(r.sigma_px, r.reason) for r in beam0]
    # Beam 0 is judged against its own running baseline, which never left the calibration's.
    assert all(r.baseline_sigma_px is not None for r in beam0)
    restored = [r for r in records if r.label == "soft"]
    assert restored and {r.deblur_version for r in restored} == {f"{CLASSICAL_VERSION}+rig-wiener-0.75"}
    assert all("beam 0 baseline" in (r.reason or "") for r in beam0 if r.seq >= 6)
    with urllib.request.urlopen(endpoints.metrics, timeout=15) as response:
        metrics = {f.name: f.samples for f in text_string_to_metric_families(response.read().decode())}
    counts = {s.labels["kind"]: s.value for s in metrics["em_appliance_alarms"] if s.name.endswith("_total")}
    assert (counts["focus_drift"], counts["focus_ok"], counts["implausible_blur_share"]) == (1, 1, 0)
    assert [(s.labels, s.value) for s in metrics["em_appliance_beam_focus_drift"]] == [
        ({"beam": "1", "microscope": "rig"}, 0)
    ]
