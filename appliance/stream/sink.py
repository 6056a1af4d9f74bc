"""Sink actor: writes each tile and its QC record durably, indexes it, then tells the controller.

A tile counts as done only after its file, its QC line and its index row are on disk; only then is its
answer sent. The index (appliance/stream/tile_index.py) makes the sink idempotent: a tile already
answered is answered again with `repeat: true`, never written again, also after a restart. Disk full
is backpressure: the write is retried every second while the tile keeps its credit (protocol v1.1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import ray
import zmq

from appliance.config import OutputConfig, SecurityConfig
from appliance.messages import FOCUS_DRIFT, IMPLAUSIBLE_BLUR_SHARE, BlurShareAlarm, FocusDriftAlarm, TileOutcome
from appliance.operator.metrics import SinkMetrics
from appliance.operator.report_figures import Thresholds
from appliance.operator.section_qc import TileQc
from appliance.operator.section_report import REPORT_FILENAME, write_section_report
from appliance.qc_record import (
    INDEX_FILENAME,
    QC_FILENAME,
    QcLine,
    QcRejection,
    QcStorageFailure,
    QcSuperseded,
    QcTileRecord,
    TileAction,
)
from appliance.stream.answers import answer_frames, storage_failed_frame
from appliance.stream.feedback import DEFAULT_MAX_PENDING, FeedbackChannel
from appliance.stream.protocol import (
    ALARM_RESTARTED,
    ErrorCode,
    TileHeader,
    as_repeat,
    duplicate_message,
    encode_feedback,
    unpack_map,
)
from appliance.stream.qc_log import QcLog
from appliance.stream.tile_index import TileIndex, TileRow, is_section_name
from appliance.tile_io import is_disk_full, move_durably, sweep_part_files, write_tile_atomic

log = logging.getLogger(__name__)

DISK_FULL_RETRY_S = 1.0
REPLACED_DIRNAME = "replaced"
# lookup()/admission: new (process it), recorded (answer re-sent with repeat), conflict (refuse
# duplicate_seq), refused (section_ended / unknown_tile: the sink sent and recorded the error).
Admission = Literal["new", "recorded", "conflict", "refused"]
StorageErrors = (OSError, sqlite3.Error)
T = TypeVar("T")


@dataclass(frozen=True)
class Refusal:
    code: ErrorCode
    message: str


def tile_paths(output_dir: Path, header: TileHeader) -> tuple[Path, Path]:
    """(delivered tile, kept original) paths for a new tile; names come from validated protocol fields."""
    section_dir = output_dir / header.section
    return section_dir / f"{header.tile_id}.tif", section_dir / "originals" / f"{header.tile_id}.tif"


def _action(outcome: TileOutcome, restored: bool) -> TileAction:
    if outcome.failure:
        return "failed"
    if restored:
        return "restored"
    assert outcome.assessment is not None
    return "flagged" if outcome.assessment.label == "retake" else "written"


def _ids(section: str | None, tile_id: str | None, seq: int | None) -> dict[str, Any]:
    return {"section": section, "tile_id": tile_id, "seq": seq}


# matplotlib holds the GIL for seconds on a large section: render in another worker, not in the sink.
_write_report_remote = ray.remote(num_cpus=0, max_retries=0)(write_section_report)


@ray.remote(num_cpus=0)
class SinkActor:
    """Owns the output directory, the QC record, the tile index and the feedback socket (one writer each).

    Start-up (also when Ray restarts the actor): sweep `.part` temp files, cut a torn last QC line,
    open the index and apply the QC lines it missed (tile_index.py): every tile ever recorded is known.
    """

    def __init__(
        self,
        output: OutputConfig,
        feedback_endpoint: str,
        thresholds: Thresholds | None = None,
        feedback_hwm: int = DEFAULT_MAX_PENDING,
        security: SecurityConfig | None = None,
    ) -> None:
        self._output = output
        self._dir = Path(output.directory).resolve()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._n_swept = sweep_part_files(self._dir)
        log.log(logging.WARNING if self._n_swept else logging.INFO, "removed %d .part temp file(s)", self._n_swept)
        self._qc = QcLog(self._dir / QC_FILENAME, output.fsync)
        self._index = TileIndex(self._dir / INDEX_FILENAME, output.fsync)
        self._n_reconciled = self._index.reconcile(self._qc.path)
        log.info("index %s: %d tile(s) known", self._index.path, self._index.n_tiles())
        self._context = zmq.Context()
        self._feedback = FeedbackChannel(self._context, feedback_endpoint, feedback_hwm, security)
        self._n_held_s_seen = 0.0
        # QC append + index commit happen in this order for every line: the index's qc offset stays exact.
        self._record_lock = asyncio.Lock()
        self._writing: dict[tuple[str, str], asyncio.Event] = {}
        self._disk_full_since: float | None = None
        self._counts: Counter[str] = Counter()
        # Refusals whose QC line/index row could not be written: still counted in section_done.
        self._unrecorded_rejections: Counter[str] = Counter()
        self._flusher: asyncio.Task[None] | None = None
        self._metrics = SinkMetrics()
        self._thresholds = thresholds or Thresholds()
        # Compact per-tile rows of each open section, for its report (qc.jsonl grows for the whole run).
        self._section_tiles: dict[str, list[TileQc]] = {}
        self._reports: set[asyncio.Task[None]] = set()
        self._last_report = ""

    def endpoints(self) -> dict[str, str]:
        return {"feedback": self._feedback.endpoint, "output_dir": str(self._dir)}

    async def lookup(self, section: str, tile_id: str, seq: int, replaces: str | None = None) -> Admission:
        """What to do with an arriving tile (the ingest asks before processing it).

        "new": process it. "recorded": already answered; this call re-sent its answer with
        `repeat: true`. "conflict": tile_id or seq used by another message; the caller refuses it
        `duplicate_seq`. "refused": `section_ended` or `unknown_tile`; this call sent and recorded
        the error. Waits while the same tile is being written. Raises nothing for any tile.
        """
        await self._wait_unclaimed(section, tile_id)
        status, refusal = self._admission(section, tile_id, seq, replaces)
        if status == "recorded":
            await self._repeat(section, tile_id)
        elif refusal is not None:
            await self.record_rejection(refusal.code, refusal.message, _ids(section, tile_id, seq))
        return status

    async def start_section(self, section: str) -> bool:
        """A `start` message: opens the section, or refuses it `section_ended` when it has ended."""
        if self._index.section_state(section) == "ended":
            message = f"section {section!r} has ended; a start cannot reopen it: name a new section"
            await self.record_rejection("section_ended", message, {"section": section})
            return False
        try:
            await asyncio.to_thread(self._index.open_section, section)
        except StorageErrors as exc:  # the first tile opens it again
            log.error("section %s: could not record its start: %r", section, exc)
        return True

    async def write_tile(self, outcome: TileOutcome, pixels: np.ndarray, restored: np.ndarray | None) -> str:
        """Write the delivered tile (+ original when restored), the QC line and the index row, then answer.

        pixels / restored: (H, W) uint8/uint16, usually ObjectRefs resolved by Ray. Idempotent: a tile
        already recorded is not written again; its recorded answer is re-sent with `repeat: true`.
        Returns the QC action, or "repeat", "rejected", "storage_failed".
        """
        header = outcome.header
        await self._feedback.wait_for_room()  # a controller not reading holds this tile (and its credit)
        await self._wait_unclaimed(header.section, header.tile_id)
        status, refusal = self._admission(header.section, header.tile_id, header.seq, header.replaces)
        if status == "recorded":
            await self._repeat(header.section, header.tile_id)
            return "repeat"
        if status != "new":
            refusal = refusal or Refusal("duplicate_seq", duplicate_message(header.section, header.tile_id, header.seq))
            await self.record_rejection(refusal.code, refusal.message, _ids(header.section, header.tile_id, header.seq))
            return "rejected"
        key = (header.section, header.tile_id)
        self._writing[key] = asyncio.Event()
        try:
            return await self._write_new(outcome, pixels, restored)
        finally:
            self._writing.pop(key).set()

    async def record_rejection(self, code: ErrorCode, message: str, context: dict[str, Any]) -> None:
        """A message was refused: QC line and index count first (one try), then the error, always."""
        await self._feedback.wait_for_room()
        ids = {key: context.get(key) for key in ("section", "tile_id", "seq")}
        record = QcRejection(t=time.time(), **ids, action="rejected", code=code, error=message)
        try:
            await self._record([record], ids, wait_when_full=False)
        except StorageErrors as exc:
            log.error("refused message %s could not be recorded (%r); its error is sent anyway", ids, exc)
            if is_section_name(section := ids["section"]):
                self._unrecorded_rejections[str(section)] += 1
        self._counts["rejected"] += 1
        self._send_error(code, message, ids)

    def send_draining(self, message: str) -> None:
        """Tell the controller the appliance is stopping: stop sending; unanswered tiles are resent after restart."""
        log.warning("draining: %s", message)
        self._send(encode_feedback("draining", message=message))

    def release_held_feedback(self) -> None:
        """The stop cannot wait for a controller that does not read: record the held tiles now (ingest.drain)."""
        if self._feedback.pending >= self._feedback.max_pending:
            log.error(
                "stopping: the controller has not read its feedback (%d frames waiting); the tiles held for it are "
                "recorded now, and answers it never takes are lost with the socket: it resends those tiles after "
                "the restart and gets `repeat` answers",
                self._feedback.pending,
            )
        self._feedback.release_held()

    def send_restarted(self, which: str) -> None:
        """Supervision restarted `which` ("ingest" | "sink"): the controller resends every unanswered tile now."""
        message = f"the {which} was restarted after a failure; resend every tile without an answer"
        log.error("ALARM restarted: %s", message)
        self._metrics.alarms.labels(kind=ALARM_RESTARTED).inc()
        self._send(encode_feedback("alarm", kind=ALARM_RESTARTED, which=which, message=message))

    def health(self) -> int:
        """This actor's process id: the supervisor sees a restart as a new pid (and kills it in tests)."""
        return os.getpid()

    async def finish_section(self, section: str, n_expected: int | None) -> dict[str, Any]:
        """All tiles of `section` are done: mark it ended and send `section_done` with its counts.

        A second `end` (a resend) gets the recorded `section_done` again with `repeat: true`.
        """
        recorded = self._index.section_done_frame(section)
        if recorded is not None:
            self._send(as_repeat(recorded))
            await self._count_repeat(section)
            return {**unpack_map(recorded), "repeat": True}
        counts = self._index.counts(section)
        counts["n_rejected"] += self._unrecorded_rejections.pop(section, 0)
        summary: dict[str, Any] = {**counts, "n_expected": n_expected}
        frame = encode_feedback("section_done", section=section, **summary)
        try:
            await self._until_written(lambda: self._index.end_section(section, n_expected, frame), {"section": section})
        except StorageErrors as exc:  # the counts still go out; a later `end` is answered afresh
            log.error("section %s: could not record its end: %r", section, exc)
        self._send(frame)
        self._metrics.sections_done.inc()
        tiles = self._section_tiles.pop(section, [])
        if tiles:
            task = asyncio.get_running_loop().create_task(self._write_report(section, tiles))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)
        return summary

    async def _write_report(self, section: str, tiles: list[TileQc]) -> None:
        out_path = self._dir / section / REPORT_FILENAME
        try:
            await _write_report_remote.remote(section, tiles, self._dir, out_path, self._thresholds)
        except Exception as exc:  # the tiles and qc.jsonl are safe; `python -m appliance report` redoes it
            log.error("section %s: could not write %s: %r", section, out_path, exc)
            self._metrics.reports.labels(result="failed").inc()
            return
        self._metrics.reports.labels(result="written").inc()
        self._last_report = str(out_path)

    def stats(self) -> dict[str, int]:
        return {
            **self._counts,
            "part_files_swept": self._n_swept,
            "qc_lines_reconciled": self._n_reconciled,
            "feedback_pending": self._feedback.pending,
            "feedback_max_pending": self._feedback.max_pending_seen,
            "feedback_held_ms": round(self._feedback.waited_s * 1000),
        }

    def last_report(self) -> str:
        """Path of the newest section report written ("" before the first)."""
        return self._last_report

    def metrics_text(self) -> bytes:
        """This actor's Prometheus metrics (text format), for the driver's /metrics endpoint."""
        self._metrics.feedback_pending.set(self._feedback.pending)
        self._metrics.feedback_held_s.inc(self._feedback.waited_s - self._n_held_s_seen)
        self._n_held_s_seen = self._feedback.waited_s
        return self._metrics.exposition()

    async def close(self) -> dict[str, int]:
        """Finish section reports, flush what the controller has not taken yet (bounded by LINGER), close files."""
        if self._reports:
            await asyncio.gather(*list(self._reports))
        if self._flusher is not None:
            self._flusher.cancel()
        stats = self.stats()
        stats["feedback_undelivered_at_stop"] = undelivered = self._feedback.close()
        if undelivered:
            log.error("stopped with %d answers the controller never took: it resends those tiles", undelivered)
        self._context.term()
        self._qc.close()
        self._index.close()
        return stats

    # ---- admission and repeats ----

    def _admission(
        self, section: str, tile_id: str, seq: int, replaces: str | None
    ) -> tuple[Admission, Refusal | None]:
        """The resend rule, the section lifecycle and the retake loop's checks (docs/protocol.md)."""
        row = self._index.get(section, tile_id)
        if row is not None and row.answered:
            return ("recorded", None) if row.seq == seq else ("conflict", None)
        other = self._index.at_seq(section, seq)
        if other is not None and other.tile_id != tile_id:
            return "conflict", None
        if replaces is None:
            # A resend of a tile whose storage failed is still owed its answer, also after `end`.
            if row is None and self._index.section_state(section) == "ended":
                message = f"section {section!r} has ended: after `end` only retakes (with `replaces`) are accepted"
                return "refused", Refusal("section_ended", message)
            return "new", None
        target = self._index.get(section, replaces)
        if target is None or not target.answered or replaces == tile_id:
            message = f"replaces {replaces!r}: no delivered tile with that tile_id in section {section!r}"
            return "refused", Refusal("unknown_tile", message)
        if target.superseded_by is not None:
            message = (
                f"replaces {replaces!r}: that tile was already replaced by {target.superseded_by!r}; "
                "name the newest tile in `replaces`"
            )
            return "refused", Refusal("unknown_tile", message)
        return "new", None

    async def _wait_unclaimed(self, section: str, tile_id: str) -> None:
        # A second copy of a tile being written waits for the first, then is answered as a repeat.
        while (event := self._writing.get((section, tile_id))) is not None:
            await event.wait()

    async def _repeat(self, section: str, tile_id: str) -> None:
        row = self._index.get(section, tile_id)
        assert row is not None
        for frame in row.frames:
            self._send(as_repeat(frame))
        await self._count_repeat(section)

    async def _count_repeat(self, section: str) -> None:
        self._counts["repeat"] += 1
        try:
            await asyncio.to_thread(self._index.record_repeat, section)
        except StorageErrors as exc:
            log.error("section %s: could not count a repeat answer: %r", section, exc)

    # ---- writing a new tile ----

    async def _write_new(self, outcome: TileOutcome, pixels: np.ndarray, restored: np.ndarray | None) -> str:
        header = outcome.header
        ids = _ids(header.section, header.tile_id, header.seq)
        delivered = restored if restored is not None and not outcome.failure else pixels
        is_restored = delivered is restored
        kept_original = is_restored and self._output.keep_originals
        delivered_path, original_path = tile_paths(self._dir, header)
        replaced = self._index.get(header.section, header.replaces) if header.replaces else None
        if replaced is not None:  # the retake is delivered where the flagged tile was
            delivered_path = self._dir / replaced.path
        t0 = time.perf_counter()

        def store_files() -> None:
            moved = self._move_replaced(replaced) if replaced is not None else None
            try:
                write_tile_atomic(delivered_path, delivered, self._output.fsync)
            except BaseException:
                if moved is not None:  # a failed retake leaves the flagged tile delivered, as before
                    move_durably(moved, delivered_path, self._output.fsync)
                raise
            if kept_original:
                write_tile_atomic(original_path, pixels, self._output.fsync)

        relative = str(delivered_path.relative_to(self._dir))
        try:
            await self._until_written(store_files, ids)
        except StorageErrors as exc:
            return await self._storage_failed(outcome, relative, exc)
        action = _action(outcome, is_restored)
        timings = {
            **outcome.timings_s,
            "write_s": time.perf_counter() - t0,
            "total_s": time.time() - outcome.t_received,
        }
        record = QcTileRecord(
            t=time.time(),
            **ids,
            action=action,
            path=relative,
            original_path=str(original_path.relative_to(self._dir)) if kept_original else None,
            shape=list(header.shape),
            dtype=header.dtype,
            pixel_size_nm=header.pixel_size_nm,
            stage_x_um=header.stage_x_um,
            stage_y_um=header.stage_y_um,
            t_acquired=header.t_acquired,
            beam=header.beam,
            **QcTileRecord.verdict_fields(outcome.assessment),
            deblur_version=outcome.deblur_version if is_restored else None,
            error=outcome.failure or None,
            timings_s=timings,
            **({"replaces": header.replaces} if header.replaces else {}),
            **({"restore_suspended": True} if outcome.restore_suspended else {}),
        )
        lines: list[QcLine] = [record]
        if replaced is not None:
            lines.append(self._superseded_line(replaced, header.tile_id))
        try:
            await self._record(lines, ids)
        except StorageErrors as exc:
            return await self._storage_failed(outcome, relative, exc)
        self._disk_ok()
        self._answer(outcome, record)
        return action

    def _superseded_line(self, replaced: TileRow, by_tile_id: str) -> QcSuperseded:
        return QcSuperseded(
            t=time.time(),
            section=replaced.section,
            tile_id=replaced.tile_id,
            seq=replaced.seq,
            action="superseded",
            superseded_by=by_tile_id,
            path=f"{replaced.section}/{REPLACED_DIRNAME}/{replaced.tile_id}.tif",
            delivered_path=replaced.path,
        )

    def _move_replaced(self, replaced: TileRow) -> Path | None:
        """Keep the flagged tile's file: <section>/replaced/<tile_id>.tif (never deleted); its new path.

        None when an earlier try of this retake (never answered) had moved it already.
        """
        kept = self._dir / replaced.section / REPLACED_DIRNAME / f"{replaced.tile_id}.tif"
        if kept.exists():
            return None
        move_durably(self._dir / replaced.path, kept, self._output.fsync)
        return kept

    def _answer(self, outcome: TileOutcome, record: QcTileRecord) -> None:
        """The tile is durable: count it, then alarm (if it tripped one), result [+ retake] or error."""
        header = outcome.header
        self._counts["error" if outcome.failure else str(record.label)] += 1
        self._section_tiles.setdefault(header.section, []).append(TileQc.from_record(record))
        self._metrics.observe_tile(record.label, record.action, header.beam, record.sigma_px, record.timings_s)
        if outcome.alarm is not None:
            self._send_alarm(outcome.alarm, _ids(header.section, header.tile_id, header.seq))
        if outcome.focus_alarm is not None:
            self._send_focus_alarm(outcome.focus_alarm, _ids(header.section, header.tile_id, header.seq))
        if outcome.restore_suspended:
            self._metrics.restore_suspended.inc()
        if outcome.failure:
            self._metrics.errors.labels(code="processing_failed").inc()
        elif record.label == "retake":
            self._metrics.retake_flags.inc()
        for frame in answer_frames(record):
            self._send(frame)

    async def _storage_failed(self, outcome: TileOutcome, relative: str, exc: BaseException) -> str:
        """The tile could not be stored: record that where possible, answer `storage_failed` (resend later)."""
        header = outcome.header
        log.error("tile %s/%s: could not be stored: %r", header.section, header.tile_id, exc)
        line = QcStorageFailure(
            t=time.time(),
            section=header.section,
            tile_id=header.tile_id,
            seq=header.seq,
            action="storage_failed",
            path=relative,
            label=outcome.assessment.label if outcome.assessment else None,
            error=f"{type(exc).__name__}: {exc}",
        )
        try:
            await self._record([line], _ids(header.section, header.tile_id, header.seq), wait_when_full=False)
        except StorageErrors as record_exc:
            log.error(
                "tile %s/%s: the storage failure could not be recorded: %r", header.section, header.tile_id, record_exc
            )
        self._counts["storage_failed"] += 1
        self._metrics.errors.labels(code="storage_failed").inc()
        if outcome.focus_alarm is not None:  # beam state, not the tile's: the resend will not raise it again
            self._send_focus_alarm(outcome.focus_alarm, _ids(header.section, header.tile_id, header.seq))
        self._send(storage_failed_frame(line))
        return "storage_failed"

    # ---- durable steps, disk full ----

    async def _record(self, lines: list[QcLine], ids: dict[str, Any], wait_when_full: bool = True) -> None:
        """QC line(s) appended (whole, fsynced), then the index commit covering them, in one order for all."""
        async with self._record_lock:
            if wait_when_full:
                size = await self._until_written(lambda: self._qc.append(*lines), ids)
                await self._until_written(lambda: self._index.record_lines(lines, size), ids)
            else:
                size = await asyncio.to_thread(self._qc.append, *lines)
                await asyncio.to_thread(self._index.record_lines, lines, size)

    async def _until_written(self, step: Callable[[], T], ids: dict[str, Any]) -> T:
        """Run a blocking write step in a thread; while the disk is full, retry it every second (backpressure).

        Any other storage error is raised (the caller answers storage_failed).
        """
        while True:
            try:
                return await asyncio.to_thread(step)
            except StorageErrors as exc:
                if not is_disk_full(exc):
                    raise
                self._disk_full(exc, ids)
            await asyncio.sleep(DISK_FULL_RETRY_S)

    def _disk_full(self, exc: BaseException, ids: dict[str, Any]) -> None:
        if self._disk_full_since is not None:
            return
        self._disk_full_since = time.monotonic()
        free = shutil.disk_usage(self._dir).free
        message = (
            f"output disk full ({exc}): tiles are held and retried every {DISK_FULL_RETRY_S:.0f} s, the appliance "
            f"stops reading (your send blocks); free space in {self._dir}"
        )
        log.error("ALARM disk_full: %s", message)
        self._metrics.alarms.labels(kind="disk_full").inc()
        present = {key: value for key, value in ids.items() if value is not None}
        self._send(
            encode_feedback(
                "alarm", kind="disk_full", message=message, directory=str(self._dir), free_bytes=free, **present
            )
        )

    def _disk_ok(self) -> None:
        if self._disk_full_since is None:
            return
        waited_s = round(time.monotonic() - self._disk_full_since, 3)
        self._disk_full_since = None
        message = f"output disk writable again after {waited_s:.1f} s: held tiles are being written"
        log.warning("disk_ok: %s", message)
        self._metrics.alarms.labels(kind="disk_ok").inc()
        self._send(
            encode_feedback(
                "alarm",
                kind="disk_ok",
                message=message,
                directory=str(self._dir),
                waited_s=waited_s,
                free_bytes=shutil.disk_usage(self._dir).free,
            )
        )

    def _send_alarm(self, alarm: BlurShareAlarm, ids: dict[str, Any]) -> None:
        """The safety rule tripped on this tile (stream.blur_share): log it loudly, count it, tell the controller."""
        message = alarm.message(ids["section"])
        log.error("ALARM implausible_blur_share: %s", message)
        self._metrics.alarms.labels(kind=IMPLAUSIBLE_BLUR_SHARE).inc()
        self._send(
            encode_feedback(
                "alarm",
                kind=IMPLAUSIBLE_BLUR_SHARE,
                **ids,
                n_judged=alarm.n_judged,
                n_soft=alarm.n_soft,
                n_retake=alarm.n_retake,
                share=round(alarm.share, 4),
                threshold=alarm.threshold,
                min_tiles=alarm.min_tiles,
                calibrated=alarm.calibrated,
                message=message,
            )
        )

    def _send_focus_alarm(self, alarm: FocusDriftAlarm, ids: dict[str, Any]) -> None:
        """A beam's focus drifted or came back (detection.online_baseline): log, count, tell the controller."""
        message = alarm.message()
        log.log(logging.ERROR if alarm.kind == FOCUS_DRIFT else logging.WARNING, "ALARM %s: %s", alarm.kind, message)
        self._metrics.alarms.labels(kind=alarm.kind).inc()
        self._metrics.beam_focus_drift.labels(beam=alarm.beam_name).set(int(alarm.kind == FOCUS_DRIFT))
        self._send(encode_feedback("alarm", **ids, **alarm.wire_fields(), message=message))

    def _send_error(self, code: ErrorCode, message: str, ids: dict[str, Any]) -> None:
        self._metrics.errors.labels(code=code).inc()
        self._send(encode_feedback("error", code=code, message=message, **ids))

    def _send(self, frame: bytes) -> None:
        # Frames queued while the controller was away go out even when no new tile arrives.
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())
        self._feedback.send(frame)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self._feedback.pending:
                self._feedback.flush()
