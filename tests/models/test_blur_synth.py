"""Synthetic blur generator: PSFs are normalised and sized as documented, blur/noise/quantise behave."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.pixels import tilted_sigma_map
from models.blur_synth import (
    FAMILIES,
    BlurParams,
    add_sem_noise,
    apply_blur,
    load_image,
    load_split,
    psf_kernel,
    quantize,
    sample_blur,
    synthesize,
    to_unit_float,
)

pytestmark = pytest.mark.fast


def _second_moments(kernel: np.ndarray) -> np.ndarray:
    half = kernel.shape[0] // 2
    ys, xs = np.mgrid[-half : half + 1, -half : half + 1]
    return np.array(
        [[(kernel * xs * xs).sum(), (kernel * xs * ys).sum()], [(kernel * xs * ys).sum(), (kernel * ys * ys).sum()]]
    )


@pytest.fixture(scope="module")
def sharp() -> np.ndarray:
    return load_image(load_split("test")[0])


def _grad_energy(image: np.ndarray) -> float:
    f = image.astype(np.float64)
    return float(np.mean(np.diff(f, axis=0) ** 2) + np.mean(np.diff(f, axis=1) ** 2))


def test_split_is_fixed_and_disjoint() -> None:
    splits = {name: [p.name for p in load_split(name)] for name in ("train", "val", "test")}
    assert splits["test"] == ["26.png", "27.png", "28.png", "29.png"]
    assert len(splits["train"]) == 22 and len(splits["val"]) == 4
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))


@pytest.mark.parametrize("family", ["gaussian", "disk", "astigmatic"])
@pytest.mark.parametrize("sigma", [0.7, 2.0, 5.0])
def test_psf_is_normalised_odd_and_has_the_documented_sigma(family: str, sigma: float) -> None:
    params = BlurParams(family, sigma, anisotropy=2.0 if family == "astigmatic" else 1.0, angle_deg=30.0)
    kernel = psf_kernel(params)
    assert kernel.dtype == np.float64 and kernel.ndim == 2
    assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
    assert kernel.sum() == pytest.approx(1.0, abs=1e-9)
    eig = np.sqrt(np.linalg.eigvalsh(_second_moments(kernel)))  # ascending: minor, major
    # Pixel integration adds 1/12 px^2 of variance, hence the loose tolerance at small sigma.
    assert eig[1] == pytest.approx(sigma, rel=0.12)
    if family == "astigmatic":
        assert eig[1] / eig[0] == pytest.approx(2.0, rel=0.2)
    else:
        assert eig[1] / eig[0] == pytest.approx(1.0, abs=1e-6)


def test_astigmatic_major_axis_follows_angle() -> None:
    kernel = psf_kernel(BlurParams("astigmatic", 3.0, anisotropy=3.0, angle_deg=90.0))
    m = _second_moments(kernel)
    assert m[1, 1] > 5 * m[0, 0]  # 90 deg = major axis along y (rows)


def test_tilted_has_no_single_psf_and_blurs_one_side_only(sharp: np.ndarray) -> None:
    with pytest.raises(ValueError, match="tilted"):
        psf_kernel(BlurParams("tilted", 3.0))
    image = to_unit_float(sharp)
    out = apply_blur(image, BlurParams("tilted", 4.0, angle_deg=0.0))  # blur grows to the right
    assert out.shape == image.shape and out.dtype == np.float32
    assert np.allclose(out[:, :8], image[:, :8], atol=0.05)
    assert _grad_energy(out[:, -64:]) < 0.2 * _grad_energy(image[:, -64:])
    sig = tilted_sigma_map((10, 20), 5.0, 45.0)
    assert sig[0, 0] == 0.0 and sig[-1, -1] == pytest.approx(5.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_blur_reduces_high_frequencies_for_every_family(sharp: np.ndarray, family: str) -> None:
    params = BlurParams(family, 2.0, anisotropy=2.0 if family == "astigmatic" else 1.0)
    image = to_unit_float(sharp)
    out = apply_blur(image, params)
    assert out.shape == image.shape
    assert abs(float(out.mean()) - float(image.mean())) < 0.01  # PSFs preserve brightness
    assert _grad_energy(out) < 0.6 * _grad_energy(image)


def test_noise_is_poisson_gaussian() -> None:
    rng = np.random.default_rng(1)
    flat = np.full((256, 256), 0.5, np.float32)
    noisy = add_sem_noise(flat, rng, photons_per_unit=100.0, read_sigma=0.01)
    expected_var = 0.5 / 100.0 + 0.01**2
    assert float(noisy.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(noisy.var()) == pytest.approx(expected_var, rel=0.1)


def test_quantize_to_8_and_16_bit() -> None:
    values = np.array([[-0.1, 0.0, 0.5, 1.0, 1.2]], np.float32)
    assert quantize(values, np.uint8).tolist() == [[0, 0, 128, 255, 255]]
    assert quantize(values, np.uint16).tolist() == [[0, 0, 32768, 65535, 65535]]
    with pytest.raises(ValueError, match="unsupported"):
        quantize(values, np.float32)


def test_sample_blur_respects_ranges_and_is_seeded() -> None:
    a = [sample_blur(np.random.default_rng(7)) for _ in range(3)]
    b = [sample_blur(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(3)
    draws = [sample_blur(rng, sigma_range=(1.0, 3.0)) for _ in range(200)]
    assert {d.family for d in draws} == set(FAMILIES)
    assert all(1.0 <= d.sigma_px <= 3.0 for d in draws)
    assert all(1.5 <= d.anisotropy <= 4.0 for d in draws if d.family == "astigmatic")
    with pytest.raises(ValueError, match="family"):
        sample_blur(rng, "motion")


def test_synthesize_keeps_shape_and_dtype(sharp: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    clean = synthesize(sharp, None, rng, noise=False)
    assert np.array_equal(clean, sharp)  # no blur, no noise = identity
    noisy = synthesize(sharp, None, rng)
    assert noisy.dtype == np.uint8 and noisy.shape == sharp.shape and not np.array_equal(noisy, sharp)
    wide = synthesize(sharp, BlurParams("disk", 3.0), rng, dtype=np.uint16)
    assert wide.dtype == np.uint16 and wide.shape == sharp.shape
    assert _grad_energy(to_unit_float(wide)) < _grad_energy(to_unit_float(noisy))


def test_bad_params_are_rejected() -> None:
    with pytest.raises(ValueError, match="sigma_px"):
        BlurParams("gaussian", -1.0)
    with pytest.raises(ValueError, match="anisotropy"):
        BlurParams("astigmatic", 2.0, anisotropy=0.5)
