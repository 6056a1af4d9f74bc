"""bench/gpu_suite.py end to end on CPU (the rehearsal of the GPU run): every phase, JSON and table written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_suite_runs_every_phase_on_cpu_and_loses_no_tile(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    command = [
        sys.executable,
        str(REPO_ROOT / "bench" / "gpu_suite.py"),
        "--device",
        "cpu",
        "--side",
        "128",
        "--scale",
        "0.04",
        "--budget-s",
        "150",
        "--timing-s",  # the bare loops' speed is the benchmark's business; here they need only run
        "2",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "suite.json").read_text())
    assert result["bare_detector"]["batch_1"]["tiles_per_s"] > 0
    variant = result["bare_deblur"]["variants"]["torch-cpu-float32"]
    assert variant["vs_onnx_cpu_fp32"]["max_dn"] <= 2  # whole-tile torch fp32 == tiled ONNX Runtime
    rows = [row for row in result["pipeline"] if "tiles_per_s" in row]
    assert len([row for row in rows if "microscopes" not in row]) == 5, result["pipeline"]
    for row in rows:
        assert row["done"] == row["sent"] and row["lost"] == 0 and row["duplicated"] == 0
    # Several microscopes on the one appliance: measured, or left out by the budget, never missing.
    multiscope = [row for row in result["pipeline"] if "microscopes" in row["row"]]
    assert [row["row"].split()[0] for row in multiscope] == ["2", "4"], result["pipeline"]
    for row in multiscope:
        if "per_microscope" in row:
            assert len(row["per_microscope"]) == row["microscopes"]
            assert all(one["done"] == one["sent"] > 0 for one in row["per_microscope"].values())
    assert "| pipeline: sharp tiles at 25.4/s" in (out / "suite.md").read_text()
    assert not list(tmp_path.glob("suite-*")), "scratch tiles left behind"
