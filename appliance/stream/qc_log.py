"""qc.jsonl, the append-only QC record: lines are written whole (or not at all) and fsynced before they count."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from appliance.qc_record import QcLine
from appliance.tile_io import ensure_dir

log = logging.getLogger(__name__)


class QcLog:
    """Appends JSON lines through one unbuffered O_APPEND descriptor; `size` is the file's length in bytes.

    A failed append (ENOSPC, EIO, file size limit) is cut back to the last whole line before the error
    is raised, so a reader never sees a torn line and a retry does not leave half a line behind.
    A torn last line found at open (a crash mid-write) is cut the same way.
    """

    def __init__(self, path: Path, fsync: bool) -> None:
        ensure_dir(path.parent, fsync)
        self.path = path
        self._fsync = fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self._fd).st_size
        self._cut_torn_tail()

    def append(self, *records: QcLine) -> int:
        """Append `records` as whole lines (fsynced when configured); returns the new size in bytes."""
        data = "".join(record.to_json_line() + "\n" for record in records).encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self._fsync:
                os.fsync(self._fd)
        except BaseException:
            self._truncate(self.size)
            raise
        self.size += len(data)
        return self.size

    def close(self) -> None:
        os.close(self._fd)

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:  # truncating frees space, so this is rare; the next open cuts the tail again
            log.error("%s: could not cut a failed append back to %d bytes: %r", self.path, size, exc)

    def _cut_torn_tail(self) -> None:
        whole = self._end_of_last_whole_line()
        if whole == self.size:
            return
        log.warning("%s: torn last line (%d bytes) cut at start-up", self.path, self.size - whole)
        self._truncate(whole)
        self.size = whole

    def _end_of_last_whole_line(self) -> int:
        """Byte offset just past the last newline (0 when there is none), read backwards in blocks."""
        end = self.size
        with open(self.path, "rb") as handle:
            while end > 0:
                start = max(0, end - 65536)
                handle.seek(start)
                block = handle.read(end - start)
                if b"\n" in block:
                    return start + block.rfind(b"\n") + 1
                end = start
        return 0
