"""The crop and PSNR that the rig blend's measurement and the benches share."""

from __future__ import annotations

import math

import numpy as np
import pytest

from appliance.pixels import centre_crop, psnr_db

pytestmark = pytest.mark.fast


def test_centre_crop_takes_the_middle_and_keeps_a_smaller_side() -> None:
    image = np.arange(6 * 9, dtype=np.uint8).reshape(6, 9)
    crop = centre_crop(image, 4)
    assert crop.shape == (4, 4) and crop.flags.c_contiguous
    assert crop[0, 0] == image[1, 2]
    assert centre_crop(image, 8).shape == (6, 8)


def test_psnr_uses_the_truths_full_range_unless_given_a_peak() -> None:
    truth = np.full((8, 8), 1000, np.uint16)
    image = truth + np.uint16(1)  # mse 1
    assert psnr_db(image, truth) == pytest.approx(20 * math.log10(65535))
    assert psnr_db(image, truth, 255.0) == pytest.approx(20 * math.log10(255))
    assert psnr_db(truth, truth) == math.inf


def test_psnr_of_a_float_truth_needs_its_peak() -> None:
    truth = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="give the peak"):
        psnr_db(truth + 0.1, truth)
    assert psnr_db(truth + 0.1, truth, 1.0) == pytest.approx(20.0, abs=1e-4)
