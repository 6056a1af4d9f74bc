"""Tiles without tissue through the running appliance: `empty`, written as acquired, counted in section_done."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.config import DeblurConfig, IngestConfig, MetricsConfig, OutputConfig, RigConfig
from appliance.qc_record import QC_FILENAME, QcTileRecord, read_qc_lines
from appliance.stream.protocol import encode_end
from appliance.tile_io import read_tile
from appliance.tools.reference_controller import ReferenceController, tile_frames

pytestmark = pytest.mark.system


def _resin(seed: int) -> np.ndarray:
    """Bare resin as a detector sees it: flat grey, shading, shot noise (no tissue)."""
    rng = np.random.default_rng(seed)
    shading = np.linspace(0.0, 20.0, 512, dtype=np.float32)[None, :]
    return np.clip(rng.poisson(130.0 + shading + np.zeros((512, 512), np.float32)), 0, 255).astype(np.uint8)


def test_resin_tiles_are_empty_written_as_acquired_and_counted(
    start_appliance: Callable[..., Any], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    cfg = RigConfig(
        ingest=IngestConfig(tile_endpoint="tcp://127.0.0.1:*", feedback_endpoint="tcp://127.0.0.1:*"),
        output=OutputConfig(directory=tmp_path / "out"),
        metrics=MetricsConfig(address="127.0.0.1:0"),
        deblur=DeblurConfig(backend="classical"),
    )
    appliance = start_appliance(cfg)
    tiles = [*real_em_tiles[:3], ("resin_a", _resin(1)), ("resin_b", _resin(2))]
    with ReferenceController(appliance.endpoints.tile, appliance.endpoints.feedback) as controller:
        for seq, (name, pixels) in enumerate(tiles):
            controller.send_raw(tile_frames("edge", name, seq, pixels))
        controller.send_raw(encode_end("edge", len(tiles)))
        assert controller.wait_for(lambda fb: any(m["type"] == "section_done" for m in fb), timeout_s=120)
        feedback = controller.feedback()
    results = {m["tile_id"]: m for m in feedback if m["type"] == "result"}
    for name in ("resin_a", "resin_b"):
        assert (results[name]["label"], results[name]["action"]) == ("empty", "written")
        assert results[name]["sigma_px"] == 0.0
    assert not any(m["type"] == "retake" and m["tile_id"].startswith("resin") for m in feedback)
    out = Path(appliance.endpoints.output_dir)
    for name, pixels in tiles[3:]:
        np.testing.assert_array_equal(read_tile(out / "edge" / f"{name}.tif"), pixels)  # as acquired
        assert not (out / "edge" / "originals" / f"{name}.tif").exists()
    done = next(m for m in feedback if m["type"] == "section_done")
    assert done["n_empty"] == 2 and done["n_done"] == len(tiles)
    assert done["n_done"] == done["n_sharp"] + done["n_soft"] + done["n_retake"] + done["n_empty"] + done["n_error"]
    records = [r for r in read_qc_lines(out / QC_FILENAME) if isinstance(r, QcTileRecord)]
    assert sorted(r.tile_id for r in records if r.label == "empty") == ["resin_a", "resin_b"]
