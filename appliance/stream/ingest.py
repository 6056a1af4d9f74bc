"""ZeroMQ ingest actor: receive tiles, validate them, and drive each through detector -> deblur -> sink.

Flow control is credit based: a tile takes a credit when it is read from the socket and gives it back
only when the sink has recorded its outcome. With no credit left the actor stops reading, the ZeroMQ pipe
fills, and the controller's PUSH blocks. Serve's BackPressureError is retried, never turned into a lost tile.

Faults (docs/operating.md): a detector/deblur call that died with its replica is retried (bounded) on the
replica Serve starts instead; a write to a sink that died is retried until the restarted sink answers
(write_tile is idempotent), so a credit is never released for a tile whose outcome was not recorded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
import zmq
import zmq.asyncio
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from appliance.config import IngestConfig, SecurityConfig
from appliance.detection.online_baseline import OnlineBaseline
from appliance.messages import BlurAssessment, RestoredTile, TileOutcome
from appliance.operator.metrics import IngestMetrics
from appliance.restoration.rig_wiener import RigRestoration
from appliance.spectral import SpectralReferenceArrays
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
# A call lost with its replica (killed, OOM) is retried on the replacement Serve starts (seconds; longer
# while a model loads on a busy machine): waits of 2, 4, 8, 16, 30 s, i.e. 6 attempts over ~60 s, then
# the tile is answered processing_failed (written as acquired).
REPLICA_RETRY_WAITS_S = (2.0, 4.0, 8.0, 16.0, 30.0)
# The call died with the process that ran it (or owned its result); the same call can run again.
REPLICA_DEATH = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, ObjectLostError)
SINK_RETRY_WAIT_S = (0.2, 5.0)  # first and longest wait between writes to a sink that is restarting
# Pixel sizes whose rescaled rig spectrum is kept (a section has one or a few; the header sets it).
RIG_PIXEL_SIZES_KEPT = 8
T = TypeVar("T")


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
    focus: the per-beam running baseline (appliance.detection.online_baseline): it judges every detector
    verdict (calibration, per-beam zero point) before it is acted upon; None passes verdicts on as they are.
    Its state lives as long as this actor: a restarted ingest starts it afresh.
    microscope: the name of the microscope this ingest serves (its calibration is in `focus`).
    sink: the sink actor's *name*, looked up here. A handle among the constructor arguments would be held in
    Ray's object store, from which a restart must fetch it again (ray-project/ray#53727); a name is inline.
    """

    def __init__(
        self,
        cfg: IngestConfig,
        detector: DeploymentHandle,
        deblur: DeploymentHandle,
        sink: str,
        calibrated: bool = False,
        security: SecurityConfig | None = None,
        focus: OnlineBaseline | None = None,
        microscope: str = "",
    ) -> None:
        self._cfg = cfg
        self._focus = focus
        # The rig's in-focus spectrum (at the tile's pixel size) travels with each tile to the (shared, stateless)
        # detector replicas, and its restoration blend with each soft tile to the (shared) deblur replicas.
        self._calibration = None if focus is None else focus.calibration
        self._rig_by_pixel_size: dict[float, tuple[SpectralReferenceArrays | None, RigRestoration | None]] = {}
        self._calibrated = calibrated
        self._microscope = microscope
        self._limits = StreamLimits(max_tile_bytes=cfg.max_tile_bytes, max_tile_side=cfg.max_tile_side)
        self._detector = detector
        self._deblur = deblur
        self._sink = ray.get_actor(sink)
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, cfg.receive_hwm)
        if cfg.receive_buffer_bytes:
            self._socket.setsockopt(zmq.RCVBUF, cfg.receive_buffer_bytes)
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
            "replica_retries": 0,
            "sink_retries": 0,
            "repeats": 0,
            "refused_draining": 0,
            "unanswered_at_stop": 0,
        }
        self._metrics = IngestMetrics(cfg.max_in_flight)

    async def start(self) -> str:
        """Begin receiving; returns the bound endpoint (resolves `tcp://host:*` to the real port)."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._receive_loop())
        return self.endpoint

    def health(self) -> int:
        """This actor's process id: the supervisor sees a restart as a new pid (and kills it in tests)."""
        return os.getpid()

    async def drain(self, grace_s: float = 0.0) -> dict[str, int]:
        """Refuse every message still buffered (error `draining`) for up to `grace_s` (less once the socket
        is quiet for grace_s / 4), then stop reading, wait until every accepted tile is recorded, close."""
        self._stopping.set()
        if self._loop_task is not None:
            # Cancelled also while it waits for a credit: refusing needs none, so a long tile in flight
            # cannot make the grace period pass with messages still unread.
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self._refuse_buffered(grace_s)
        if not await self._tasks_done_within(self._cfg.drain_timeout_s):
            # A controller not reading its feedback holds its tiles in the sink: record them now instead.
            log.error("stop: %d tiles still in flight after %.0f s", len(self._tasks), self._cfg.drain_timeout_s)
            try:  # once: supervision has stopped, so a dead sink is not restarted any more
                await self._sink.release_held_feedback.remote()
            except Exception as exc:
                log.error("stop: the sink could not release the held tiles: %r", exc)
            if not await self._tasks_done_within(self._cfg.drain_timeout_s):
                self._stats["unanswered_at_stop"] = len(self._tasks)
                log.error(
                    "stop: %d tiles still unanswered after another %.0f s are abandoned; their controller "
                    "resends them after the restart",
                    len(self._tasks),
                    self._cfg.drain_timeout_s,
                )
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._socket.close()
        self._context.term()
        return dict(self._stats)

    async def _tasks_done_within(self, timeout_s: float) -> bool:
        """Wait for every tile task (also those started meanwhile) for up to `timeout_s`; True if all ended."""
        deadline = time.monotonic() + timeout_s
        while self._tasks:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return False
            await asyncio.wait(list(self._tasks), timeout=left_s)
        return True

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

    async def _refuse_buffered(self, grace_s: float) -> None:
        """Read what is still buffered for up to `grace_s` (until quiet for grace_s / 4) and refuse it."""
        deadline = time.monotonic() + grace_s
        while (wait_s := min(grace_s / 4, deadline - time.monotonic())) > 0:
            if not await self._socket.poll(int(wait_s * 1000), zmq.POLLIN):  # type: ignore[call-arg]
                return
            frames = await self._socket.recv_multipart(copy=False)
            self._stats["received"] += 1
            self._metrics.messages_received.inc()
            self._refuse_draining(frames)

    def _refuse_draining(self, frames: list[zmq.Frame]) -> None:
        """While draining every buffered message gets an answer: `draining` (resend after restart), or
        its protocol error when it is malformed anyway."""
        try:
            message = decode_stream_message([frame.buffer for frame in frames], self._limits)
        except ProtocolError as exc:
            self._spawn(self._reject(exc.code, exc.message, exc.context), section=None)
            return
        header = message.header if isinstance(message, Tile) else message
        ids: dict[str, Any] = {"section": header.section}
        if isinstance(header, TileHeader):
            ids |= {"tile_id": header.tile_id, "seq": header.seq}
        self._stats["refused_draining"] += 1
        what = f"{header.type} message"
        text = f"appliance stopping: this {what} was not processed; resend it after the restart"
        self._spawn(self._reject("draining", text, ids), section=None)

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
            status = await self._until_sink_answers(
                lambda: self._sink.lookup.remote(header.section, header.tile_id, header.seq, header.replaces)
            )
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
        # The sink refuses `section_ended` itself for an ended section.
        await self._until_sink_answers(lambda: self._sink.start_section.remote(name))

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
            assessment: BlurAssessment = await self._call(
                self._detector,
                lambda: self._detector.remote(pixels_ref, self._rig_at(header.pixel_size_nm)[0]),
            )
            if self._focus is not None:
                verdict = self._focus.observe(header.beam, header.pixel_size_nm, assessment)
                assessment, outcome.focus_alarm = verdict.assessment, verdict.alarm
            outcome.assessment = assessment
            outcome.timings_s["detect_s"] = time.perf_counter() - t0
            outcome.alarm = section.blur_share.observe(assessment.label, self._calibrated)
            if assessment.label == "soft" and section.blur_share.suspended:
                outcome.restore_suspended = True
            elif assessment.label == "soft":
                t1 = time.perf_counter()
                rig = self._rig_at(header.pixel_size_nm)[1]
                restored = await self._call(self._deblur, lambda: self._restore(pixels_ref, assessment, rig))
                outcome.timings_s["deblur_s"] = time.perf_counter() - t1
                restored_ref, outcome.deblur_version = restored.pixels_ref, restored.model_version
                self._metrics.deblur_busy_s.labels(replica=restored.replica).inc(restored.busy_s)
        except Exception as exc:  # a failing model must not lose the tile: it is written as acquired
            log.exception("tile %s/%s failed in processing", header.section, header.tile_id)
            outcome.failure = f"{type(exc).__name__}: {exc}"
            self._stats["failed"] += 1
        await self._until_sink_answers(lambda: self._sink.write_tile.remote(outcome, pixels_ref, restored_ref))
        self._stats["tiles_done"] += 1

    def _rig_at(self, pixel_size_nm: float) -> tuple[SpectralReferenceArrays | None, RigRestoration | None]:
        """The calibration's spectrum and restoration for tiles of pixel_size_nm (a section has one or a few)."""
        if self._calibration is None:
            return None, None
        if pixel_size_nm not in self._rig_by_pixel_size:
            if len(self._rig_by_pixel_size) >= RIG_PIXEL_SIZES_KEPT:  # a header field: bound what it can grow
                self._rig_by_pixel_size.clear()
            restoration = self._calibration.restoration_inputs(pixel_size_nm)
            self._rig_by_pixel_size[pixel_size_nm] = (
                self._calibration.spectral_arrays(pixel_size_nm),
                None if restoration is None else RigRestoration(*restoration),
            )
        return self._rig_by_pixel_size[pixel_size_nm]

    async def _restore(
        self, pixels_ref: ray.ObjectRef, assessment: BlurAssessment, rig: RigRestoration | None
    ) -> RestoredTile:
        """Deblur one tile and take the restored pixels over: the replica owns its ObjectRef, and a replica
        killed after answering would take the pixels with it before the sink reads them."""
        restored: RestoredTile = await self._deblur.remote(pixels_ref, assessment, rig)
        pixels = await restored.pixels_ref
        return RestoredTile(ray.put(pixels), restored.model_version, restored.replica, restored.busy_s)

    async def _until_sink_answers(self, call: Callable[[], Awaitable[T]]) -> T:
        """Call the sink until it answers: a dead sink is restarted by Ray (max_restarts) and its calls are
        idempotent, so the tile keeps its credit (the ingest stops reading) instead of being lost."""
        delay = SINK_RETRY_WAIT_S[0]
        while True:
            try:
                return await call()
            except Exception as exc:  # the outcome is not recorded: never give the credit back
                self._stats["sink_retries"] += 1
                log.error("sink did not record a tile outcome (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, SINK_RETRY_WAIT_S[1])

    async def _call(self, handle: DeploymentHandle, attempt: Callable[[], Awaitable[T]]) -> T:
        """One detector/deblur call (`attempt` calls `handle`); queue depth metered per deployment."""
        depth = self._metrics.queue_depth.labels(deployment=handle.deployment_name)
        depth.inc()
        try:
            return await self._retry_replica_death(handle.deployment_name, attempt)
        finally:
            depth.dec()

    async def _retry_replica_death(self, deployment: str, attempt: Callable[[], Awaitable[T]]) -> T:
        for wait_s in (*REPLICA_RETRY_WAITS_S, None):
            try:
                return await self._call_until_accepted(deployment, attempt)
            except REPLICA_DEATH as exc:
                if wait_s is None:
                    raise
                self._stats["replica_retries"] += 1
                log.warning("%s replica died during a call (%s); retrying in %.0f s", deployment, exc, wait_s)
                await asyncio.sleep(wait_s)
        raise AssertionError("unreachable")

    async def _call_until_accepted(self, deployment: str, attempt: Callable[[], Awaitable[T]]) -> T:
        delay = RETRY_DELAY_S[0]
        while True:
            try:
                return await attempt()
            except BackPressureError:
                self._stats["backpressure_retries"] += 1
                self._metrics.serve_rejections.labels(deployment=deployment).inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_S[1])

    async def _reject(self, code: str, message: str, context: dict[str, Any]) -> None:
        self._stats["rejected"] += 1
        log.warning("refused message (%s): %s", code, message)
        await self._until_sink_answers(lambda: self._sink.record_rejection.remote(code, message, context))

    async def _finish_section(self, end: SectionEnd) -> None:
        section = self._sections.pop(end.section, None)
        if section is not None and section.pending:
            await asyncio.gather(*list(section.pending), return_exceptions=True)
        await self._until_sink_answers(lambda: self._sink.finish_section.remote(end.section, end.n_tiles))
