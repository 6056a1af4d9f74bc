"""bench/gpu_suite.py's command line for a CPU rehearsal at the smallest size (the GPU run's rehearsal)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# 128 px tiles, 4 % of the tile counts; the bare loops' speed is the benchmark's business, here they need only run.
CPU_REHEARSAL = ("--device", "cpu", "--side", "128", "--scale", "0.04", "--budget-s", "150", "--timing-s", "2")


def suite_command(out: Path, work_dir: Path, *extra: str) -> list[str]:
    """The suite on CPU writing into `out`, its scratch tiles under `work_dir`, with `extra` options."""
    suite = REPO_ROOT / "bench" / "gpu_suite.py"
    return [sys.executable, str(suite), *CPU_REHEARSAL, "--out", str(out), "--work-dir", str(work_dir), *extra]
