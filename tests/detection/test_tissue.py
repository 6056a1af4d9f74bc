"""Tiles without tissue (bare resin, beyond the section edge) are `empty`; partly empty tiles are judged on tissue."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.config import DeblurConfig, DetectorConfig
from appliance.detection.detector import GRID, BlurDetector
from appliance.detection.patches import extract_patches
from appliance.detection.tissue import (
    MIN_TISSUE_CELLS,
    TISSUE_RATIO,
    _block_means,
    _plane_removed_var,
    patch_tissue,
    tissue_ratio,
)
from appliance.messages import BlurAssessment
from appliance.noise import IMMERKAER_MASK, patch_noise_sigma
from appliance.restoration.restorer import TileRestorer
from appliance.stream.blur_share import BlurShareGuard
from appliance.tile_io import TileError
from models.blur_synth import BlurParams, apply_blur, load_image, load_split, quantize, synthesize, to_unit_float

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def detector() -> BlurDetector:
    return BlurDetector.from_config(DetectorConfig())


@pytest.fixture(scope="module")
def tissue() -> list[np.ndarray]:
    return [to_unit_float(load_image(p)) for p in load_split("test")]


def _acquire(image: np.ndarray, rng: np.random.Generator, params: BlurParams | None = None) -> np.ndarray:
    """Noise and 8-bit quantisation as the detector's training renderings (models/blur_synth.py)."""
    return synthesize(quantize(np.clip(image, 0.0, 1.0), np.uint16), params, rng, dtype=np.uint8)


def _ratio(tile: np.ndarray) -> np.ndarray:
    patches, _ = extract_patches(tile, DetectorConfig().patch_rows, DetectorConfig().patches_per_row)
    return tissue_ratio(tile, float(np.median(patch_noise_sigma(patches))))


def test_white_noise_reads_one_noise_unit_per_block() -> None:
    # The ratio is in units of what noise alone leaves in a block mean: pure noise must read ~1.
    rng = np.random.default_rng(0)
    noise = np.clip(0.5 + 0.05 * rng.standard_normal((1024, 1024)), 0, 1)
    ratio = _ratio(quantize(noise, np.uint16))
    assert 0.8 < float(np.median(ratio)) < 1.2


def test_bare_resin_flat_shaded_or_grainy_is_empty_never_soft_or_retake(detector: BlurDetector) -> None:
    rng = np.random.default_rng(1)
    ramp = np.mgrid[:512, :512][1] / 512.0
    resins = {
        "flat": np.full((512, 512), 0.6),
        "charging gradient": 0.35 + 0.4 * ramp,
        "dark": np.full((512, 512), 0.08),
    }
    for name, resin in resins.items():
        verdict = detector.assess([_acquire(resin, rng)])[0]
        assert verdict.label == "empty", (name, verdict)
        assert verdict.reason.startswith("no tissue") and verdict.sigma_px == 0.0


def test_tissue_sharp_or_blurred_beyond_repair_is_never_empty(detector: BlurDetector, tissue) -> None:
    rng = np.random.default_rng(2)
    sharp = detector.assess([_acquire(image, rng) for image in tissue])
    assert [v.label for v in sharp] == ["sharp"] * len(tissue)
    blurred = detector.assess([_acquire(image, rng, BlurParams("gaussian", 8.0)) for image in tissue])
    assert [v.label for v in blurred] == ["retake"] * len(tissue)


def test_partly_empty_tile_is_judged_on_its_tissue(detector: BlurDetector, tissue) -> None:
    rng = np.random.default_rng(3)
    for image in tissue:
        beyond_edge = image.copy()
        beyond_edge[:, 160:] = float(np.median(image))  # section edge: 70 % of the tile is bare resin
        sharp = detector.assess([_acquire(beyond_edge, rng)])[0]
        assert sharp.label == "sharp", sharp
        soft = _acquire(image, rng, BlurParams("gaussian", 1.8)).astype(np.float64) / 255.0
        soft[:, 160:] = float(np.median(soft))
        verdict = detector.assess([_acquire(soft, rng)])[0]
        assert verdict.label == "soft", verdict


def test_tissue_map_marks_the_resin_side(tissue) -> None:
    rng = np.random.default_rng(4)
    half = tissue[0].copy()
    half[:, 256:] = 0.55
    ratio = _ratio(_acquire(half, rng))
    assert (ratio[:, : GRID // 2 - 1] > TISSUE_RATIO).all()
    assert (ratio[:, GRID // 2 + 1 :] <= TISSUE_RATIO).all()
    assert MIN_TISSUE_CELLS <= GRID * GRID // 16


def test_empty_tiles_do_not_count_towards_the_blur_share_rule() -> None:
    guard = BlurShareGuard(threshold=0.5, min_tiles=4)
    for label in ["empty"] * 50 + ["sharp", "sharp", "sharp"]:
        assert guard.observe(label, calibrated=False) is None
    assert guard.n_judged == 3


def test_the_restorer_refuses_an_empty_tile() -> None:
    restorer = TileRestorer.from_config(DeblurConfig(backend="classical"))
    tile = np.full((128, 128), 100, np.uint8)
    tile[::7] = 120
    empty = BlurAssessment(blur_score=0.0, label="empty", sigma_px=0.0)
    with pytest.raises(TileError, match="empty"):
        restorer.restore([tile], [empty])


def test_patch_test_reads_white_noise_as_no_tissue_even_when_signal_dependent() -> None:
    rng = np.random.default_rng(3)
    # Poisson-like noise whose strength follows the level: each patch is its own noise reference.
    levels = np.linspace(0.1, 0.9, 32, dtype=np.float32)[:, None, None]
    patches = levels + rng.normal(0, 1, (32, 64, 64)).astype(np.float32) * 0.05 * np.sqrt(levels)
    assert not patch_tissue(patches, patch_noise_sigma(patches)).any()


def test_noisy_small_tissue_blurred_at_3px_is_tissue_not_empty(detector: BlurDetector, tissue) -> None:
    """A 160 px crop of low-SNR tissue (noise as strong as the structure): the block test alone saw no
    tissue once it was blurred; the per-patch test keeps it, so the tile is judged (retake/soft), not empty."""
    rng = np.random.default_rng(4)
    faint = 0.5 + 0.08 * (tissue[0][:160, :160] - tissue[0][:160, :160].mean())
    blurred = apply_blur(faint, BlurParams("gaussian", 3.0))
    tile = quantize(blurred + rng.normal(0, 0.02, blurred.shape).astype(np.float32), np.uint8)
    (verdict,) = detector.assess([tile])
    assert verdict.label != "empty"
    assert _ratio(tile).max() < TISSUE_RATIO * 2  # the block means alone barely see it


def _plane_residual_var(stack: np.ndarray) -> np.ndarray:
    """The definition: variance of what a least-squares plane leaves, per image (numpy lstsq)."""
    side = stack.shape[1]
    yy, xx = np.mgrid[:side, :side].reshape(2, -1).astype(np.float64)
    design = np.stack([np.ones_like(yy), yy, xx], axis=1)
    flat = stack.reshape(len(stack), -1).astype(np.float64).T
    coef = np.linalg.lstsq(design, flat, rcond=None)[0]
    return (flat - design @ coef).var(axis=0)


def test_fast_tissue_arithmetic_equals_its_definitions(tissue: list[np.ndarray]) -> None:
    """The detector's tissue test runs on every tile: its shortcuts must give the plain computations' values."""
    rng = np.random.default_rng(0)
    image = tissue[0]
    stack = np.stack([image[y : y + 64, x : x + 64] for y in (0, 100, 300) for x in (0, 200, 448)])
    shaded = stack + np.linspace(0, 0.3, 64, dtype=np.float32)[None, :, None]  # a plane the test must remove
    for s in (stack, shaded, stack[:, :16, :16]):
        np.testing.assert_allclose(_plane_removed_var(s), _plane_residual_var(s), rtol=1e-9)
    # Block means: exact sums of uint8 blocks (integral image) and INTER_AREA for uint16, both = numpy's means.
    tile8 = rng.integers(0, 256, (640, 1280), dtype=np.uint8)
    tile16 = rng.integers(0, 65536, (320, 192), dtype=np.uint16)
    for tile in (tile8, tile16):
        by, bx = tile.shape[0] // 64, tile.shape[1] // 64
        want = tile.reshape(64, by, 64, bx).astype(np.float64).mean(axis=(1, 3))
        np.testing.assert_allclose(_block_means(tile), want, rtol=1e-6)


def test_patch_noise_filter_equals_a_direct_valid_correlation() -> None:
    rng = np.random.default_rng(1)
    stack = rng.random((5, 20, 24), dtype=np.float32)
    residual = np.stack(
        [
            [[float((p[i : i + 3, j : j + 3] * IMMERKAER_MASK).sum()) for j in range(22)] for i in range(18)]
            for p in stack
        ]
    )
    want = np.abs(residual).mean(axis=(1, 2)) * np.sqrt(np.pi / 2) / 6.0
    np.testing.assert_allclose(patch_noise_sigma(stack), want, rtol=1e-5)


def test_patch_noise_filter_refuses_patches_shorter_than_its_taps() -> None:
    with pytest.raises(ValueError, match="3 taps along an axis of 2 px"):
        patch_noise_sigma(np.zeros((1, 2, 8), np.float32))
