"""Content negatives per source (bench/detector_content.py --sources) on one small real source, 2 kinds."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.config import DetectorConfig
from appliance.detection.detector import BlurDetector
from appliance.tile_io import read_tile
from bench.detector_content import KINDS, content_kinds, draw_content, source_content
from bench.detector_sources import CORPUS, Source, grid_crops

pytestmark = pytest.mark.fast

TILE = CORPUS / "syconn_sbem_j0126" / "j0126_raw_img_153.png"


def test_kind_geometry_scales_with_the_side() -> None:
    small, full = np.full((128, 128), 0.5, np.float32), np.full((512, 512), 0.5, np.float32)
    dirt_small = content_kinds(128.0)["dirt particle"][0](small)
    dirt_full = KINDS["dirt particle"][0](full)
    assert np.mean(dirt_small != 0.5) == pytest.approx(np.mean(dirt_full != 0.5), rel=0.05)


def test_one_source_with_two_kinds_gives_unchanged_and_wanted_shares_uncalibrated_and_calibrated() -> None:
    if not TILE.is_file():
        pytest.skip(f"{TILE} missing (../shared/data/em-corpus)")
    tiles, note = grid_crops([(TILE.name, read_tile(TILE))])
    source = Source("syconn", [(n, t[:128, :128]) for n, t in tiles[:8]], note=note)
    assert draw_content(source.tiles[0][1], "fold", np.random.default_rng(0)).dtype == source.tiles[0][1].dtype
    cfg = DetectorConfig(backend="onnx")
    entry = source_content(
        source, BlurDetector.from_config(cfg), cfg, ["fold", "bare resin, flat"], np.random.default_rng(0)
    )
    assert entry["n_eval"] == 3
    assert set(entry["kinds"]) == {"fold", "bare resin, flat"}
    fold, resin = entry["kinds"]["fold"], entry["kinds"]["bare resin, flat"]
    assert (fold["want"], resin["want"]) == ("sharp", "empty")
    assert set(fold["uncalibrated"]) == {"unchanged", "sharp"}
    assert set(resin["uncalibrated"]) == {"unchanged", "empty"}
    if "refused" in entry["calibration"]:
        assert "calibrated" not in fold
    else:
        assert entry["calibration"]["baseline_sigma_px"] >= 0.0
        assert set(fold["calibrated"]) == {"unchanged", "sharp"}
    for share in (*fold["uncalibrated"].values(), *resin["uncalibrated"].values()):
        assert 0.0 <= share <= 1.0
