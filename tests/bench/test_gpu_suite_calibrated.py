"""bench/gpu_suite.py --calibrated on CPU: the calibrated rig's rehearsal (its own file, so pytest-xdist's
--dist loadfile can run it beside test_gpu_suite.py's: each takes over a minute)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.system


def test_a_calibrated_rig_restores_soft_tiles_with_the_rig_wiener_blend(
    run_gpu_suite: Callable[..., tuple[dict[str, Any], str]],
) -> None:
    result, table = run_gpu_suite("--calibrated", "--pipeline-only")
    calibration = result["calibration"]
    assert calibration["spectral_reference"] and calibration["model_share"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert result["config"]["detector"]["calibration"], "the pipeline ran uncalibrated"
    assert "bare_deblur" not in result  # --pipeline-only
    versions = result["restored_by_version"]
    blended = calibration["model_share"] < 1.0  # the model's share 1: the model alone, no Wiener in the name
    assert versions and all(("+rig-wiener-" in version) == blended for version in versions), versions
    rows = [row for row in result["pipeline"] if "tiles_per_s" in row]
    assert rows and all(row["done"] == row["sent"] and row["lost"] == 0 for row in rows)
    assert "| calibrated rig: `calibrate` on 5 sharp tiles" in table
