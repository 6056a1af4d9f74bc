"""DeblurNet's noise-level channel and fine-tuning start, on real EM pixels (torch on CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.blur_synth import BlurParams, add_sem_noise, apply_blur, load_image, load_split, to_unit_float
from models.deblur.network import DeblurNet, NoiseLevelMap
from models.deblur.train import load_parent_weights

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def soft_em() -> np.ndarray:
    """A real EM image (train split) blurred by sigma 2 px, float32 in [0, 1]."""
    return apply_blur(to_unit_float(load_image(load_split("train")[0])), BlurParams("gaussian", 2.0))


def mean_noise_map(image: np.ndarray) -> float:
    with torch.inference_mode():
        return float(NoiseLevelMap()(torch.from_numpy(image)[None, None]).mean())


def test_noise_map_reads_white_noise_level() -> None:
    rng = np.random.default_rng(0)
    for std in (0.01, 0.05):
        flat = (0.5 + rng.normal(0.0, std, (128, 128))).astype(np.float32)
        expected = math.log(std * math.sqrt(2.0 / math.pi) + 1e-3) + 4.0
        assert mean_noise_map(flat) == pytest.approx(expected, abs=0.05)


def test_noise_map_rises_with_sem_noise_on_soft_em(soft_em: np.ndarray) -> None:
    readings = [
        mean_noise_map(add_sem_noise(soft_em, np.random.default_rng(1), photons, 0.0).astype(np.float32))
        for photons in (1000.0, 300.0, 100.0, 30.0)  # fewer photons per unit = more noise
    ]
    assert readings == sorted(readings)
    assert readings[-1] - readings[0] > 1.0  # 33x fewer photons: ~5.8x the noise std, log ~1.75


def test_fine_tuning_with_a_noise_map_starts_at_the_parent_output(soft_em: np.ndarray) -> None:
    torch.manual_seed(0)
    parent = DeblurNet(width=8, enc_blocks=(1, 1), middle_blocks=1, dec_blocks=(1, 1))
    for parameter in parent.parameters():  # non-trivial weights (the residual scales start at zero)
        parameter.data.normal_(0.0, 0.1)
    child = DeblurNet(width=8, enc_blocks=(1, 1), middle_blocks=1, dec_blocks=(1, 1), noise_map=True)
    load_parent_weights(child, parent.state_dict())
    x = torch.from_numpy(soft_em[:64, :96].copy())[None, None]
    with torch.inference_mode():
        assert torch.equal(child.eval()(x), parent.eval()(x))
        assert not torch.equal(child(x), x)  # the check is not trivially identity == identity
