"""qc.jsonl lines are whole: a failed append is cut back, a torn tail is cut at open (real files, real limits)."""

from __future__ import annotations

import resource
import signal
import time
from pathlib import Path

import pytest

from appliance.qc_record import QcRejection, read_qc_lines
from appliance.stream.qc_log import QcLog

pytestmark = pytest.mark.fast


def rejection(message: str = "") -> QcRejection:
    return QcRejection(
        t=time.time(), section="s1", tile_id="t", seq=1, action="rejected", code="bad_field", error=message
    )


def test_a_torn_last_line_is_cut_when_the_log_opens(tmp_path: Path) -> None:
    path = tmp_path / "qc.jsonl"
    whole = rejection().to_json_line() + "\n"
    path.write_text(whole + whole[:40])  # a crash in the middle of the second line
    log = QcLog(path, fsync=True)
    assert path.read_text() == whole and log.size == len(whole)
    log.append(rejection())
    assert len(read_qc_lines(path)) == 2


def test_an_append_that_fails_midway_is_cut_back_to_the_last_whole_line(tmp_path: Path) -> None:
    """The kernel's file size limit (RLIMIT_FSIZE) makes the write stop partway, like a full disk."""
    path = tmp_path / "qc.jsonl"
    log = QcLog(path, fsync=True)
    # Big enough that no other file pytest writes during the test (capture) nears the limit.
    size = log.append(rejection("x" * 1_000_000))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal's default kill
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
        with pytest.raises(OSError, match="too large"):
            log.append(rejection("y" * 400))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.stat().st_size == size == log.size
    log.append(rejection("after"))
    lines = read_qc_lines(path)
    assert [line.error for line in lines][1:] == ["after"]  # type: ignore[union-attr]
