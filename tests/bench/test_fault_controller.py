"""The fault drills' controller (bench/faults.py) counts answers as the protocol's resend rule says: real ZeroMQ
feedback on loopback, real answer frames."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from appliance.stream.protocol import encode_feedback
from appliance.tools.reference_controller import tile_frames
from bench.faults import FaultController

pytestmark = pytest.mark.fast


def _result(tile_id: str, seq: int, **extra: object) -> bytes:
    return encode_feedback(
        "result", section="s", tile_id=tile_id, seq=seq, label="sharp", action="written", blur_score=0.1,
        sigma_px=0.2, path=f"s/{tile_id}.tif", latency_s=0.1, **extra,
    )  # fmt: skip


def test_a_repeat_is_the_answer_of_a_tile_that_had_none_and_is_never_counted_twice() -> None:
    context = zmq.Context()
    feedback = context.socket(zmq.PUSH)
    feedback.setsockopt(zmq.LINGER, 0)
    port = feedback.bind_to_random_port("tcp://127.0.0.1")
    controller = FaultController("tcp://127.0.0.1:1", f"tcp://127.0.0.1:{port}", "s")
    try:
        pixels = np.zeros((8, 8), np.uint8)
        for seq, tile_id in enumerate(("a", "b")):
            controller.frames[tile_id] = tile_frames("s", tile_id, seq, pixels)
        feedback.send(_result("a", 0))  # a's answer, then its resend's repeat: counted once
        feedback.send(_result("a", 0, repeat=True))
        # b's answer died with a killed sink after b was recorded: its only answer is a repeat, and it counts.
        feedback.send(_result("b", 1, repeat=True))
        assert controller.wait_until(lambda: controller.repeats == 2, 5)
        assert dict(controller.answers) == {"a": 1, "b": 1}
        assert controller.answered_by_repeat == 1 and controller.unanswered() == []
    finally:
        controller.close()
        feedback.close()
        context.term()
