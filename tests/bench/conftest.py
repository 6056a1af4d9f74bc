"""Shared by the bench tests: bench/gpu_suite.py run on CPU at the smallest size (the GPU run's rehearsal)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.bench.suite_rehearsal import suite_command


@pytest.fixture
def run_gpu_suite(tmp_path: Path) -> Callable[..., tuple[dict[str, Any], str]]:
    """run(*extra_args) -> (suite.json, suite.md) of a CPU rehearsal under tmp_path; fails on a non-zero exit."""

    def run(*extra: str) -> tuple[dict[str, Any], str]:
        out = tmp_path / "suite"
        done = subprocess.run(
            suite_command(out, tmp_path, *extra), capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads((out / "suite.json").read_text()), (out / "suite.md").read_text()

    return run
