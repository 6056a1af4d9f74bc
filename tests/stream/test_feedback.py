"""The feedback channel (real ZeroMQ on loopback) and endpoint resolution."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from appliance.serving.pipeline import resolve_endpoint
from appliance.stream.feedback import FeedbackChannel
from appliance.stream.protocol import decode_feedback, encode_feedback

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


def test_a_wildcard_port_is_resolved_once_and_an_explicit_endpoint_is_kept() -> None:
    resolved = resolve_endpoint("tcp://127.0.0.1:*")
    assert resolved.startswith("tcp://127.0.0.1:") and int(resolved.rsplit(":", 1)[1]) > 0
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.bind(resolved)  # free again: an actor (and its restart) binds exactly this port
    socket.close(linger=0)
    context.term()
    assert resolve_endpoint("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
