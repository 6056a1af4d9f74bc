"""ZeroMQ ingest actor: receive tiles, validate them, and drive each through detector -> deblur -> sink.

Flow control is credit based: a tile takes a credit when it is read from the socket and gives it back
only when the sink has written it. With no credit left the actor stops reading, the ZeroMQ pipe fills,
and the controller's PUSH blocks. Serve's BackPressureError is retried, never turned into a lost tile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import zmq
import zmq.asyncio
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from appliance.config import IngestConfig, SecurityConfig
from appliance.messages import TileOutcome
from appliance.operator.metrics import IngestMetrics
from appliance.stream.blur_share import BlurShareGuard
from appliance.stream.protocol import (
    ProtocolError,
    SectionEnd,
    SectionStart,
    StreamLimits,
    Tile,
    TileHeader,
    decode_stream_message,
    duplicate_message,
)
from appliance.stream.zmq_security import secure_server_socket
from appliance.tile_io import TileError, check_tile_pixels

log = logging.getLogger(__name__)

POLL_MS = 100
RETRY_DELAY_S = (0.005, 0.5)  # first and longest wait between retries of a rejected Serve call


@dataclass
class _Section:
    """Per-section state: tiles in flight (for resends arriving meanwhile; the sink's durable index knows
    every answered tile), which tiles are still being processed, and the safety rule's counts (restoring
    stops when an implausible share of the section reads soft/retake)."""

    blur_share: BlurShareGuard
    in_flight: dict[str, tuple[int, asyncio.Task[None]]] = field(default_factory=dict)  # tile_id -> (seq, task)
    pending: set[asyncio.Task[None]] = field(default_factory=set)


def in_flight_copy(section: _Section, header: TileHeader) -> asyncio.Task[None] | None:
    """The task of the first copy of this tile when it is still in flight (a resend), else None.

    Raises ProtocolError duplicate_seq when its tile_id or seq is in flight under another message.
    """
    first = section.in_flight.get(header.tile_id)
    if first is not None and first[0] == header.seq:
        return first[1]
    if first is not None or any(seq == header.seq for seq, _ in section.in_flight.values()):
        ids = {"section": header.section, "tile_id": header.tile_id, "seq": header.seq}
        raise ProtocolError("duplicate_seq", duplicate_message(header.section, header.tile_id, header.seq), ids)
    return None


@ray.remote(num_cpus=0)
class IngestActor:
    """Owns the tile socket; one asyncio task per tile in flight, bounded by credits.

    calibrated: whether the detector runs with a rig calibration (reported in the safety rule's alarm).
    """

    def __init__(
        self,
        cfg: IngestConfig,
        detector: DeploymentHandle,
        deblur: DeploymentHandle,
        sink: ray.actor.ActorHandle,
        calibrated: bool = False,
        security: SecurityConfig | None = None,
    ) -> None:
        self._cfg = cfg
        self._calibrated = calibrated
        self._limits = StreamLimits(max_tile_bytes=cfg.max_tile_bytes, max_tile_side=cfg.max_tile_side)
        self._detector = detector
        self._deblur = deblur
        self._sink = sink
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, cfg.receive_hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        secure_server_socket(self._socket, security or SecurityConfig(), "tiles", max_frame_bytes=cfg.max_tile_bytes)
        self._socket.bind(cfg.tile_endpoint)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._credits = asyncio.Semaphore(cfg.max_in_flight)
        self._sections: dict[str, _Section] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stats: dict[str, int] = {
            "received": 0,
            "tiles_accepted": 0,
            "tiles_done": 0,
            "rejected": 0,
            "failed": 0,
            "backpressure_retries": 0,
            "in_flight": 0,
            "max_in_flight_seen": 0,
            "sink_errors": 0,
            "repeats": 0,
        }
        self._metrics = IngestMetrics(cfg.max_in_flight)

    async def start(self) -> str:
        """Begin receiving; returns the bound endpoint (resolves `tcp://host:*` to the real port)."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._receive_loop())
        return self.endpoint

    async def drain(self) -> dict[str, int]:
        """Stop reading new messages, wait until every accepted tile is written, close the socket."""
        self._stopping.set()
        if self._loop_task is not None:
            await self._loop_task
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._socket.close()
        self._context.term()
        return dict(self._stats)

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def metrics_text(self) -> bytes:
        """This actor's Prometheus metrics (text format), for the driver's /metrics endpoint."""
        return self._metrics.exposition()

    async def _receive_loop(self) -> None:
        while not self._stopping.is_set():
            await self._take_credit()
            frames = await self._next_message()
            if frames is None:
                self._credits.release()
                return
            self._stats["received"] += 1
            self._metrics.messages_received.inc()
            self._handle(frames, time.time())

    async def _take_credit(self) -> None:
        # Time without a credit is time the controller is held back: the operator's "how far behind".
        if not self._credits.locked():
            await self._credits.acquire()
            return
        t0 = time.perf_counter()
        await self._credits.acquire()
        self._metrics.backpressure_s.inc(time.perf_counter() - t0)

    async def _next_message(self) -> list[zmq.Frame] | None:
        # Poll in short steps so that drain() is noticed while the controller is silent.
        while not self._stopping.is_set():
            if await self._socket.poll(POLL_MS, zmq.POLLIN):  # type: ignore[call-arg]  # pyzmq's stub: timeout only
                return await self._socket.recv_multipart(copy=False)
        return None

    def _handle(self, frames: list[zmq.Frame], t_received: float) -> None:
        """Decode one message; every path either releases the credit or hands it to a task."""
        try:
            message = decode_stream_message([frame.buffer for frame in frames], self._limits)
            if isinstance(message, Tile):
                self._accept_tile(message, t_received)
                return
            if isinstance(message, SectionStart):
                self._start_section(message)
            elif isinstance(message, SectionEnd):
                self._spawn(self._finish_section(message), section=None)
            self._credits.release()
        except ProtocolError as exc:
            self._spawn(self._reject(exc.code, exc.message, exc.context), section=None, holds_credit=True)
        except Exception as exc:  # e.g. object store full: tell the controller, keep the loop alive
            log.exception("could not accept a message")
            self._spawn(
                self._reject("processing_failed", f"appliance could not accept the message: {exc!r}; resend it", {}),
                section=None,
                holds_credit=True,
            )

    def _accept_tile(self, tile: Tile, t_received: float) -> None:
        header = tile.header
        section = self._section(header.section)
        ids = {"section": header.section, "tile_id": header.tile_id, "seq": header.seq}
        first = in_flight_copy(section, header)
        try:
            check_tile_pixels(tile.pixels, f"{header.section}/{header.tile_id}")
        except TileError as exc:
            raise ProtocolError("bad_pixels", str(exc), ids) from None
        # One copy, into the object store; everything downstream passes the reference.
        pixels_ref = ray.put(tile.pixels)
        work = self._admit_and_process(header, pixels_ref, t_received, section, after=first)
        task = self._spawn(work, section=section, holds_credit=True)
        if first is None:
            section.in_flight[header.tile_id] = (header.seq, task)

    async def _admit_and_process(
        self,
        header: TileHeader,
        pixels_ref: ray.ObjectRef,
        t_received: float,
        section: _Section,
        after: asyncio.Task[None] | None,
    ) -> None:
        """Ask the sink's index what this tile is (new, answered, conflicting), then process it if new.

        after: the first copy's task when this is a resend of a tile in flight; it is answered once
        that copy is done (as a repeat).
        """
        try:
            if after is not None:
                await asyncio.wait([after])
            status = await self._sink.lookup.remote(header.section, header.tile_id, header.seq, header.replaces)
            if status == "new":  # counted here: a repeat or a refusal never ends in tiles_done
                self._stats["tiles_accepted"] += 1
                self._metrics.tiles_received.inc()
                await self._process_tile(header, pixels_ref, t_received, section)
            elif status == "conflict":
                ids = {"section": header.section, "tile_id": header.tile_id, "seq": header.seq}
                await self._reject("duplicate_seq", duplicate_message(header.section, header.tile_id, header.seq), ids)
            elif status == "recorded":
                self._stats["repeats"] += 1
        finally:
            if after is None:
                section.in_flight.pop(header.tile_id, None)

    def _start_section(self, start: SectionStart) -> None:
        self._section(start.section)
        self._spawn(self._open_section(start.section), section=None)

    async def _open_section(self, name: str) -> None:
        await self._sink.start_section.remote(name)  # refuses `section_ended` itself for an ended section

    def _section(self, name: str) -> _Section:
        """The open section `name`, opened now if it is new."""
        if name not in self._sections:
            guard = BlurShareGuard(self._cfg.implausible_blur_share, self._cfg.implausible_blur_min_tiles)
            self._sections[name] = _Section(guard)
        return self._sections[name]

    def _spawn(self, work: Any, section: _Section | None, holds_credit: bool = False) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        if section is not None:
            section.pending.add(task)
        if holds_credit:
            self._stats["in_flight"] += 1
            self._metrics.in_flight.inc()
            self._stats["max_in_flight_seen"] = max(self._stats["max_in_flight_seen"], self._stats["in_flight"])

        def _done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if section is not None:
                section.pending.discard(finished)
            if holds_credit:
                self._stats["in_flight"] -= 1
                self._metrics.in_flight.dec()
                self._credits.release()
            if not finished.cancelled() and finished.exception() is not None:
                self._stats["sink_errors"] += 1
                log.error("could not record a tile outcome: %r", finished.exception())

        task.add_done_callback(_done)
        return task

    async def _process_tile(
        self, header: TileHeader, pixels_ref: ray.ObjectRef, t_received: float, section: _Section
    ) -> None:
        outcome = TileOutcome(header=header, t_received=t_received)
        restored_ref: ray.ObjectRef | None = None
        try:
            t0 = time.perf_counter()
            outcome.assessment = await self._call(self._detector, pixels_ref)
            outcome.timings_s["detect_s"] = time.perf_counter() - t0
            outcome.alarm = section.blur_share.observe(outcome.assessment.label, self._calibrated)
            if outcome.assessment.label == "soft" and section.blur_share.suspended:
                outcome.restore_suspended = True
            elif outcome.assessment.label == "soft":
                t1 = time.perf_counter()
                restored = await self._call(self._deblur, pixels_ref, outcome.assessment)
                outcome.timings_s["deblur_s"] = time.perf_counter() - t1
                restored_ref, outcome.deblur_version = restored.pixels_ref, restored.model_version
                self._metrics.deblur_busy_s.labels(replica=restored.replica).inc(restored.busy_s)
        except Exception as exc:  # a failing model must not lose the tile: it is written as acquired
            log.exception("tile %s/%s failed in processing", header.section, header.tile_id)
            outcome.failure = f"{type(exc).__name__}: {exc}"
            self._stats["failed"] += 1
        await self._sink.write_tile.remote(outcome, pixels_ref, restored_ref)
        self._stats["tiles_done"] += 1

    async def _call(self, handle: DeploymentHandle, *args: Any) -> Any:
        depth = self._metrics.queue_depth.labels(deployment=handle.deployment_name)
        depth.inc()
        try:
            return await self._call_until_accepted(handle, *args)
        finally:
            depth.dec()

    async def _call_until_accepted(self, handle: DeploymentHandle, *args: Any) -> Any:
        delay = RETRY_DELAY_S[0]
        while True:
            try:
                return await handle.remote(*args)
            except BackPressureError:
                self._stats["backpressure_retries"] += 1
                self._metrics.serve_rejections.labels(deployment=handle.deployment_name).inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_S[1])

    async def _reject(self, code: str, message: str, context: dict[str, Any]) -> None:
        self._stats["rejected"] += 1
        log.warning("refused message (%s): %s", code, message)
        await self._sink.record_rejection.remote(code, message, context)

    async def _finish_section(self, end: SectionEnd) -> None:
        section = self._sections.pop(end.section, None)
        if section is not None and section.pending:
            await asyncio.gather(*list(section.pending), return_exceptions=True)
        await self._sink.finish_section.remote(end.section, end.n_tiles)
