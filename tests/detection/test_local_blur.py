"""A spot beyond repair covering 2x2 of the detector's cells (1/16 of the tile) is `retake`, region named."""

from __future__ import annotations

import re

import numpy as np
import pytest

from appliance.config import DetectorConfig
from appliance.detection.detector import BlurDetector
from models.blur_synth import BlurParams, add_sem_noise, apply_blur, load_image, load_split, quantize, to_unit_float

pytestmark = pytest.mark.fast

CELL = 64  # 512 px test tiles on the 8x8 grid


@pytest.mark.parametrize("row, col", [(3, 3), (3, 0), (6, 6)])  # centre, edge, corner
def test_a_blurred_spot_of_one_sixteenth_is_retake_and_named(row: int, col: int) -> None:
    detector = BlurDetector.from_config(DetectorConfig())
    rng = np.random.default_rng(row * 8 + col)
    verdicts = []
    for path in load_split("test"):
        sharp = to_unit_float(load_image(path))
        blurred = apply_blur(sharp, BlurParams("gaussian", 6.0))
        spot = sharp.copy()
        box = np.s_[row * CELL : (row + 2) * CELL, col * CELL : (col + 2) * CELL]
        spot[box] = blurred[box]
        verdicts.append(detector.assess([quantize(add_sem_noise(spot, rng, 300.0, 0.005), np.uint8)])[0])
    assert [v.label for v in verdicts] == ["retake"] * len(verdicts), [v.sigma_px for v in verdicts]
    for verdict in verdicts:
        named = re.search(r"region row (\d) col (\d)", verdict.reason)
        assert named is not None, verdict.reason
        assert row <= int(named.group(1)) <= row + 1 and col <= int(named.group(2)) <= col + 1, verdict.reason
