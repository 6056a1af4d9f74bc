"""bench/gpu_suite.py end to end on CPU (the rehearsal of the GPU run): every phase, JSON and table written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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
