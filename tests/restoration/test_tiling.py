"""Overlap-and-blend tiling: tiled processing equals whole-image processing for local operators."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from appliance.restoration.tiling import blend_window, patch_starts, run_tiled
from models.blur_synth import load_image, load_split

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def em() -> np.ndarray:
    return load_image(load_split("test")[2]).astype(np.float32) / 255.0


def gaussian_batch(batch: np.ndarray) -> np.ndarray:
    """A real local operator (support 9 px) applied per patch, zero-padded like a CNN's convolutions."""
    return np.stack([cv2.GaussianBlur(p[0], (0, 0), 1.5, borderType=cv2.BORDER_CONSTANT)[None] for p in batch])


def test_identity_model_returns_the_image(em: np.ndarray) -> None:
    out = run_tiled(em[:300, :417], lambda b: b.copy(), patch=128, overlap=16, batch_size=3, multiple=8)
    np.testing.assert_allclose(out, em[:300, :417], atol=1e-6)


@pytest.mark.parametrize("shape", [(512, 512), (300, 417), (40, 700)])
def test_tiled_equals_whole_for_a_local_operator(em: np.ndarray, shape: tuple[int, int]) -> None:
    image = em[: shape[0], : shape[1]]
    whole = run_tiled(image, gaussian_batch, patch=2048, overlap=16, batch_size=1)
    tiled = run_tiled(image, gaussian_batch, patch=96, overlap=16, batch_size=4)
    assert tiled.shape == image.shape
    # The operator reaches 4.5 px; patch borders with missing context get ~0 blend weight.
    assert np.abs(tiled - whole).max() < 2e-3


def test_blend_weights_cover_every_pixel() -> None:
    window = blend_window(96, 80, 16)
    assert window.shape == (96, 80) and window.min() > 0 and window[48, 40] == pytest.approx(1.0)
    assert patch_starts(100, 100, 68) == [0]
    assert patch_starts(300, 96, 64)[-1] == 300 - 96


def test_bad_geometry_is_refused(em: np.ndarray) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        run_tiled(em, lambda b: b, patch=100, overlap=8, batch_size=1, multiple=8)
    with pytest.raises(ValueError, match="4 \\* overlap"):
        run_tiled(em, lambda b: b, patch=64, overlap=16, batch_size=1)


def test_planes_are_cut_with_the_pixels(em: np.ndarray) -> None:
    image = em[:300, :417]
    yy, xx = np.mgrid[0:300, 0:417].astype(np.float32)
    planes = np.stack([yy / 300, xx / 417])  # smooth, position-dependent, like the PSF planes
    # A model that returns one of its input planes gives back that plane: each patch got the right window.
    for k in range(2):
        out = run_tiled(image, lambda b, k=k: b[:, 1 + k : 2 + k].copy(), 128, 16, 3, multiple=8, planes=planes)
        np.testing.assert_allclose(out, planes[k], atol=1e-6)

    def mixing(batch: np.ndarray) -> np.ndarray:  # local operator on the pixels, modulated by a plane
        return gaussian_batch(batch[:, :1]) * (1 + batch[:, 1:2])

    whole = run_tiled(image, mixing, patch=2048, overlap=16, batch_size=1, planes=planes)
    tiled = run_tiled(image, mixing, patch=96, overlap=16, batch_size=4, planes=planes)
    assert np.abs(tiled - whole).max() < 4e-3
    with pytest.raises(ValueError, match="planes of shape"):
        run_tiled(image, mixing, patch=96, overlap=16, batch_size=4, planes=planes[:, :10])
