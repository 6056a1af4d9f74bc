"""Feedback socket to the microscope controller: results, errors and retake flags, never dropped.

Why PUSH: one controller pulls; at the high-water mark a PUSH blocks instead of dropping (zguide). The
sink never blocks on the socket itself: frames wait in an outbox, and a full outbox is backpressure
(`wait_for_room`): the sink holds the tile's write, the tile keeps its credit, the ingest stops reading,
and the controller's send blocks. Memory stays bounded by `max_pending` plus the frames of the tiles
already in flight (credits).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import zmq

from appliance.config import SecurityConfig
from appliance.stream.zmq_security import secure_server_socket

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 1000  # feedback frames are ~200 bytes: ~200 kB queued in the outbox at most
WAIT_POLL_S = 0.05
# A kernel send buffer sized like the outbox (~256 bytes a frame): frames waiting for a controller that
# is not reading stay in the outbox, where they are counted and turn into backpressure, instead of MBs
# hidden in the kernel's autotuned buffer. 4608 bytes is Linux's smallest.
FRAME_BYTES = 256
MIN_SEND_BUFFER_BYTES = 4608


class FeedbackChannel:
    """PUSH socket bound on the appliance; the controller connects PULL.

    Frames go out in order; while the controller is away they wait in the outbox and go out on the
    next send or `flush()`. Nothing is ever dropped; everything sent is also in the QC record on disk.
    max_pending: outbox frames beyond which `wait_for_room` holds the caller (also the socket's SNDHWM).
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        max_pending: int = DEFAULT_MAX_PENDING,
        security: SecurityConfig | None = None,
    ) -> None:
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, max_pending)
        self._socket.setsockopt(zmq.SNDBUF, max(MIN_SEND_BUFFER_BYTES, max_pending * FRAME_BYTES))
        self._socket.setsockopt(zmq.LINGER, 2000)
        secure_server_socket(self._socket, security or SecurityConfig(), "feedback")
        self._socket.bind(endpoint)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.max_pending = max_pending
        self._outbox: deque[bytes] = deque()
        self.max_pending_seen = 0
        self.waited_s = 0.0  # time writers were held by a full outbox (controller not reading)
        self._released = False

    def send(self, frame: bytes) -> None:
        """Queue one frame and push out as many queued frames as the socket takes now (never drops)."""
        self._outbox.append(frame)
        self.max_pending_seen = max(self.max_pending_seen, len(self._outbox))
        self.flush()

    def flush(self) -> int:
        """Send queued frames until the socket would block; return how many are still queued."""
        while self._outbox:
            try:
                self._socket.send(self._outbox[0], zmq.NOBLOCK)
            except zmq.Again:
                break
            self._outbox.popleft()
        return len(self._outbox)

    async def wait_for_room(self) -> float:
        """Wait until the outbox is below `max_pending` (the controller reads again); return seconds waited.

        After `release_held()` it never waits: the outbox may then grow past `max_pending`.
        """
        if self.flush() < self.max_pending or self._released:
            return 0.0
        log.warning("feedback outbox full (%d frames): controller not reading; holding tiles", self.max_pending)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while self.flush() >= self.max_pending and not self._released:
            await asyncio.sleep(WAIT_POLL_S)
        waited = loop.time() - t0
        self.waited_s += waited
        if not self._released:
            log.warning("feedback outbox drained after %.1f s: controller reading again", waited)
        return waited

    def release_held(self) -> None:
        """A stop that cannot wait for a controller any longer: held callers go on, and none waits again.

        The tiles are then recorded and their answers queue past `max_pending`; what the controller never
        takes is lost with the socket at close, and the controller, having no answer, resends those tiles
        after the restart (answered `repeat: true` from the record)."""
        self._released = True

    @property
    def pending(self) -> int:
        return len(self._outbox)

    def close(self) -> int:
        """Close the socket (LINGER bounds it); returns the frames the controller never took, now lost."""
        left = self.flush()
        self._socket.close()
        return left
