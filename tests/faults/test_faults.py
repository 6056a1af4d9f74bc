"""Fault drills for real: real Ray and Serve, real ZeroMQ on loopback, real files, processes killed with
SIGKILL (or stopped with SIGTERM). Each drill must end with every tile answered exactly once (repeat
answers counted apart), none lost, none duplicated, none unassessed, and files and qc.jsonl agreeing.

The drills themselves are bench/faults.py's (the same code measures them at MultiSEM size).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.qc_record import QC_FILENAME, QcTileRecord, read_qc_lines
from appliance.serving.pipeline import Appliance
from appliance.tools.reference_controller import ReferenceController
from bench.faults import (
    REPLICA_TITLES,
    Tally,
    drill_rig,
    fault_tiles,
    replica_pid,
    run_kill_drill,
    run_malformed_drill,
    run_stalled_reader_drill,
    silent_controller,
)

pytestmark = pytest.mark.system

SIZE_PX = 128


@pytest.fixture
def drill_appliance(ray_cluster: None, tmp_path: Path) -> Iterator[Callable[..., Appliance]]:
    started: list[Appliance] = []

    def _start(**ingest: Any) -> Appliance:
        appliance = Appliance(drill_rig(tmp_path / "out", SIZE_PX, **ingest))
        appliance.start()
        started.append(appliance)
        return appliance

    yield _start
    for appliance in started:
        if appliance.endpoints is not None:  # not stopped by the test itself
            appliance.drain_and_stop()


def tiles(count: int) -> list[tuple[str, np.ndarray]]:
    return list(fault_tiles(count, SIZE_PX))


def assert_clean(result: Tally, sent: int) -> None:
    assert result.sent == sent
    assert (result.answered, result.lost, result.duplicated, result.unassessed) == (sent, 0, 0, 0), result
    assert result.file_problems == [], result.file_problems
    assert result.recovered


KILL_ATTEMPTS = 3


@pytest.mark.parametrize("fault", ["detector", "deblur"])
def test_a_killed_replica_loses_no_tile_and_leaves_none_unassessed(
    drill_appliance: Callable[..., Appliance], fault: str
) -> None:
    appliance = drill_appliance()
    # The kill aims at a moment the replica computes, but ONNX Runtime's threads spin a little after a call,
    # so it can still land between calls (CI saw 0 retries twice with a plain kill): each miss is a clean
    # drill of its own, and the drill is repeated until one kill caught calls inside the replica.
    for attempt in range(1, KILL_ATTEMPTS + 1):
        pid_before = replica_pid(REPLICA_TITLES[fault])
        result = run_kill_drill(appliance, fault, tiles(60), f"s{attempt}", mid_call=True)
        assert_clean(result, 60)
        assert result.recovery_s is not None  # the kill happened mid-stream
        assert replica_pid(REPLICA_TITLES[fault]) != pid_before  # Serve replaced the killed replica
        assert result.resent == 0  # no tile went unanswered long enough for the controller to resend it
        if appliance.stats()["ingest"]["replica_retries"] > 0:
            break
    assert appliance.stats()["ingest"]["replica_retries"] > 0  # calls were inside the replica when it died


@pytest.mark.parametrize("which", ["sink", "ingest"])
def test_a_killed_actor_is_restarted_on_the_same_ports_and_every_tile_is_answered(
    drill_appliance: Callable[..., Appliance], which: str
) -> None:
    appliance = drill_appliance()
    endpoints = appliance.endpoints
    pid_before = appliance.actor_pids()[which]
    result = run_kill_drill(appliance, which, tiles(60), "s1")
    assert_clean(result, 60)
    restarts = appliance.restarts()
    assert [r.which for r in restarts] == [which]
    assert appliance.actor_pids()[which] not in (None, pid_before)
    assert appliance.endpoints == endpoints  # the controller never had to learn a new port
    if which == "ingest":  # the tiles inside the killed ingest had no answer: the controller resent them
        assert result.resent > 0


def test_a_stalled_feedback_reader_is_backpressure_and_every_answer_arrives(
    drill_appliance: Callable[..., Appliance],
) -> None:
    appliance = drill_appliance(feedback_hwm=4)
    result = run_stalled_reader_drill(appliance, tiles(60), "s1")
    assert_clean(result, 60)  # includes: the outbox reached its mark (backpressure) and stayed bounded
    assert result.malformed_refused == result.malformed_sent == 600  # their errors arrived too
    assert result.repeats == 0 and result.resent == 0  # nothing had to be resent: nothing was dropped


def test_1000_malformed_messages_mixed_with_tiles_each_get_one_error(
    drill_appliance: Callable[..., Appliance],
) -> None:
    appliance = drill_appliance()
    result = run_malformed_drill(appliance, tiles(60), "s1", n_bad=1000)
    assert_clean(result, 60)
    assert result.malformed_refused == result.malformed_sent == 1000
    assert result.resent == 0


def test_a_stop_records_the_tiles_held_for_a_controller_that_never_reads_and_none_is_lost(
    drill_appliance: Callable[..., Appliance],
) -> None:
    # A controller sends and never reads its feedback: its outbox fills, its tiles are held (backpressure).
    # A stop must not wait for it forever: after drain_timeout_s the held tiles are recorded anyway.
    # 5 s, not 2: in a slow full run on this 2-core box (14:58, 2026-11-28) 4 released tiles were not yet
    # recorded 2 s after the release and were abandoned; the bound on the stop is what is tested, not its size.
    appliance = drill_appliance(feedback_hwm=2, drain_timeout_s=5.0)
    endpoints = appliance.endpoints
    stream = tiles(20)
    with silent_controller(endpoints.tile, "s1", stream):
        deadline = time.monotonic() + 60
        while appliance.stats()["sink"]["feedback_pending"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert appliance.stats()["ingest"]["in_flight"] > 0  # tiles are held for the silent controller

        finals: list[dict[str, dict[str, int]]] = []
        stopper = threading.Thread(target=lambda: finals.append(appliance.drain_and_stop()), daemon=True)
        stopper.start()
        stopper.join(timeout=180)
        assert not stopper.is_alive(), "the stop waited for a controller that never reads"
    final = finals[0]
    accepted = final["ingest"]["received"] - 1 - final["ingest"]["refused_draining"]  # less the start
    assert accepted > 0 and final["ingest"]["unanswered_at_stop"] == 0
    assert final["sink"]["feedback_undelivered_at_stop"] > 0  # answers the controller never took
    records = [r for r in read_qc_lines(Path(endpoints.output_dir) / QC_FILENAME) if isinstance(r, QcTileRecord)]
    assert sorted(r.seq for r in records) == list(range(accepted))  # every accepted tile is on disk

    # After the restart the controller, which has no answer at all, resends the whole section: the recorded
    # tiles are answered `repeat` from the record (not written again), the rest fresh. Nothing is lost.
    restarted = drill_appliance()
    assert Path(restarted.endpoints.output_dir) == Path(endpoints.output_dir)
    with ReferenceController(restarted.endpoints.tile, restarted.endpoints.feedback) as controller:
        report = controller.send_section("s1", iter(stream), rate_hz=None, timeout_s=180)
    assert (report.sent, report.done, report.lost, report.duplicated) == (20, 20, 0, 0)
    assert report.repeats == accepted
    records = [r for r in read_qc_lines(Path(endpoints.output_dir) / QC_FILENAME) if isinstance(r, QcTileRecord)]
    assert sorted(r.seq for r in records) == list(range(20))  # each tile recorded once
