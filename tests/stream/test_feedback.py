"""The feedback channel and the sink's record of answered tiles: real ZeroMQ on loopback, real files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq

from appliance.qc_record import QC_FILENAME, QcRejection, QcTileRecord
from appliance.serving.pipeline import resolve_endpoint
from appliance.stream.feedback import FeedbackChannel
from appliance.stream.protocol import decode_feedback, encode_feedback
from appliance.stream.sink import QcLog, recorded_tiles

pytestmark = pytest.mark.fast


def test_a_full_outbox_holds_the_writer_and_drops_nothing() -> None:
    context = zmq.Context()
    channel = FeedbackChannel(context, "tcp://127.0.0.1:*", max_pending=4)
    frames = [encode_feedback("draining", message=str(n)) for n in range(12)]

    async def scenario() -> list[str]:
        for frame in frames:  # nobody connected: everything waits in the outbox, nothing is dropped
            channel.send(frame)
        assert channel.pending == 12 and channel.max_pending_seen == 12
        with pytest.raises(asyncio.TimeoutError):  # a writer is held while the outbox is at its mark
            await asyncio.wait_for(channel.wait_for_room(), 0.3)
        pull = context.socket(zmq.PULL)
        pull.connect(channel.endpoint)
        received: list[str] = []

        async def read() -> None:
            while len(received) < len(frames):
                if pull.poll(10):
                    received.append(decode_feedback(pull.recv())["message"])
                await asyncio.sleep(0)

        reader = asyncio.get_running_loop().create_task(read())
        assert await asyncio.wait_for(channel.wait_for_room(), 5) > 0  # the controller reads again
        await asyncio.wait_for(reader, 5)
        pull.close()
        return received

    try:
        assert asyncio.run(scenario()) == [str(n) for n in range(12)]  # every frame, in order
        assert channel.pending == 0 and channel.waited_s > 0
    finally:
        channel.close()
        context.term()


def test_a_restarted_sink_knows_every_recorded_tile_and_its_answer(tmp_path: Path) -> None:
    common = dict(shape=[64, 64], dtype="uint8", pixel_size_nm=4.0, stage_x_um=0.0, stage_y_um=0.0, t_acquired=0.0)
    log = QcLog(tmp_path / QC_FILENAME, fsync=False)
    log.append(
        QcTileRecord(t=1.0, section="s", tile_id="a", seq=0, action="flagged", path="s/a.tif", label="retake",
                     blur_score=0.97, sigma_px=6.0, reason="beyond repair", timings_s={"total_s": 0.5}, **common)
    )  # fmt: skip
    log.append(
        QcTileRecord(t=2.0, section="s", tile_id="b", seq=1, action="failed", path="s/b.tif", error="boom", **common)
    )
    log.append(QcRejection(t=3.0, section="s", tile_id="c", seq=2, action="rejected", code="draining", error="stop"))
    log.close()
    recorded = recorded_tiles(tmp_path / QC_FILENAME)
    assert set(recorded) == {("s", "a"), ("s", "b")}  # a refused message is not a recorded tile: resend it
    assert [kind for kind, _ in recorded["s", "a"].answer] == ["result", "retake"]
    assert recorded["s", "a"].answer[0][1]["latency_s"] == 0.5
    ((kind, fields),) = recorded["s", "b"].answer
    assert (kind, fields["code"], fields["seq"]) == ("error", "processing_failed", 1)
    for kind, fields in recorded["s", "a"].answer + recorded["s", "b"].answer:  # valid v1.1 frames, with repeat
        assert decode_feedback(encode_feedback(kind, **fields, repeat=True))["repeat"] is True
    assert recorded_tiles(tmp_path / "missing.jsonl") == {}


def test_a_wildcard_port_is_resolved_once_and_an_explicit_endpoint_is_kept() -> None:
    resolved = resolve_endpoint("tcp://127.0.0.1:*")
    assert resolved.startswith("tcp://127.0.0.1:") and int(resolved.rsplit(":", 1)[1]) > 0
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.bind(resolved)  # free again: an actor (and its restart) binds exactly this port
    socket.close(linger=0)
    context.term()
    assert resolve_endpoint("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
