"""TileRestorer behaviour on real held-out EM tiles: PSNR gain, dtype/shape/range, seams, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.assessment import BlurAssessment
from appliance.config import DeblurConfig
from appliance.restoration import TileRestorer
from appliance.tile_io import TileError
from models.blur_synth import BlurParams, load_image, load_split, synthesize

SIGMA = 2.0


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    return float(10 * np.log10(peak**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def soft(sigma: float = SIGMA) -> BlurAssessment:
    return BlurAssessment(blur_score=0.5, label="soft", sigma_px=sigma)


@pytest.fixture(scope="module")
def sharp() -> np.ndarray:
    return load_image(load_split("test")[1])  # 512 x 512 uint8, never trained on


@pytest.fixture(scope="module")
def classical() -> TileRestorer:
    return TileRestorer.from_config(DeblurConfig(backend="classical"))


def blurred_tile(sharp: np.ndarray, dtype: type[np.integer], seed: int = 0) -> np.ndarray:
    return synthesize(sharp, BlurParams("gaussian", SIGMA), np.random.default_rng(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_classical_improves_psnr_and_keeps_dtype(
    classical: TileRestorer, sharp: np.ndarray, dtype: type[np.integer]
) -> None:
    peak = float(np.iinfo(dtype).max)
    truth = sharp.astype(dtype) * (257 if dtype == np.uint16 else 1)
    blurred = blurred_tile(sharp, dtype)
    blurred.flags.writeable = False  # Ray hands tiles over read-only
    (restored,) = classical.restore([blurred], [soft()])
    assert restored.shape == blurred.shape and restored.dtype == blurred.dtype
    assert psnr(restored, truth, peak) > psnr(blurred, truth, peak) + 1.0
    assert classical.model_version == "classical-wiener-1"


def test_bad_tiles_raise_tile_error_naming_the_tile(classical: TileRestorer, sharp: np.ndarray) -> None:
    with pytest.raises(TileError, match="tile 0 of batch: unsupported dtype float32"):
        classical.restore([sharp.astype(np.float32)], [soft()])
    with pytest.raises(TileError, match="s1/t7.tif: expected a 2-D"):
        classical.restore([np.stack([sharp, sharp], axis=-1)], [soft()], names=["s1/t7.tif"])
    with pytest.raises(TileError, match="constant image"):
        classical.restore([np.full((64, 64), 7, np.uint8)], [soft()])
    with pytest.raises(TileError, match="labelled retake"):
        classical.restore([sharp], [BlurAssessment(0.9, "retake", 9.0)])
    with pytest.raises(ValueError, match="2 tiles but 1 assessments"):
        classical.restore([sharp, sharp], [soft()])


def test_missing_model_file_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match="nope.onnx does not exist"):
        TileRestorer.from_config(DeblurConfig(backend="onnx", model_path=missing))
    # auto never stops the rig for a missing model: it falls back to classical Wiener.
    assert TileRestorer.from_config(DeblurConfig(backend="auto", model_path=missing)).backend == "classical"
