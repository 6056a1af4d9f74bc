"""Classical focus metrics: higher = sharper, monotone in blur, and (by design) content dependent."""

from __future__ import annotations

import numpy as np
import pytest

from bench.focus_metrics import BASELINES, brenner_gradient, fft_highfreq_ratio, variance_of_laplacian
from models.blur_synth import BlurParams, apply_blur, load_image, load_split, to_unit_float

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def sharp() -> np.ndarray:
    return to_unit_float(load_image(load_split("test")[1]))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_metric_decreases_monotonically_with_blur(sharp: np.ndarray, name: str) -> None:
    metric = BASELINES[name]
    values = [metric(sharp)] + [metric(apply_blur(sharp, BlurParams("gaussian", s))) for s in (0.7, 1.5, 3.0)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values


def test_fft_ratio_is_a_share_and_flat_image_is_zero(sharp: np.ndarray) -> None:
    assert 0.0 < fft_highfreq_ratio(sharp) < 1.0
    assert fft_highfreq_ratio(np.full((64, 64), 0.5)) == 0.0
    with pytest.raises(ValueError, match="cutoff"):
        fft_highfreq_ratio(sharp, cutoff=1.5)


def test_known_values_on_a_checkerboard() -> None:
    board = (np.indices((32, 32)).sum(axis=0) % 2).astype(np.float64)
    assert brenner_gradient(board) == 0.0  # pixels two apart are equal: Brenner's blind spot
    assert variance_of_laplacian(board) > 1.0
    assert fft_highfreq_ratio(board) > 0.99


def test_metrics_are_content_dependent(sharp: np.ndarray) -> None:
    """The failure the learned detector fixes: faint sharp content scores below strong blurred content.

    (The FFT ratio is contrast invariant but fails the other way: noise on blank resin looks sharp.)
    """
    faint_sharp = 0.5 + 0.1 * (sharp - sharp.mean())
    blurred = apply_blur(sharp, BlurParams("gaussian", 1.0))
    assert variance_of_laplacian(faint_sharp) < variance_of_laplacian(blurred)
    assert brenner_gradient(faint_sharp) < brenner_gradient(blurred)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="2-D"):
        variance_of_laplacian(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="too small"):
        brenner_gradient(np.zeros((2, 8)))
