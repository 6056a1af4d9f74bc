"""Durable index of every tile the sink answered: `index.sqlite` in the output directory (protocol v1.1).

One row per tile `(section, tile_id)`: its seq, outcome, delivered path, retake links and the exact
feedback frames that answered it, so that a resent tile is answered again, never written again, also
after a restart. One row per section: open or ended, refused and repeated message counts, and the
`section_done` frame sent at its `end`.

Write order (the sink): tile file(s) durable -> QC line(s) appended and fsynced -> index row committed
(with the qc.jsonl size it covers) -> feedback sent. A crash between the QC append and the commit
leaves lines past the recorded size: `reconcile` replays them at start-up, so qc.jsonl is the source
of truth for what is durable and the index never knows less than it. Lines before the recorded size
are never read again (qc.jsonl grows for the life of the rig). A missing index is rebuilt from the
whole of qc.jsonl (section end states are then unknown: those sections count as open).

Single writer: only the sink opens it. Every method holds one lock (the sink calls from worker threads).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgpack

from appliance.qc_record import (
    QcLine,
    QcRejection,
    QcStorageFailure,
    QcSuperseded,
    QcTileRecord,
    parse_qc_line,
)
from appliance.stream.answers import answer_frames, storage_failed_frame
from appliance.stream.protocol import RESERVED_SECTION_NAMES, SECTION_NAME

log = logging.getLogger(__name__)

STORAGE_FAILED = "storage_failed"
RECONCILE_BATCH = 10_000  # QC lines per commit while rebuilding
SectionState = Literal["open", "ended"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tiles (
    section TEXT NOT NULL,
    tile_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    outcome TEXT NOT NULL,          -- sharp | soft | retake | error (processing_failed) | storage_failed
    action TEXT NOT NULL,           -- the QC action: written | restored | flagged | failed | storage_failed
    path TEXT NOT NULL,             -- delivered file, relative to the output directory
    original_path TEXT,
    replaces TEXT,
    superseded_by TEXT,
    frames BLOB NOT NULL,           -- msgpack array of the feedback frames that answered the tile
    t REAL NOT NULL,
    PRIMARY KEY (section, tile_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS tiles_by_seq ON tiles (section, seq);
CREATE TABLE IF NOT EXISTS sections (
    section TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'open',
    n_expected INTEGER,
    n_rejected INTEGER NOT NULL DEFAULT 0,
    n_repeat INTEGER NOT NULL DEFAULT 0,
    done_frame BLOB
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class TileRow:
    """What the index knows about one tile."""

    section: str
    tile_id: str
    seq: int
    outcome: str
    action: str
    path: str
    original_path: str | None
    replaces: str | None
    superseded_by: str | None
    frames: list[bytes]

    @property
    def answered(self) -> bool:
        """A final outcome: resends get this answer again. storage_failed is not final (resend retries)."""
        return self.outcome != STORAGE_FAILED


def is_section_name(name: object) -> bool:
    """Whether `name` is a valid section (refused messages are attributed to it only then)."""
    return isinstance(name, str) and re.fullmatch(SECTION_NAME, name) is not None and name not in RESERVED_SECTION_NAMES


class TileIndex:
    """SQLite index (WAL; synchronous FULL when `fsync`: a commit is on disk when it returns)."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self._db.executescript(_SCHEMA)

    # ---- reads ----

    def get(self, section: str, tile_id: str) -> TileRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM tiles WHERE section = ? AND tile_id = ?", (section, tile_id)
            ).fetchone()
        return _tile_row(row)

    def at_seq(self, section: str, seq: int) -> TileRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tiles WHERE section = ? AND seq = ?", (section, seq)).fetchone()
        return _tile_row(row)

    def section_state(self, section: str) -> SectionState | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM sections WHERE section = ?", (section,)).fetchone()
        return None if row is None else row[0]

    def section_done_frame(self, section: str) -> bytes | None:
        """The `section_done` frame sent at the section's `end`, None before it."""
        with self._lock:
            row = self._db.execute("SELECT done_frame FROM sections WHERE section = ?", (section,)).fetchone()
        return None if row is None else row[0]

    def counts(self, section: str) -> dict[str, int]:
        """section_done counts: tiles by latest outcome (n_error includes storage_failed), refused, repeated."""
        with self._lock:
            by_outcome = dict(
                self._db.execute("SELECT outcome, COUNT(*) FROM tiles WHERE section = ? GROUP BY outcome", (section,))
            )
            row = self._db.execute("SELECT n_rejected, n_repeat FROM sections WHERE section = ?", (section,)).fetchone()
        n_rejected, n_repeat = row if row is not None else (0, 0)
        counts = {
            "n_sharp": by_outcome.get("sharp", 0),
            "n_soft": by_outcome.get("soft", 0),
            "n_retake": by_outcome.get("retake", 0),
            "n_empty": by_outcome.get("empty", 0),
            "n_error": by_outcome.get("error", 0) + by_outcome.get(STORAGE_FAILED, 0),
        }
        return {"n_done": sum(counts.values()), **counts, "n_rejected": n_rejected, "n_repeat": n_repeat}

    def qc_offset(self) -> int:
        """Bytes of qc.jsonl whose every line is in the index."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'qc_offset'").fetchone()
        return 0 if row is None else int(row[0])

    def n_tiles(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM tiles").fetchone()[0])

    # ---- writes (each one transaction) ----

    def record_lines(self, lines: Iterable[QcLine], qc_offset: int) -> None:
        """Apply QC lines just made durable (qc.jsonl is now `qc_offset` bytes long) in one commit."""
        with self._lock, self._transaction():
            for line in lines:
                self._apply(line)
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('qc_offset', ?)", (qc_offset,))

    def record_repeat(self, section: str) -> None:
        with self._lock, self._transaction():
            self._open(section)
            self._db.execute("UPDATE sections SET n_repeat = n_repeat + 1 WHERE section = ?", (section,))

    def open_section(self, section: str) -> None:
        with self._lock, self._transaction():
            self._open(section)

    def end_section(self, section: str, n_expected: int | None, done_frame: bytes) -> None:
        with self._lock, self._transaction():
            self._open(section)
            self._db.execute(
                "UPDATE sections SET state = 'ended', n_expected = ?, done_frame = ? WHERE section = ?",
                (n_expected, done_frame, section),
            )

    def reconcile(self, qc_path: Path) -> int:
        """Apply the qc.jsonl lines past the recorded offset (a crash between QC append and commit).

        Returns how many lines were applied. A qc.jsonl shorter than the offset (replaced by hand) is
        logged; the index is kept as it is.
        """
        if not qc_path.exists():
            return 0
        offset = self.qc_offset()
        size = qc_path.stat().st_size
        if size < offset:
            log.error(
                "%s is %d bytes but the index covers %d: qc.jsonl was truncated or replaced", qc_path, size, offset
            )
            return 0
        applied = 0
        batch: list[QcLine] = []
        with open(qc_path, "rb") as handle:
            handle.seek(offset)
            for raw in handle:  # streamed: a lost index is rebuilt from a qc.jsonl of any size
                if not raw.endswith(b"\n"):
                    break  # a torn last line is the QC log's to cut, not ours to apply
                offset += len(raw)
                if raw.strip():
                    batch.append(parse_qc_line(raw.decode("utf-8")))
                if len(batch) >= RECONCILE_BATCH:
                    self.record_lines(batch, offset)
                    applied, batch = applied + len(batch), []
        self.record_lines(batch, offset)
        applied += len(batch)
        if applied:
            log.warning("index: %d qc.jsonl line(s) were not indexed (crash before commit, or a new index)", applied)
        return applied

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- inside a transaction ----

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # Explicit BEGIN/COMMIT: the connection is in autocommit mode so that reads take no lock.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # a failed COMMIT (disk full) can leave it open
                self._db.execute("ROLLBACK")
            raise

    def _open(self, section: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO sections (section) VALUES (?)", (section,))

    def _apply(self, line: QcLine) -> None:
        if isinstance(line, QcTileRecord):
            outcome = "error" if line.action == "failed" else str(line.label)
            self._put_tile(line, outcome, line.original_path, line.replaces, answer_frames(line))
        elif isinstance(line, QcStorageFailure):
            self._put_tile(line, STORAGE_FAILED, None, None, [storage_failed_frame(line)])
        elif isinstance(line, QcSuperseded):
            self._db.execute(
                "UPDATE tiles SET superseded_by = ? WHERE section = ? AND tile_id = ?",
                (line.superseded_by, line.section, line.tile_id),
            )
        elif isinstance(line, QcRejection) and is_section_name(line.section):
            assert line.section is not None
            self._open(line.section)
            self._db.execute("UPDATE sections SET n_rejected = n_rejected + 1 WHERE section = ?", (line.section,))

    def _put_tile(
        self,
        line: QcTileRecord | QcStorageFailure,
        outcome: str,
        original_path: str | None,
        replaces: str | None,
        frames: list[bytes],
    ) -> None:
        self._open(line.section)
        # Only a storage_failed row gives way (the resend was stored); a recorded answer never changes.
        self._db.execute(
            "DELETE FROM tiles WHERE section = ? AND tile_id = ? AND outcome = ?",
            (line.section, line.tile_id, STORAGE_FAILED),
        )
        self._db.execute(
            "INSERT OR IGNORE INTO tiles (section, tile_id, seq, outcome, action, path, original_path, replaces, "
            "frames, t) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                line.section,
                line.tile_id,
                line.seq,
                outcome,
                line.action,
                line.path,
                original_path,
                replaces,
                msgpack.packb(frames, use_bin_type=True),
                line.t,
            ),
        )


def _tile_row(row: tuple[Any, ...] | None) -> TileRow | None:
    if row is None:
        return None
    section, tile_id, seq, outcome, action, path, original_path, replaces, superseded_by, frames, _ = row
    return TileRow(
        section=str(section),
        tile_id=str(tile_id),
        seq=int(seq),
        outcome=str(outcome),
        action=str(action),
        path=str(path),
        original_path=original_path if isinstance(original_path, str) else None,
        replaces=replaces if isinstance(replaces, str) else None,
        superseded_by=superseded_by if isinstance(superseded_by, str) else None,
        frames=list(msgpack.unpackb(frames, raw=False)),
    )
