"""Several microscopes on one appliance: real Ray Serve (shared detector and deblur), two reference
controllers on loopback, each microscope's own sockets, folder, QC record and metrics."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import DetectorConfig, IngestConfig, MetricsConfig, MicroscopeConfig, RigConfig
from appliance.detection.calibration import calibrate, save_calibration
from appliance.detection.detector import BlurDetector
from appliance.qc_record import QC_FILENAME, QcTileRecord, read_qc_lines
from appliance.stream.protocol import decode_feedback
from appliance.tile_io import read_tile
from appliance.tools.reference_controller import ReferenceController, ReplayReport, cycle_tiles
from bench.faults import silent_controller
from models.blur_synth import DATA_DIR

pytestmark = pytest.mark.system

TILES_EACH = 8


def two_microscopes(tmp_path: Path, **ingest: object) -> RigConfig:
    scopes = [
        MicroscopeConfig(
            name=name,
            tile_endpoint="tcp://127.0.0.1:*",
            feedback_endpoint="tcp://127.0.0.1:*",
            output_directory=tmp_path / "out" / name,
        )
        for name in ("scope-a", "scope-b")
    ]
    return RigConfig(
        ingest=IngestConfig(**ingest),  # type: ignore[arg-type]
        metrics=MetricsConfig(address="127.0.0.1:0"),
        microscopes=scopes,
    )


def tile_records(output_dir: Path) -> list[QcTileRecord]:
    return [r for r in read_qc_lines(output_dir / QC_FILENAME) if isinstance(r, QcTileRecord)]


def test_two_controllers_stream_at_once_each_into_its_own_folder(
    start_appliance: Callable[..., object], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    appliance = start_appliance(two_microscopes(tmp_path))
    scopes = appliance.microscopes  # type: ignore[attr-defined]
    assert list(scopes) == ["scope-a", "scope-b"]
    reports: dict[str, ReplayReport] = {}
    feedback: dict[str, list[dict[str, object]]] = {}

    def stream(name: str) -> None:
        endpoints = scopes[name]
        tiles = ((f"{name}-{tile_id}", pixels) for tile_id, pixels in cycle_tiles(real_em_tiles, TILES_EACH))
        with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
            reports[name] = controller.send_section(f"sec-{name}", tiles, rate_hz=None, timeout_s=180)
            feedback[name] = controller.feedback()

    threads = [threading.Thread(target=stream, args=(name,)) for name in scopes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert set(reports) == set(scopes), "a controller did not finish"

    for name, endpoints in scopes.items():
        report = reports[name]
        assert (report.sent, report.done, report.lost, report.duplicated) == (TILES_EACH, TILES_EACH, 0, 0), name
        # No cross-talk: each controller hears only of its own section and tiles.
        assert {m.get("section") for m in feedback[name] if "section" in m} == {f"sec-{name}"}
        assert all(str(m["tile_id"]).startswith(name) for m in feedback[name] if "tile_id" in m)
        out = Path(endpoints.output_dir)
        assert out == tmp_path / "out" / name
        records = tile_records(out)
        assert sorted(r.seq for r in records) == list(range(TILES_EACH))
        assert {r.section for r in records} == {f"sec-{name}"}
        assert [p.name for p in out.iterdir() if p.is_dir()] == [f"sec-{name}"]
        for record in records:
            assert read_tile(out / record.path).shape == (512, 512)

    with urllib.request.urlopen(scopes["scope-a"].metrics, timeout=15) as response:
        text = response.read().decode()
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    done = families["em_appliance_tiles_done"]
    for name in scopes:
        assert sum(s.value for s in done if s.labels["microscope"] == name) == TILES_EACH
    # The shared deployments are counted once, without a microscope.
    assert [s.labels for s in families["em_appliance_replicas"]] == [
        {"deployment": "BlurDetectorDeployment"},
        {"deployment": "DeblurDeployment"},
    ]
    final = appliance.drain_and_stop()  # type: ignore[attr-defined]
    assert final["scope-b/ingest"]["tiles_done"] == TILES_EACH


def test_shared_detector_replicas_read_each_tile_against_its_own_microscopes_spectrum(
    start_appliance: Callable[..., object], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    # scope-a is calibrated on its in-focus tiles (ISBI, as the samples), scope-b is not; both send the same
    # soft samples through the one detector deployment at once.
    isbi = [read_tile(DATA_DIR / f"{i}.png") for i in range(5)]
    calibration = calibrate(isbi, [f"{i}.png" for i in range(5)], BlurDetector.from_config(DetectorConfig()))
    assert calibration.spectral is not None
    path = tmp_path / "scope-a.json"
    save_calibration(calibration, path)
    cfg = two_microscopes(tmp_path)
    scopes_cfg = [cfg.microscopes[0].model_copy(update={"detector_calibration": path}), cfg.microscopes[1]]
    appliance = start_appliance(cfg.model_copy(update={"microscopes": scopes_cfg}))
    scopes = appliance.microscopes  # type: ignore[attr-defined]
    soft = [(name, pixels) for name, pixels in real_em_tiles if name.startswith("soft")]
    reports: dict[str, ReplayReport] = {}

    def stream(name: str) -> None:
        endpoints = scopes[name]
        with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
            reports[name] = controller.send_section(f"sec-{name}", cycle_tiles(soft, 4), rate_hz=None, timeout_s=180)

    threads = [threading.Thread(target=stream, args=(name,)) for name in scopes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all((reports[n].done, reports[n].lost) == (4, 0) for n in scopes), reports
    calibrated = tile_records(Path(scopes["scope-a"].output_dir))
    plain = tile_records(Path(scopes["scope-b"].output_dir))
    assert len(calibrated) == len(plain) == 4
    for record in calibrated:
        assert record.spectral_sigma_px is not None and record.spectral_sigma_px > 0.8, record
        assert record.sigma_px == record.spectral_estimate_px and "in-focus spectrum" in (record.reason or "")
        assert record.label in ("soft", "retake")
    assert all(r.spectral_sigma_px is r.spectral_estimate_px is r.baseline_sigma_px is None for r in plain)


def test_a_stalled_microscope_holds_back_only_its_own_tiles(
    start_appliance: Callable[..., object], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    # scope-a's controller sends and never reads its feedback: its outbox fills (2 frames), its tiles wait,
    # its credits run out. scope-b shares the detector and deblur and must get every answer meanwhile.
    appliance = start_appliance(two_microscopes(tmp_path, feedback_hwm=2, max_in_flight=3))
    scopes = appliance.microscopes  # type: ignore[attr-defined]
    context = zmq.Context()
    try:
        # scope-a is full once its send times out: its credits are taken, its pipe is full.
        with silent_controller(scopes["scope-a"].tile, "stalled", cycle_tiles(real_em_tiles, 8)):
            time.sleep(2.0)
            assert appliance.stats("scope-a")["ingest"]["in_flight"] > 0  # type: ignore[attr-defined]
            with ReferenceController(scopes["scope-b"].tile, scopes["scope-b"].feedback) as controller:
                report = controller.send_section("flowing", cycle_tiles(real_em_tiles, TILES_EACH), rate_hz=None)
            assert (report.done, report.lost, report.duplicated) == (TILES_EACH, 0, 0)
            # scope-a is still held: nothing of it was dropped, it waits for its controller to read.
            a_stats = appliance.stats("scope-a")  # type: ignore[attr-defined]
            assert a_stats["ingest"]["in_flight"] > 0 and a_stats["ingest"]["tiles_done"] < 8
            # Its controller reads again: every tile it got in is answered.
            reader = context.socket(zmq.PULL)
            reader.setsockopt(zmq.LINGER, 0)
            reader.connect(scopes["scope-a"].feedback)
            accepted = a_stats["ingest"]["received"] - 1  # less the start message
            answered: set[str] = set()
            deadline = time.monotonic() + 120
            while len(answered) < accepted and time.monotonic() < deadline:
                if reader.poll(500):
                    message = decode_feedback(reader.recv())
                    if message.get("type") == "result":
                        answered.add(str(message["tile_id"]))
            assert len(answered) >= accepted
            # Stop while scope-a's controller still reads, so it takes its `draining` too (a stop with a controller
            # that never reads again is tests/faults' drill: it waits ingest.drain_timeout_s, then records the tiles).
            stop_reading = threading.Event()

            def keep_reading() -> None:
                while not stop_reading.is_set():
                    if reader.poll(200):
                        reader.recv()

            drainer = threading.Thread(target=keep_reading, daemon=True)
            drainer.start()
            appliance.drain_and_stop()  # type: ignore[attr-defined]
            stop_reading.set()
            drainer.join(timeout=5)
            reader.close()
    finally:
        context.destroy(linger=0)  # the reader too, also when an assertion failed
