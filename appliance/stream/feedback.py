"""Feedback socket to the microscope controller: results, errors and retake flags, never blocking."""

from __future__ import annotations

import logging
from collections import deque

import zmq

from appliance.config import SecurityConfig
from appliance.stream.zmq_security import secure_server_socket

log = logging.getLogger(__name__)

# Feedback frames are ~200 bytes; this holds ~20 MB while the controller is not reading.
MAX_OUTBOX = 100_000


class FeedbackChannel:
    """PUSH socket bound on the appliance; the controller connects PULL.

    Sends never block the sink: while the controller is away, frames wait in an outbox in order and
    go out on the next send or `flush()`. Everything sent here is also in the QC record on disk.
    """

    def __init__(self, context: zmq.Context, endpoint: str, security: SecurityConfig | None = None) -> None:
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, 10_000)
        self._socket.setsockopt(zmq.LINGER, 2000)
        secure_server_socket(self._socket, security or SecurityConfig(), "feedback")
        self._socket.bind(endpoint)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._outbox: deque[bytes] = deque()
        self.n_overflowed = 0

    def send(self, frame: bytes) -> None:
        """Queue one frame and push out as many queued frames as the socket takes now."""
        if len(self._outbox) >= MAX_OUTBOX:
            self._outbox.popleft()
            self.n_overflowed += 1
            log.error(
                "feedback outbox full (%d): controller not reading; oldest message dropped (it is still in qc.jsonl)",
                MAX_OUTBOX,
            )
        self._outbox.append(frame)
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

    @property
    def pending(self) -> int:
        return len(self._outbox)

    def close(self) -> None:
        self.flush()
        self._socket.close()
