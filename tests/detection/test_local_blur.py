"""Blur beyond repair on 1/16 of a tile (spot on or off the cell grid, strip) is `retake`, region named."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydantic import ValidationError

from appliance.config import DetectorConfig
from appliance.detection.calibration import apply_calibration, calibrate
from appliance.detection.detector import BlurDetector
from appliance.detection.patches import PATCH, patch_lattice
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


SIDE = 2400  # a MultiSEM-sized tile: 5x5 mosaic of the held-out test images
MARGIN = 40  # px of context blurred around a region, so its edge is blurred like its inside


@pytest.fixture(scope="module")
def mosaic() -> np.ndarray:
    images = [to_unit_float(load_image(p)) for p in load_split("test")]
    rows = [np.hstack([images[(r + c) % len(images)] for c in range(5)]) for r in range(5)]
    return np.ascontiguousarray(np.vstack(rows)[:SIDE, :SIDE])


def _with_blurred_box(mosaic: np.ndarray, box: tuple[int, int, int, int], sigma_px: float, seed: int) -> np.ndarray:
    """The mosaic with one box (y0, x0, h, w) blurred at sigma_px, then noise and uint8 as acquired."""
    y0, x0, h, w = box
    ya, xa = max(y0 - MARGIN, 0), max(x0 - MARGIN, 0)
    crop = mosaic[ya : y0 + h + MARGIN, xa : x0 + w + MARGIN]
    blurred = apply_blur(crop, BlurParams("gaussian", sigma_px))
    out = mosaic.copy()
    out[y0 : y0 + h, x0 : x0 + w] = blurred[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w]
    return quantize(add_sem_noise(out, np.random.default_rng(seed), 300.0, 0.005), np.uint8)


@pytest.mark.parametrize(
    "box",
    [
        (450, 1650, 600, 600),  # 1/16 square off the cell grid (straddles 3x3 cells)
        (1199, 0, 150, SIDE),  # horizontal strip, full width, 150 px tall (1/16)
        (0, 2250, SIDE, 150),  # vertical strip at the tile's right edge (1/16)
    ],
    ids=["off-grid spot", "horizontal strip", "vertical strip at the edge"],
)
def test_one_sixteenth_anywhere_on_a_multisem_tile_is_retake_named_inside(
    mosaic: np.ndarray, box: tuple[int, int, int, int]
) -> None:
    verdict = BlurDetector.from_config(DetectorConfig()).assess([_with_blurred_box(mosaic, box, 6.0, box[0])])[0]
    assert verdict.label == "retake", (verdict.sigma_px, verdict.reason)
    named = re.search(r"region row (\d) col (\d)", verdict.reason)
    assert named is not None, verdict.reason
    cell = SIDE / 8
    row, col = int(named.group(1)), int(named.group(2))
    y0, x0, h, w = box
    assert y0 < (row + 1) * cell and row * cell < y0 + h and x0 < (col + 1) * cell and col * cell < x0 + w, (
        verdict.reason
    )


def test_a_calibrated_rig_keeps_the_spot_retake_its_spectrum_confirms(mosaic: np.ndarray) -> None:
    """With a spectral calibration the tile reads from its spectrum, which a 1/16 spot barely moves; the model's
    spot claim stands because the windows around it read beyond repair against the rig's spectrum too."""
    detector = BlurDetector.from_config(DetectorConfig())
    known_good = [
        quantize(add_sem_noise(to_unit_float(load_image(p)), np.random.default_rng(i), 300.0, 0.005), np.uint8)
        for i, p in enumerate(load_split("train")[:5])
    ]
    calibration = calibrate(known_good, [f"k{i}" for i in range(5)], detector)
    assert calibration.spectral is not None
    tile = _with_blurred_box(mosaic, (450, 1650, 600, 600), 6.0, 11)
    (raw,) = detector.assess([tile], spectral_references=[calibration.spectral.arrays()])
    assert raw.spectral_spot_sigma_px is not None and raw.spectral_spot_sigma_px > 3.0, raw
    assert raw.spectral_sigma_px is not None and raw.spectral_sigma_px < 3.0  # the tile reading alone would miss it
    verdict = apply_calibration(raw, calibration, DetectorConfig())
    assert verdict.label == "retake" and verdict.reason.startswith("partial blur: region row"), verdict.reason


def test_an_in_focus_multisem_tile_and_a_small_spot_stay_sharp(mosaic: np.ndarray) -> None:
    detector = BlurDetector.from_config(DetectorConfig())
    in_focus = quantize(add_sem_noise(mosaic, np.random.default_rng(5), 300.0, 0.005), np.uint8)
    spot_1_64 = _with_blurred_box(mosaic, (1037, 1213, 300, 300), 6.0, 6)  # 1/64: need not be caught
    labels = [v.label for v in detector.assess([in_focus, spot_1_64])]
    assert labels[0] == "sharp" and labels[1] != "retake", labels


def test_every_strip_of_one_sixteenth_holds_a_whole_row_or_column_of_patches() -> None:
    cfg = DetectorConfig()
    ys, xs, _ = patch_lattice((SIDE, SIDE), cfg.patch_rows, cfg.patches_per_row)
    strip = SIDE // 16
    for start in range(0, SIDE - strip + 1, 5):
        rows = ((ys >= start) & (ys + PATCH <= start + strip)).sum()
        cols = ((xs >= start) & (xs + PATCH <= start + strip)).sum()
        assert min(rows, cols) >= cfg.patches_per_row, (start, rows, cols)


def test_a_lattice_that_cannot_shear_evenly_is_refused_naming_the_fields() -> None:
    with pytest.raises(ValidationError, match="patch_rows.*patches_per_row"):
        DetectorConfig(patch_rows=24, patches_per_row=4)
