"""The running appliance's ZeroMQ sockets under attack: oversized frames, a second feedback reader, CURVE.

Real Ray actors (ingest, sink), real sockets on loopback, the reference controller and strangers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ray
import zmq

from appliance.config import IngestConfig, MetricsConfig, OutputConfig, RigConfig, SecurityConfig
from appliance.stream.zmq_security import SECOND_PEER_WAIT_S, load_key_pair, write_key_pair
from appliance.tools.reference_controller import ControllerCurve, ReferenceController, cycle_tiles

pytestmark = pytest.mark.system

LOOPBACK = dict(tile_endpoint="tcp://127.0.0.1:*", feedback_endpoint="tcp://127.0.0.1:*")
TILE_LIMIT_BYTES = 64 * 1024 * 1024  # MAXMSGSIZE: 2 x 64 MiB + 64 KiB
OVERSIZED_BYTES = 300 * 1024 * 1024
TILES = 40


def rig(tmp_path: Path, security: SecurityConfig | None = None) -> RigConfig:
    return RigConfig(
        ingest=IngestConfig(**LOOPBACK, max_tile_bytes=TILE_LIMIT_BYTES),  # type: ignore[arg-type]
        output=OutputConfig(directory=tmp_path / "out", fsync=False),
        metrics=MetricsConfig(enabled=False),
        security=security or SecurityConfig(),
    )


@pytest.fixture
def sharp_tiles(real_em_tiles: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """The sample's sharp tiles: these tests are about the sockets, and each soft tile restored on this
    CPU would add ~1 s (a quarter of the sample is soft)."""
    return [(name, pixels) for name, pixels in real_em_tiles if name.startswith("sharp")]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def test_an_oversized_frame_is_dropped_by_libzmq_before_the_ingest_buffers_it(
    start_appliance: Callable[..., object], tmp_path: Path, sharp_tiles: list[tuple[str, np.ndarray]]
) -> None:
    appliance = start_appliance(rig(tmp_path))
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    ingest = appliance._ingest  # type: ignore[attr-defined]
    pid = ray.get(ingest.__ray_call__.remote(lambda _actor: os.getpid()))
    before = memory_kib(pid)
    context = zmq.Context()
    attacker = context.socket(zmq.PUSH)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(endpoints.tile)
    frame = np.zeros(OVERSIZED_BYTES, dtype=np.uint8)
    attacker.send_multipart([b"\x80", memoryview(frame)], copy=False)  # any header: the size is refused first
    time.sleep(3.0)  # libzmq reads the frame's length, drops the connection; the sender reconnects
    after = memory_kib(pid)
    attacker.close()
    context.term()
    del frame
    # The whole stream still works: every tile of a section answered.
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        report = controller.send_section("s1", cycle_tiles(sharp_tiles, TILES), rate_hz=None, timeout_s=120)
    assert (report.sent, report.done, report.lost) == (TILES, TILES, 0)
    stats = ray.get(ingest.stats.remote())
    assert stats["received"] == TILES + 2  # start + tiles + end: the oversized message never arrived
    grown_mib = (after["VmHWM"] - before["VmHWM"]) / 1024
    assert grown_mib < 32, f"ingest peak RSS grew {grown_mib:.0f} MiB for a {OVERSIZED_BYTES >> 20} MiB frame"


def test_a_second_feedback_reader_gets_nothing_and_the_controller_every_reply(
    start_appliance: Callable[..., object], tmp_path: Path, sharp_tiles: list[tuple[str, np.ndarray]]
) -> None:
    appliance = start_appliance(rig(tmp_path))
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        time.sleep(0.5)  # the controller's PULL is connected
        context = zmq.Context()
        stranger = context.socket(zmq.PULL)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.connect(endpoints.feedback)
        time.sleep(SECOND_PEER_WAIT_S + 0.5)
        report = controller.send_section("s1", cycle_tiles(sharp_tiles, TILES), rate_hz=None, timeout_s=120)
        stolen = 0
        while stranger.poll(500):
            stranger.recv()
            stolen += 1
        stranger.close()
        context.term()
    assert (report.done, report.lost, stolen) == (TILES, 0, 0)


def test_with_curve_the_pinned_controller_is_served_and_an_unpinned_key_is_not(
    start_appliance: Callable[..., object], tmp_path: Path, sharp_tiles: list[tuple[str, np.ndarray]]
) -> None:
    keys = tmp_path / "keys"
    for name in ("server", "controller", "stranger"):
        write_key_pair(keys, name)
    security = SecurityConfig(
        curve=True,
        server_secret_key_file=keys / "server.key_secret",
        controller_public_keys=[load_key_pair(keys / "controller.key").public.decode()],
    )
    appliance = start_appliance(rig(tmp_path, security))
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    stranger_curve = ControllerCurve.from_files(keys / "stranger.key_secret", keys / "server.key")
    with ReferenceController(endpoints.tile, endpoints.feedback, curve=stranger_curve) as stranger:
        stranger.send_raw([b"not even a tile"])
        time.sleep(1.0)
        assert stranger.feedback() == []
    curve = ControllerCurve.from_files(keys / "controller.key_secret", keys / "server.key")
    with ReferenceController(endpoints.tile, endpoints.feedback, curve=curve) as controller:
        report = controller.send_section("s1", cycle_tiles(sharp_tiles, TILES), rate_hz=None, timeout_s=120)
    assert (report.done, report.lost) == (TILES, 0)
    received = ray.get(appliance._ingest.stats.remote())["received"]  # type: ignore[attr-defined]
    assert received == TILES + 2  # the stranger's message never reached the ingest
