"""OpenCV's packed real DFT as the rig Wiener's filter: the same result as numpy's real FFT."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.restoration.packed_dft import filter_by_real_gain

pytestmark = pytest.mark.fast

# Even and odd sides (OpenCV packs the last column and row differently), degenerate ones, a padded tile's.
SHAPES = [(8, 8), (9, 8), (8, 9), (9, 9), (12, 10), (135, 144), (2, 3), (1, 4), (4, 1), (256, 270)]
IDS = [f"{m}x{n}" for m, n in SHAPES]


def _numpy_filter(image: np.ndarray, gain: np.ndarray) -> np.ndarray:
    return np.fft.irfft2(np.fft.rfft2(image.astype(np.float64)) * gain, s=image.shape)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_an_elliptical_gaussian_gain_filters_as_numpys_real_fft_does(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    gain = np.exp(-20.0 * (fy**2 + 0.4 * fx**2)).astype(np.float32)  # on the axes: even across Nyquist too
    filtered = filter_by_real_gain(image, gain)
    assert filtered.dtype == np.float32 and filtered.shape == shape
    assert np.abs(filtered - _numpy_filter(image, gain)).max() < 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_every_coefficient_gets_its_own_gain(shape: tuple[int, int]) -> None:
    # A random gain per coefficient: a gain applied to the wrong coefficient anywhere shows.
    rng = np.random.default_rng(2)
    image = rng.random(shape).astype(np.float32)
    gain = rng.random((shape[0], shape[1] // 2 + 1)).astype(np.float32)
    mirrored = (-np.arange(shape[0])) % shape[0]
    for column in {0, shape[1] // 2} if shape[1] % 2 == 0 else {0}:  # columns holding both f and -f: even
        gain[:, column] = np.maximum(gain[:, column], gain[mirrored, column])
    expected = _numpy_filter(image, gain)
    assert np.abs(filter_by_real_gain(image, gain) - expected).max() < 1e-5 * max(1.0, np.abs(expected).max())


def test_a_gain_off_the_images_rfft2_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit the rfft2 grid"):
        filter_by_real_gain(np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32))
