"""Sink actor: writes each tile and its QC record durably, then tells the controller (result, retake).

A tile counts as done only after its file and its QC line are on disk; only then is its `result` sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import zmq

from appliance.config import OutputConfig
from appliance.messages import IMPLAUSIBLE_BLUR_SHARE, BlurShareAlarm, TileOutcome
from appliance.operator.metrics import SinkMetrics
from appliance.operator.report_figures import Thresholds
from appliance.operator.section_qc import TileQc
from appliance.operator.section_report import REPORT_FILENAME, write_section_report
from appliance.qc_record import QC_FILENAME, QcLine, QcRejection, QcTileRecord, TileAction, read_qc_lines
from appliance.stream.feedback import DEFAULT_MAX_PENDING, FeedbackChannel
from appliance.stream.protocol import ALARM_RESTARTED, ErrorCode, FeedbackType, TileHeader, encode_feedback
from appliance.tile_io import write_tile_atomic

log = logging.getLogger(__name__)


class QcLog:
    """Append-only JSON Lines QC record; each line is flushed (and fsynced) before it counts."""

    def __init__(self, path: Path, fsync: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fsync = fsync
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run

    def append(self, record: QcLine) -> None:
        self._handle.write(record.to_json_line() + "\n")
        self._handle.flush()
        if self._fsync:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def tile_paths(output_dir: Path, header: TileHeader) -> tuple[Path, Path]:
    """(delivered tile, kept original) paths for a tile; names come from validated protocol fields."""
    section_dir = output_dir / header.section
    return section_dir / f"{header.tile_id}.tif", section_dir / "originals" / f"{header.tile_id}.tif"


def _action(outcome: TileOutcome, restored: bool) -> TileAction:
    if outcome.failure:
        return "failed"
    if restored:
        return "restored"
    assert outcome.assessment is not None
    return "flagged" if outcome.assessment.label == "retake" else "written"


# ---- supervise branch: the minimal idempotence the restarts need (the durable branch replaces it with
# its SQLite index, same behaviour: a recorded tile is never written again, its answer is re-sent) ----

Answer = list[tuple[FeedbackType, dict[str, Any]]]


@dataclass(frozen=True)
class RecordedTile:
    """A tile whose outcome is durable: its seq and the answer frames it got (re-sent with `repeat`)."""

    seq: int
    answer: Answer


def answer_of(record: QcTileRecord) -> Answer:
    """The feedback a recorded tile gets: `result` (+ `retake`), or `error` when processing failed."""
    ids = {"section": record.section, "tile_id": record.tile_id, "seq": record.seq}
    if record.error:
        return [("error", {"code": "processing_failed", "message": f"tile written as acquired: {record.error}", **ids})]
    suspended = {"restore_suspended": True} if record.restore_suspended else {}
    result = dict(
        **ids,
        label=record.label,
        action=record.action,
        blur_score=record.blur_score,
        sigma_px=record.sigma_px,
        path=record.path,
        latency_s=record.timings_s.get("total_s", 0.0),
        **suspended,
    )
    answer: Answer = [("result", result)]
    if record.label == "retake":
        answer.append(("retake", {**ids, "reason": record.reason or "beyond repair", "blur_score": record.blur_score}))
    return answer


def recorded_tiles(qc_path: Path) -> dict[tuple[str, str], RecordedTile]:
    """Every tile outcome in an existing qc.jsonl by (section, tile_id): a restarted sink knows them all."""
    if not qc_path.is_file():
        return {}
    return {
        (line.section, line.tile_id): RecordedTile(line.seq, answer_of(line))
        for line in read_qc_lines(qc_path)
        if isinstance(line, QcTileRecord)
    }


# matplotlib holds the GIL for seconds on a large section: render in another worker, not in the sink.
_write_report_remote = ray.remote(num_cpus=0, max_retries=0)(write_section_report)


@ray.remote(num_cpus=0)
class SinkActor:
    """Owns the output directory, the QC record and the feedback socket (one writer for each)."""

    def __init__(
        self,
        output: OutputConfig,
        feedback_endpoint: str,
        thresholds: Thresholds | None = None,
        feedback_hwm: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self._output = output
        self._dir = Path(output.directory).resolve()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._recorded = recorded_tiles(self._dir / QC_FILENAME)
        self._writing: dict[tuple[str, str], asyncio.Event] = {}
        self._qc = QcLog(self._dir / QC_FILENAME, output.fsync)
        self._context = zmq.Context()
        self._feedback = FeedbackChannel(self._context, feedback_endpoint, feedback_hwm)
        self._n_held_s_seen = 0.0
        self._qc_lock = asyncio.Lock()
        self._counts: Counter[str] = Counter()
        self._section_counts: dict[str, Counter[str]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._metrics = SinkMetrics()
        self._thresholds = thresholds or Thresholds()
        # Compact per-tile rows of each open section, for its report (qc.jsonl grows for the whole run).
        self._section_tiles: dict[str, list[TileQc]] = {}
        self._reports: set[asyncio.Task[None]] = set()
        self._last_report = ""

    def endpoints(self) -> dict[str, str]:
        return {"feedback": self._feedback.endpoint, "output_dir": str(self._dir)}

    async def write_tile(self, outcome: TileOutcome, pixels: np.ndarray, restored: np.ndarray | None) -> str:
        """Write the delivered tile (+ original when restored), the QC line, then send feedback.

        pixels / restored: (H, W) uint8/uint16, usually ObjectRefs resolved by Ray. Returns the action,
        "repeat" for a tile already recorded (nothing written, its answer re-sent with `repeat: true`), or
        "rejected" for a tile_id recorded under another seq (refused duplicate_seq).
        Idempotent: the ingest calls it again after a sink restart until it answers.
        """
        header = outcome.header
        await self._feedback.wait_for_room()  # a controller not reading holds this tile (and its credit)
        key = (header.section, header.tile_id)
        while key in self._writing:  # e.g. a restarted ingest's copy while the first is still being written
            await self._writing[key].wait()
        known = self.lookup(header.section, header.tile_id, header.seq)
        if known != "new":
            return "repeat" if known == "recorded" else await self._refuse_conflict(header)
        self._writing[key] = asyncio.Event()
        try:
            return await self._write_new_tile(outcome, pixels, restored)
        finally:
            self._writing.pop(key).set()

    async def _write_new_tile(self, outcome: TileOutcome, pixels: np.ndarray, restored: np.ndarray | None) -> str:
        header = outcome.header
        delivered_path, original_path = tile_paths(self._dir, header)
        t0 = time.perf_counter()
        delivered = restored if restored is not None and not outcome.failure else pixels
        is_restored = delivered is restored
        await asyncio.to_thread(write_tile_atomic, delivered_path, delivered, self._output.fsync)
        kept_original = is_restored and self._output.keep_originals
        if kept_original:
            await asyncio.to_thread(write_tile_atomic, original_path, pixels, self._output.fsync)
        action = _action(outcome, is_restored)
        timings = {**outcome.timings_s, "write_s": time.perf_counter() - t0}
        latency_s = time.time() - outcome.t_received
        timings["total_s"] = latency_s
        assessment = outcome.assessment
        record = QcTileRecord(
            t=time.time(),
            section=header.section,
            tile_id=header.tile_id,
            seq=header.seq,
            action=action,
            path=str(delivered_path.relative_to(self._dir)),
            original_path=str(original_path.relative_to(self._dir)) if kept_original else None,
            shape=list(header.shape),
            dtype=header.dtype,
            pixel_size_nm=header.pixel_size_nm,
            stage_x_um=header.stage_x_um,
            stage_y_um=header.stage_y_um,
            t_acquired=header.t_acquired,
            beam=header.beam,
            **QcTileRecord.verdict_fields(assessment),
            deblur_version=outcome.deblur_version if is_restored else None,
            error=outcome.failure or None,
            timings_s=timings,
            **({"restore_suspended": True} if outcome.restore_suspended else {}),
        )
        async with self._qc_lock:
            await asyncio.to_thread(self._qc.append, record)
        self._count(header.section, "error" if outcome.failure else str(record.label))
        self._section_tiles.setdefault(header.section, []).append(TileQc.from_record(record))
        self._metrics.observe_tile(record.label, action, header.beam, record.sigma_px, timings)
        ids = {"section": header.section, "tile_id": header.tile_id, "seq": header.seq}
        if outcome.alarm is not None:
            self._send_alarm(outcome.alarm, ids)
        if outcome.restore_suspended:
            self._metrics.restore_suspended.inc()
        answer = answer_of(record)
        self._recorded[(header.section, header.tile_id)] = RecordedTile(header.seq, answer)
        self._send_answer(answer)
        return action

    async def record_rejection(self, code: ErrorCode, message: str, context: dict[str, Any]) -> None:
        """A message was refused: QC line first (durable), then the error to the controller."""
        await self._feedback.wait_for_room()
        ids = {key: context.get(key) for key in ("section", "tile_id", "seq")}
        record = QcRejection(t=time.time(), **ids, action="rejected", code=code, error=message)
        async with self._qc_lock:
            await asyncio.to_thread(self._qc.append, record)
        self._counts["rejected"] += 1
        self._send_error(code, message, ids)

    def lookup(self, section: str, tile_id: str, seq: int) -> str:
        """ "new", "recorded" (its recorded answer is re-sent now with `repeat: true`) or "conflict"
        (tile_id recorded under another seq: the caller refuses it duplicate_seq)."""
        known = self._recorded.get((section, tile_id))
        if known is None:
            return "new"
        if known.seq != seq:
            return "conflict"
        self._send_answer(known.answer, repeat=True)
        self._counts["repeat"] += 1
        return "recorded"

    async def _refuse_conflict(self, header: TileHeader) -> str:
        ids = {"section": header.section, "tile_id": header.tile_id, "seq": header.seq}
        message = f"tile_id {header.tile_id!r} was already recorded in section {header.section!r} under another seq"
        await self.record_rejection("duplicate_seq", message, ids)
        return "rejected"

    def send_draining(self, message: str) -> None:
        """Tell the controller the appliance is stopping: stop sending; unanswered tiles are resent after restart."""
        log.warning("draining: %s", message)
        self._send(encode_feedback("draining", message=message))

    def send_restarted(self, which: str) -> None:
        """Supervision restarted `which` ("ingest" | "sink"): the controller resends every unanswered tile now."""
        message = f"the {which} was restarted after a failure; resend every tile without an answer"
        log.error("ALARM restarted: %s", message)
        self._metrics.alarms.labels(kind=ALARM_RESTARTED).inc()
        self._send(encode_feedback("alarm", kind=ALARM_RESTARTED, which=which, message=message))

    def health(self) -> int:
        """This actor's process id: the supervisor sees a restart as a new pid (and kills it in tests)."""
        return os.getpid()

    async def finish_section(self, section: str, n_expected: int | None) -> dict[str, int | None]:
        """All tiles of `section` are done: send `section_done` with its counts."""
        counts = self._section_counts.pop(section, Counter())
        summary: dict[str, int | None] = {
            "n_done": sum(counts.values()),
            "n_sharp": counts["sharp"],
            "n_soft": counts["soft"],
            "n_retake": counts["retake"],
            "n_error": counts["error"],
            "n_expected": n_expected,
        }
        self._send(encode_feedback("section_done", section=section, **summary))
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
        self._feedback.close()
        self._context.term()
        self._qc.close()
        return stats

    def _count(self, section: str, outcome: str) -> None:
        self._counts[outcome] += 1
        self._section_counts.setdefault(section, Counter())[outcome] += 1

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

    def _send_answer(self, answer: Answer, repeat: bool = False) -> None:
        for kind, fields in answer:
            if kind == "error":
                self._metrics.errors.labels(code=fields["code"]).inc()
            elif kind == "retake" and not repeat:
                self._metrics.retake_flags.inc()
            self._send(encode_feedback(kind, **fields, **({"repeat": True} if repeat else {})))

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
