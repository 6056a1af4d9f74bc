"""SIGTERM for real: `python -m appliance serve` as a child process, stopped mid-stream and restarted.

The controller gets `draining`, stops sending; every buffered message is refused `draining` (none dropped
silently); the service exits 0 without a traceback; after the restart the controller resends every tile
without an answer, and each ends up answered exactly once with its file and one QC line.
(Its own module: no in-process Ray cluster runs beside the service's.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faults import fault_tiles, run_sigterm_drill

pytestmark = pytest.mark.system


def test_sigterm_drains_then_a_restart_and_resend_answers_every_tile(tmp_path: Path) -> None:
    result, output = run_sigterm_drill(tmp_path, list(fault_tiles(80, 128)), 128, "s1")
    assert result.sent == 80
    assert (result.answered, result.lost, result.duplicated, result.unassessed) == (80, 0, 0, 0), result
    assert result.file_problems == [], result.file_problems
    assert output.count("drained and stopped") == 2  # the stop mid-stream and the final one
