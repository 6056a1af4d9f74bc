"""bench/calibrated_deblur_stages.py end to end on CPU, on small real-EM tiles: every stage timed, JSON written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.system  # runs the bench as a process, as a user would


def test_times_every_stage_of_a_calibrated_soft_tile_per_opencv_thread_setting(tmp_path: Path) -> None:
    out = tmp_path / "stages.json"
    command = [sys.executable, "bench/calibrated_deblur_stages.py", "--side", "256", "--repeats", "1"]
    command += ["--cv2-threads", "1", "--cv2-threads", "2", "--out", str(out)]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)

    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["deblur_backend"] == "onnx-cpu"  # no GPU here: the CPU rig's model
    assert result["tile"].startswith("256x256 uint8")
    assert set(result["settings"]) == {"cv2 threads 1", "cv2 threads 2"}
    for stages in result["settings"].values():
        assert set(stages) == {
            "detector, 1 tile",
            "detector with the rig's spectrum, 1 tile",
            "model alone, batch",
            "rig Wiener, 1 tile",
            "rig Wiener alone, batch on the replica's threads",
            "blend, 1 tile",
            "restore_versioned with the rig blend, batch",
        }
        for timing in stages.values():
            assert 0 < timing["best_s"] <= timing["median_s"]
