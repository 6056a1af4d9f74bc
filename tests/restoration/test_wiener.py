"""Classical deconvolution on real held-out EM (ISBI test split) blurred by the shared generator."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.noise import image_noise_sigma
from appliance.pixels import psnr_db
from appliance.restoration.wiener import auto_nsr, gaussian_psf, wiener_deconvolve
from bench.deconvolution import richardson_lucy
from models.blur_synth import BlurParams, apply_blur, load_image, load_split, psf_kernel, synthesize

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def sharp01() -> np.ndarray:
    # A 256 x 256 crop keeps the whole file fast on a 2-core box.
    return load_image(load_split("test")[0])[128:384, 128:384].astype(np.float32) / 255.0


@pytest.mark.parametrize(("sigma", "anisotropy", "angle"), [(2.0, 1.0, 0.0), (3.0, 2.5, 30.0), (2.0, 2.0, 135.0)])
def test_gaussian_psf_matches_the_generator_convention(sigma: float, anisotropy: float, angle: float) -> None:
    psf = gaussian_psf(sigma, anisotropy, angle)
    assert psf.shape[0] % 2 == 1 and psf.shape[0] == psf.shape[1]
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    family = "gaussian" if anisotropy == 1.0 else "astigmatic"
    reference = psf_kernel(BlurParams(family, sigma, anisotropy, angle))
    assert reference.shape == psf.shape
    # Same orientation and width; the generator integrates over pixels, hence the small difference.
    assert np.abs(reference - psf).max() < 0.1 * reference.max()


def test_psf_rejects_bad_estimates() -> None:
    with pytest.raises(ValueError, match="sigma_px"):
        gaussian_psf(0.0)
    with pytest.raises(ValueError, match="anisotropy"):
        gaussian_psf(2.0, anisotropy=0.5)


def test_wiener_and_rl_with_true_psf_improve_psnr(sharp01: np.ndarray) -> None:
    params = BlurParams("gaussian", 2.0)
    # Mild noise (photons/unit 2000) so the test measures deconvolution, not denoising.
    blurred = apply_blur(sharp01, params)
    blurred = np.clip(blurred + np.random.default_rng(0).normal(0, 0.004, blurred.shape), 0, 1)
    blurred = blurred.astype(np.float32)
    psf = psf_kernel(params)
    wiener = np.clip(wiener_deconvolve(blurred, psf, auto_nsr(blurred)), 0, 1)
    rl = richardson_lucy(blurred, psf, iterations=15)
    base = psnr_db(blurred, sharp01, 1.0)
    assert psnr_db(wiener, sharp01, 1.0) > base + 1.0
    assert psnr_db(rl, sharp01, 1.0) > base + 1.0


def test_wiener_keeps_mean_intensity(sharp01: np.ndarray) -> None:
    blurred = apply_blur(sharp01, BlurParams("gaussian", 3.0))
    restored = wiener_deconvolve(blurred, gaussian_psf(3.0), nsr=0.1)
    # A flat noise-to-signal term would darken the tile by 1/(1 + nsr); ours is zero at DC.
    assert restored.mean() == pytest.approx(blurred.mean(), abs=2e-3)


def test_rl_continues_from_a_previous_estimate(sharp01: np.ndarray) -> None:
    blurred = apply_blur(sharp01, BlurParams("gaussian", 1.5))
    psf = gaussian_psf(1.5)
    in_one_go = richardson_lucy(blurred, psf, 8)
    in_two_steps = richardson_lucy(blurred, psf, 5, initial=richardson_lucy(blurred, psf, 3))
    np.testing.assert_allclose(in_two_steps, in_one_go, atol=1e-5)


def test_rl_stays_non_negative_and_finite(sharp01: np.ndarray) -> None:
    noisy = synthesize((sharp01 * 255).astype(np.uint8), BlurParams("disk", 2.0), np.random.default_rng(1))
    restored = richardson_lucy(noisy.astype(np.float32) / 255.0, psf_kernel(BlurParams("disk", 2.0)), 10)
    assert np.isfinite(restored).all() and restored.min() >= 0.0


def test_noise_estimate_tracks_added_noise() -> None:
    ramp = np.tile(np.linspace(0.2, 0.8, 256, dtype=np.float32), (256, 1))
    noisy = ramp + np.random.default_rng(2).normal(0, 0.02, ramp.shape).astype(np.float32)
    assert image_noise_sigma(noisy) == pytest.approx(0.02, rel=0.1)


def test_bad_arguments_name_the_problem(sharp01: np.ndarray) -> None:
    with pytest.raises(ValueError, match="odd"):
        wiener_deconvolve(sharp01, np.ones((4, 4)) / 16, 0.01)
    with pytest.raises(ValueError, match="nsr"):
        wiener_deconvolve(sharp01, gaussian_psf(1.0), 0.0)
    with pytest.raises(ValueError, match="iterations"):
        richardson_lucy(sharp01, gaussian_psf(1.0), 0)
    with pytest.raises(ValueError, match="2-D"):
        wiener_deconvolve(sharp01[None], gaussian_psf(1.0), 0.01)
