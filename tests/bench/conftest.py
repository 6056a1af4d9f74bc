"""Shared by the bench tests: bench/gpu_suite.py run on CPU at the smallest size (the GPU run's rehearsal)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# 128 px tiles, 4 % of the tile counts; the bare loops' speed is the benchmark's business, here they need only run.
CPU_REHEARSAL = ("--device", "cpu", "--side", "128", "--scale", "0.04", "--budget-s", "150", "--timing-s", "2")


@pytest.fixture
def run_gpu_suite(tmp_path: Path) -> Callable[..., tuple[dict[str, Any], str]]:
    """run(*extra_args) -> (suite.json, suite.md) of a CPU rehearsal under tmp_path; fails on a non-zero exit."""

    def run(*extra: str) -> tuple[dict[str, Any], str]:
        out = tmp_path / "suite"
        command = [sys.executable, str(REPO_ROOT / "bench" / "gpu_suite.py"), *CPU_REHEARSAL]
        command += ["--out", str(out), "--work-dir", str(tmp_path), *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads((out / "suite.json").read_text()), (out / "suite.md").read_text()

    return run
