"""OpenCV's packed real DFT as the rig Wiener's filter: its layout read right, and the same result as numpy's."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from appliance.restoration.packed_dft import filter_by_real_gain, packed_index

pytestmark = pytest.mark.fast

SHAPES = [(8, 8), (9, 8), (8, 9), (9, 9), (12, 10), (135, 144), (2, 3), (1, 4), (4, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
def test_every_packed_element_is_the_real_or_imaginary_part_of_its_rfft2_coefficient(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    packed = cv2.dft(image)
    half = np.fft.rfft2(image.astype(np.float64)).ravel()
    index = packed_index(shape)
    nearest = np.minimum(np.abs(packed - half.real[index]), np.abs(packed - half.imag[index]))
    assert nearest.max() < 1e-6 * image.size  # float32 sums; a misplaced coefficient is off by ~sqrt(size)
    # Each coefficient appears as often as it has stored parts: once (DC, Nyquist) or twice (Re and Im).
    counts = np.bincount(index.ravel(), minlength=half.size).reshape(shape[0], shape[1] // 2 + 1)
    assert counts.sum() == shape[0] * shape[1] and counts.max() <= 2


@pytest.mark.parametrize("shape", SHAPES + [(256, 270)], ids=[f"{m}x{n}" for m, n in SHAPES + [(256, 270)]])
def test_filtering_by_an_even_gain_matches_numpys_real_fft(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    # An elliptical Gaussian on the axes: even, and mirrored onto itself across the Nyquist column too.
    gain = np.exp(-20.0 * (fy**2 + 0.4 * fx**2)).astype(np.float32)
    expected = np.fft.irfft2(np.fft.rfft2(image.astype(np.float64)) * gain, s=shape)
    filtered = filter_by_real_gain(image, gain)
    assert filtered.dtype == np.float32 and filtered.shape == shape
    assert np.abs(filtered - expected).max() < 1e-5


def test_a_gain_off_the_images_rfft2_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit the rfft2 grid"):
        filter_by_real_gain(np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32))
