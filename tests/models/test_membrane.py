"""Membrane segmenter and membrane F1 (models/membrane/score.py): the task-level check of restoration."""

from __future__ import annotations

import numpy as np
import pytest

from models.blur_synth import load_image, load_split
from models.membrane.data import label_path, membrane_mask
from models.membrane.score import membrane_f1, segment

pytestmark = pytest.mark.fast

# F1 (tolerance 2 px) of the bundled weights vs the labels of test image 26: measured 0.934 (MODEL_CARD.md);
# FLOOR leaves room for a retrained model that is a little worse, not for a broken one.
TEST_IMAGE_F1_FLOOR = 0.85


def line_mask(shape: tuple[int, int], column: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[:, column] = True
    return mask


@pytest.fixture(scope="module")
def test_slice() -> tuple[np.ndarray, np.ndarray]:
    """Test-split image 26 (uint8, 512 x 512) and its membrane mask: never seen in training."""
    path = load_split("test")[0]
    return load_image(path), membrane_mask(load_image(label_path(path)))


def test_identical_maps_score_one() -> None:
    rng = np.random.default_rng(0)
    prob = rng.random((64, 80)).astype(np.float32)
    assert membrane_f1(prob, prob) == 1.0
    assert membrane_f1(prob, prob >= 0.5, tolerance_px=0) == 1.0


def test_tolerance_forgives_small_shifts_only() -> None:
    reference = line_mask((50, 50), 20)
    shifted = line_mask((50, 50), 22)  # the same membrane 2 px to the right
    assert membrane_f1(shifted, reference, tolerance_px=0) == 0.0
    assert membrane_f1(shifted, reference, tolerance_px=1) == 0.0
    assert membrane_f1(shifted, reference, tolerance_px=2) == 1.0
    assert membrane_f1(line_mask((50, 50), 30), reference, tolerance_px=2) == 0.0
    # A prediction twice as thick as the reference: perfect recall, precision 1/2 exactly, F1 2/3.
    thick = reference | line_mask((50, 50), 25)
    assert membrane_f1(thick, reference, tolerance_px=0) == pytest.approx(2 / 3)


def test_empty_maps() -> None:
    empty = np.zeros((10, 10), dtype=bool)
    assert membrane_f1(empty, empty) == 1.0
    assert membrane_f1(empty, line_mask((10, 10), 3)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        membrane_f1(empty, np.zeros((10, 11), dtype=bool))


def test_segment_uint8_and_uint16(test_slice: tuple[np.ndarray, np.ndarray]) -> None:
    pixels = test_slice[0][:200, :300]  # not a multiple of the network's size multiple: padded inside
    prob8 = segment(pixels)
    prob16 = segment(pixels.astype(np.uint16) * 257)  # same tile on the 16-bit full range
    for prob in (prob8, prob16):
        assert prob.shape == (200, 300) and prob.dtype == np.float32
        assert prob.min() >= 0.0 and prob.max() <= 1.0
    assert membrane_f1(prob16, prob8) > 0.99  # the intensity window makes the bit depth irrelevant


def test_trained_weights_find_membranes(test_slice: tuple[np.ndarray, np.ndarray]) -> None:
    pixels, membrane = test_slice
    assert membrane_f1(segment(pixels), membrane) > TEST_IMAGE_F1_FLOOR


def test_tiled_segment_matches_whole_image(test_slice: tuple[np.ndarray, np.ndarray]) -> None:
    import torch

    from models.membrane.data import network_input
    from models.membrane.score import load_segmenter

    # 1000 x 320: segment() runs 2 x 1 patches (a seam across the middle rows).
    tile = np.ascontiguousarray(np.pad(test_slice[0], ((244, 244), (0, 0)), mode="reflect")[:, :320])
    with torch.inference_mode():
        whole = load_segmenter().probability(torch.from_numpy(network_input(tile))[None, None])[0, 0].numpy()
    # Interior only: at the tile's own border whole-image inference sees zero padding, tiling a reflection.
    # Measured at the seams: this strip max 0.003; a 1000 x 1000 tile (2 x 2 patches) max 0.030.
    inner = (slice(128, -128), slice(128, -128))
    assert np.abs(segment(tile)[inner] - whole[inner]).max() < 0.05
