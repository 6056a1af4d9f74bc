"""bench/gpu_suite.py end to end on CPU (the rehearsal of the GPU run): every phase, JSON and table written."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.bench.suite_rehearsal import REPO_ROOT, suite_command

pytestmark = pytest.mark.system


def test_suite_runs_every_phase_on_cpu_and_loses_no_tile(
    run_gpu_suite: Callable[..., tuple[dict[str, Any], str]], tmp_path: Path
) -> None:
    result, table = run_gpu_suite()
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
    assert "| pipeline: sharp tiles at 25.4/s" in table
    assert not list(tmp_path.glob("suite-*")), "scratch tiles left behind"


def test_deblur_only_times_the_given_model_and_nothing_else(
    run_gpu_suite: Callable[..., tuple[dict[str, Any], str]], tmp_path: Path
) -> None:
    # A candidate beside the bundled weights: the same network under another name, so the run must say which it timed.
    bundled = REPO_ROOT / "appliance" / "weights" / "deblur"
    candidate = tmp_path / "candidate" / "deblur-candidate"
    candidate.parent.mkdir()
    for suffix in (".onnx", ".pt2"):
        shutil.copy(bundled.with_suffix(suffix), candidate.with_suffix(suffix))
    sidecar = json.loads(bundled.with_suffix(".json").read_text())
    sidecar["model_version"] = "candidate-under-test"
    candidate.with_suffix(".json").write_text(json.dumps(sidecar))

    result, table = run_gpu_suite("--deblur-only", "--deblur-model", str(candidate.with_suffix(".onnx")))
    assert result["bare_deblur"]["model"] == "candidate-under-test"
    assert result["bare_deblur"]["variants"]["torch-cpu-float32"]["vs_onnx_cpu_fp32"]["max_dn"] <= 2
    assert "pipeline" not in result and "bare_detector" not in result  # no Ray, no detector
    assert "model candidate-under-test" in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--deblur-model", "no/such/model.onnx"), "no/such/model.onnx does not exist"),
        (("--deblur-only", "--calibrated"), "--deblur-only times the deblur network alone"),
    ],
)
def test_suite_refuses_a_missing_model_or_contradictory_modes(
    extra: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        suite_command(tmp_path, tmp_path, *extra), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    assert message in " ".join((done.stdout + done.stderr).split())  # typer wraps long messages in a box
    assert not (tmp_path / "suite.json").exists()
