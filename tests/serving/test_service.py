"""`python -m appliance serve`: a real process, a real controller, SIGTERM drains, bad config refused."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from appliance.qc_record import QC_FILENAME, QcRejection, QcTileRecord, read_qc_lines
from appliance.tools.reference_controller import ReferenceController, cycle_tiles, tile_frames

pytestmark = pytest.mark.system


def _serve(config: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _wait_ready(process: subprocess.Popen[str], timeout_s: float = 120) -> tuple[str, str, str, list[str]]:
    """(tile endpoint, feedback endpoint, metrics URL, the lines printed before `ready`)."""
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        match = re.search(r"ready: tiles (\S+), feedback (\S+), output \S+, metrics (\S+)", line)
        if match:
            return match.group(1), match.group(2), match.group(3), lines[:-1]
        if process.poll() is not None:
            break
    raise AssertionError("appliance did not become ready:\n" + "".join(lines))


def test_sigterm_drains_in_flight_tiles_and_exits_cleanly(
    tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    config = tmp_path / "rig.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "rig_name": "test-rig",
                "ingest": {
                    "tile_endpoint": "tcp://127.0.0.1:*",
                    "feedback_endpoint": "tcp://127.0.0.1:*",
                    "max_in_flight": 8,
                },
                "output": {"directory": str(tmp_path / "out")},
                "deblur": {"warmup_tile_shape": [512, 512]},
                "ray": {"num_cpus": 2},
                "metrics": {"address": "127.0.0.1:0"},
            }
        )
    )
    process = _serve(config, "--status-every", "0.5")
    try:
        tile_endpoint, feedback_endpoint, metrics_url, before_ready = _wait_ready(process)
        # The operator is told why the start waits: the deblur replicas warm up first.
        assert any(line.startswith("deblur replicas warm up on a 512x512 tile") for line in before_ready), before_ready
        with ReferenceController(tile_endpoint, feedback_endpoint) as controller:
            for seq, (tile_id, pixels) in enumerate(cycle_tiles(real_em_tiles, 12)):
                controller.send_raw(tile_frames("term", tile_id, seq, pixels))
            # Wait until the ingest has accepted tiles, then stop it while they are in flight.
            assert controller.wait_for(lambda fb: len(fb) >= 1, timeout_s=60)
            with urllib.request.urlopen(metrics_url, timeout=15) as response:
                scraped = response.read().decode()
            time.sleep(0.6)  # at least one status line
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=120)
            feedback = controller.feedback()
            results = [m for m in feedback if m["type"] == "result"]
            refused = [m for m in feedback if m["type"] == "error" and m["code"] == "draining"]
        assert process.returncode == 0, output
        assert "drained and stopped" in output
        assert re.search(
            r"^status: [0-9.]+ tiles/s, in flight \d+/8, sharp \d+ soft \d+ retake \d+ empty \d+, errors 0, "
            r"disk free [0-9.]+ [kMGT]?B, no section report yet$",
            output,
            re.MULTILINE,
        ), output
        assert "(raylet)" not in output and "killed by `ray.kill`" not in output, output
        tiles_received = r'^em_appliance_tiles_received_total\{microscope="test-rig"\} ([0-9.e+]+)$'
        received = re.search(tiles_received, scraped, re.MULTILINE)
        assert received and 1 <= float(received.group(1)) <= 12, scraped
        # The controller was told `draining`; every tile got exactly one answer: finished (result) or,
        # still buffered when the stop came, refused `draining` (to resend after a restart); none dropped.
        assert sum(m["type"] == "draining" for m in feedback) == 1
        answered = sorted(m["seq"] for m in results + refused)
        assert answered == list(range(12)) and len(results) >= 1, feedback
        qc_lines = read_qc_lines(tmp_path / "out" / QC_FILENAME)
        assert sorted(r.seq for r in qc_lines if isinstance(r, QcTileRecord)) == sorted(m["seq"] for m in results)
        assert sorted(r.seq for r in qc_lines if isinstance(r, QcRejection) and r.code == "draining") == sorted(
            m["seq"] for m in refused
        )
        for message in results:
            assert (tmp_path / "out" / message["path"]).is_file()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bad_config_is_refused_before_start_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "rig.yaml"
    config.write_text("ingest:\n  max_in_flight: 0\n  tile_endpiont: tcp://127.0.0.1:5555\n")
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "ingest.max_in_flight" in result.stderr
    assert "ingest.tile_endpiont" in result.stderr


def test_unusable_calibration_is_refused_before_start_naming_field_and_file(tmp_path: Path) -> None:
    config = tmp_path / "rig.yaml"
    missing = tmp_path / "calibration.json"
    config.write_text(f"detector:\n  calibration: {missing}\n")
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {config}: detector.calibration: {missing}: cannot read calibration" in result.stderr
    assert "ready" not in result.stdout
