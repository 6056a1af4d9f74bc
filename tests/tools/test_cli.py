"""`python -m appliance demo | score | deblur` as a user runs them: real processes, real files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from appliance.detection.calibration import load_calibration
from appliance.restoration.rig_blend import PROBES
from appliance.tile_io import read_tile
from appliance.tools.cli import app
from appliance.tools.demo import SAMPLE_DIR
from models.blur_synth import DATA_DIR

pytestmark = pytest.mark.system

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_demo_replays_sample_tiles_and_prints_summary(tmp_path: Path) -> None:
    result = run_cli("demo", "--tiles", "24", "--rate", "0", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("tiles in", "sharp", "soft (deblurred)", "retake", "throughput", "p50", "p99", "lost"):
        assert row in result.stdout
    assert f"outputs (tiles, originals/, qc.jsonl): {(tmp_path / 'demo').resolve()}" in result.stdout
    assert len((tmp_path / "demo" / "qc.jsonl").read_text().splitlines()) == 24
    assert len(list((tmp_path / "demo" / "demo").glob("*.tif"))) == 24
    # A clean terminal: both bars end at the true count, nothing from Ray, the report named last.
    assert re.search(r"sent .* 24/24", result.stdout) and re.search(r"done .* 24/24", result.stdout), result.stdout
    for noise in ("(raylet)", "INFO", "pid=", "WARNING", "core_worker"):
        assert noise not in result.stdout + result.stderr, result.stdout + result.stderr
    report = (tmp_path / "demo" / "demo" / "report.html").resolve()
    assert result.stdout.rstrip().endswith(f"open in a browser: {report}")
    assert 'data-tiles="24"' in report.read_text(encoding="utf-8")
    assert re.search(r"metrics while it runs: curl http://127\.0\.0\.1:\d+/metrics", result.stdout)
    # The same report offline, from qc.jsonl, to another file (in process: a second interpreter costs 3 s).
    runner = CliRunner()
    offline = runner.invoke(
        app, ["report", str(tmp_path / "demo"), "--section", "demo", "--out", str(tmp_path / "r.html")]
    )
    assert offline.exit_code == 0, offline.output
    assert 'data-tiles="24"' in (tmp_path / "r.html").read_text(encoding="utf-8")
    missing = runner.invoke(app, ["report", str(tmp_path / "demo"), "--section", "nope"])
    assert missing.exit_code == 1 and "no tiles of section 'nope'" in missing.output


def test_score_json_gives_one_line_per_file_with_the_documented_fields() -> None:
    files = sorted(SAMPLE_DIR.glob("*.png"))
    result = run_cli("score", *map(str, files), "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(f) for f in files]
    for record in records:
        assert 0.0 <= record["blur_score"] <= 1.0
        assert record["label"] in ("sharp", "soft", "retake")
        assert record["sigma_px"] >= 0.0 and record["region_scores"]


def test_score_names_the_bad_file_exits_nonzero_and_still_scores_the_rest(tmp_path: Path) -> None:
    constant = tmp_path / "blank.tif"
    tifffile.imwrite(constant, np.full((256, 256), 9, np.uint16))
    rgb = tmp_path / "colour.tif"
    tifffile.imwrite(rgb, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    floats = tmp_path / "float.tif"
    tifffile.imwrite(floats, np.random.default_rng(0).random((64, 64), dtype=np.float32))
    good = SAMPLE_DIR / "sharp_a.png"
    result = run_cli("score", str(constant), str(rgb), str(floats), str(tmp_path / "missing.png"), str(good), "--json")
    assert result.returncode == 1
    assert f"{constant}: constant image" in result.stderr
    assert f"{rgb}: expected a 2-D grayscale image" in result.stderr
    assert f"{floats}: unsupported dtype float32" in result.stderr
    assert "missing.png: no such file" in result.stderr
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [str(good)]


def test_deblur_restores_soft_tiles_and_never_restores_retakes(tmp_path: Path) -> None:
    soft = SAMPLE_DIR / "soft_gaussian_s1.5.png"
    beyond = SAMPLE_DIR / "retake_gaussian_s6.0.png"
    result = run_cli("deblur", str(soft), str(beyond), "--out", str(tmp_path / "restored"), "--force")
    assert result.returncode == 0, result.stderr
    by_label = {r["label"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert by_label["soft"]["action"] == "restored"
    restored, original = read_tile(Path(by_label["soft"]["out"])), read_tile(soft)
    assert restored.shape == original.shape and restored.dtype == original.dtype
    assert not np.array_equal(restored, original)
    assert by_label["retake"]["action"] == "copied"
    np.testing.assert_array_equal(read_tile(Path(by_label["retake"]["out"])), read_tile(beyond))


def test_calibrate_writes_a_calibration_that_score_and_deblur_apply(tmp_path: Path) -> None:
    # 256 px centre crops of real ISBI tiles: the blend's probe restorations on 512 px tiles took ~25 s here.
    known_good = []
    for i in range(6):
        known_good.append(tmp_path / f"known-good-{i}.tif")
        tifffile.imwrite(known_good[-1], read_tile(DATA_DIR / f"{i}.png")[128:384, 128:384])
    calibration = tmp_path / "rig" / "calibration.json"
    result = run_cli("calibrate", *map(str, known_good), "--out", str(calibration), "--pixel-size-nm", "4")
    assert result.returncode == 0, result.stderr
    saved = load_calibration(calibration)
    assert saved.tile_count == 6 and [t.name for t in saved.tiles] == [str(p) for p in known_good]
    assert saved.pixel_size_nm == 4.0 and "pixel size 4 nm" in result.stdout
    assert f"detector.calibration: {calibration.resolve()}" in result.stdout
    # The restoration blend was measured with the bundled deblur model on the same tiles, and deblur applies it.
    assert saved.restoration is not None and saved.restoration.probes == len(known_good) * len(PROBES)
    assert f"deblur model {saved.restoration.deblur_model}" in result.stdout
    soft = SAMPLE_DIR / "soft_gaussian_s1.5.png"
    scored = run_cli("score", str(soft), "--json", "--calibration", str(calibration))
    assert scored.returncode == 0, scored.stderr
    record = json.loads(scored.stdout)
    assert record["calibrated"] is True and record["baseline_sigma_px"] == saved.baseline_sigma_px
    assert record["reason"].startswith("calibrated: ")
    out = tmp_path / "restored-here"
    restored = run_cli("deblur", str(soft), "--out", str(out), "--calibration", str(calibration), "--force")
    assert restored.returncode == 0, restored.stderr
    share = 1.0 - saved.restoration.model_weight
    assert json.loads(restored.stdout)["deblur_version"].endswith(f"+rig-wiener-{share:.2f}")
    # A calibration of another detector model is refused, naming the file; nothing is scored.
    other = tmp_path / "other.json"
    other.write_text(calibration.read_text().replace(saved.model_version, "blurnet-v0"))
    refused = run_cli("deblur", str(soft), "--out", str(tmp_path / "restored"), "--calibration", str(other))
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"error: {other}: made with detector 'blurnet-v0'" in refused.stderr
    assert not (tmp_path / "restored").exists()


def test_calibrate_names_bad_files_and_writes_nothing(tmp_path: Path) -> None:
    constant = tmp_path / "blank.tif"
    tifffile.imwrite(constant, np.full((256, 256), 9, np.uint8))
    out = tmp_path / "calibration.json"
    good = [str(DATA_DIR / f"{i}.png") for i in range(5)]
    result = run_cli("calibrate", *good, str(constant), str(tmp_path / "missing.png"), "--out", str(out))
    assert result.returncode == 1
    assert f"error: {constant}: constant image" in result.stderr
    assert "missing.png: no such file" in result.stderr
    # A blurred tile among the sharp ones (CalibrationError), and too few tiles.
    blurred = SAMPLE_DIR / "retake_gaussian_s6.0.png"
    result = run_cli("calibrate", *good, str(blurred), "--out", str(out))
    assert result.returncode == 1 and f"error: {blurred}: " in result.stderr, result.stderr
    result = run_cli("calibrate", *good[:3], "--out", str(out))
    assert result.returncode == 1 and "at least 5 known-good in-focus tiles" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("*.part"))
