"""The spectral reading alone per source (bench/spectral_reader.py) on real ISBI crops."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.tile_io import read_tile
from bench.spectral_reader import markdown, read_source
from models.blur_synth import DATA_DIR, FAMILIES

pytestmark = pytest.mark.fast


def test_reads_blurred_crops_near_their_sigma_and_the_isotropic_part_never_above_the_reading() -> None:
    path = DATA_DIR / "26.png"
    if not path.is_file():
        pytest.skip(f"{path} missing (../shared/data/isbi2012-train)")
    image = read_tile(path)
    tiles = [np.ascontiguousarray(image[y : y + 256, x : x + 256]) for y in (0, 256) for x in (0, 256)]
    tiles += [np.ascontiguousarray(image[y : y + 256, x : x + 256]) for y in (128, 384) for x in (128, 384)]
    entry = read_source(tiles, np.random.default_rng(0), sharp_px=0.8)

    assert entry["draws"] == 1  # 8 tiles leave 3 to evaluate: one draw (detector_sources.calibration_draws)
    assert entry["sharp_called_nonsharp"] == 0.0  # ISBI in focus, read against its own slice
    assert set(entry["families"]) == set(FAMILIES)
    gaussian = entry["families"]["gaussian"]
    assert gaussian["blurred_called_sharp"] == 0.0
    assert 0.8 < gaussian["read_over_true"]["median"] < 1.3
    for family in entry["families"].values():
        # The isotropic part is the whole tile's mean axis: never longer than the worst major axis.
        assert family["isotropic_over_true"]["median"] <= family["read_over_true"]["median"] + 1e-9
    table = markdown(
        {"command": "python bench/spectral_reader.py", "machine": "test", "runtime_s": 1.0, "sources": {"isbi": entry}}
    )
    assert f"| isbi | 0% | {entry['blurred_called_sharp']:.0%} | 0% / " in table
