"""Restoration against the rig's in-focus spectrum: the added PSF's fit, the rig Wiener, the blend a calibration
measures, and the restorer applying it (real ISBI tiles; the rig = ISBI slices 22-26, held-out slice 27)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance import spectral
from appliance.config import DeblurConfig, DetectorConfig
from appliance.detection.calibration import (
    CalibrationError,
    RestorationBlend,
    calibrate,
    load_calibration,
    noise_level,
    save_calibration,
)
from appliance.detection.detector import BlurDetector
from appliance.messages import BlurAssessment
from appliance.pixels import psnr_db
from appliance.restoration.restorer import CLASSICAL_VERSION, TileRestorer
from appliance.restoration.rig_blend import MODEL_WEIGHTS, PROBES, measure_model_weight, probe_blur, probe_kernel
from appliance.restoration.rig_wiener import RigRestoration, blend, rig_wiener
from appliance.tile_io import read_tile
from appliance.tools.offline import rig_restoration, with_restoration_blend
from models.blur_synth import DATA_DIR, BlurParams, blur_with_noise, psf_kernel

TIER = "fast"  # this module's default tier (tests/conftest.py); tests of the other tier are marked


@pytest.fixture(scope="module")
def rig() -> list[np.ndarray]:
    """Five real in-focus ISBI 2012 tiles (512x512 uint8) next to the held-out one: one rig's known-good tiles.
    (The volume's noise changes along it: slices 0-5 read ~40 dB against their own noise, 10-29 ~27 dB.)"""
    return [read_tile(DATA_DIR / f"{i}.png") for i in range(22, 27)]


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return read_tile(DATA_DIR / "27.png")


@pytest.fixture(scope="module")
def reference(rig: list[np.ndarray]) -> spectral.SpectralReferenceArrays:
    return spectral.reference_log_power([s for s in map(spectral.window_spectra, rig) if s is not None])


@pytest.fixture(scope="module")
def rig_noise(rig: list[np.ndarray]) -> float:
    return float(np.median([noise_level(t) for t in rig])) ** 2


def _acquire(tile: np.ndarray, params: BlurParams | None, seed: int = 0) -> np.ndarray:
    return blur_with_noise(tile, params, noise_level(tile), np.random.default_rng(seed))


def _psf(tile: np.ndarray, reference: spectral.SpectralReferenceArrays) -> spectral.AddedPsf:
    spectra = spectral.window_spectra(tile)
    assert spectra is not None
    psf = spectral.fit_added_psf(spectra, *reference)
    assert psf is not None
    return psf


def _restored_psnr(image: np.ndarray | None, truth: np.ndarray) -> float:
    assert image is not None
    return psnr_db(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), truth)


# sigma 2: compared with the disk on the usable bins alone, this draw was read as a disk of 3.4 px.
@pytest.mark.parametrize("sigma_px", [1.5, 2.0, 3.0])
def test_a_gaussian_blur_is_fitted_as_its_covariance(held_out, reference, sigma_px: float) -> None:
    psf = _psf(_acquire(held_out, BlurParams("gaussian", sigma_px)), reference)
    assert psf.kind == "gaussian"
    var_x, cov_xy, var_y = psf.covariance_px2
    assert math.sqrt(var_x) == pytest.approx(sigma_px, rel=0.15)
    assert math.sqrt(var_y) == pytest.approx(sigma_px, rel=0.15)
    assert abs(cov_xy) < 0.15 * sigma_px**2


def test_an_astigmatic_blur_keeps_its_long_axis(held_out, reference) -> None:
    psf = _psf(_acquire(held_out, BlurParams("astigmatic", 3.0, 3.0, 0.0)), reference)
    var_x, _, var_y = psf.covariance_px2
    assert psf.kind == "gaussian" and var_x > 3 * var_y  # long axis along x, as blurred


def test_a_round_aperture_defocus_is_fitted_as_a_disk(held_out, reference) -> None:
    psf = _psf(_acquire(held_out, BlurParams("disk", 3.0)), reference)  # radius 2 sigma = 6 px
    # Read at each bin's mean frequency alone the radius came out 5.4 px here; averaged over the bin, 5.7.
    assert psf.kind == "disk" and psf.radius_px == pytest.approx(6.0, abs=0.5)
    assert psf.transfer(np.array([0.0]), np.array([0.0]))[0] == pytest.approx(1.0)


@pytest.mark.parametrize("sigma_px", [2.0, 3.0])
def test_a_disk_on_a_small_tile_is_read_as_a_disk(held_out, reference, sigma_px: float) -> None:
    """4 windows instead of 16: the disk's zeros sink into the noise. Judged on the bins with signal alone,
    2 and 3 of these 6 draws were read as Gaussians; judged on every bin, noise included, none is."""
    crop = held_out[128:384, 128:384]
    for seed in range(6):
        psf = _psf(_acquire(crop, BlurParams("disk", sigma_px), seed), reference)
        assert psf.kind == "disk" and psf.radius_px == pytest.approx(2 * sigma_px, abs=0.3), seed


def _power_law_field(rng: np.random.Generator, side: int = 512, slope: float = 2.5) -> np.ndarray:
    """A noise-free random field whose power falls as |f|^-slope, like natural images (float32, mean 0.5)."""
    fy, fx = np.fft.fftfreq(side)[:, None], np.fft.rfftfreq(side)[None, :]
    amplitude = np.maximum(np.hypot(fx, fy), 1.0 / side) ** (-slope / 2)
    spectrum = (rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape)) * amplitude
    field = np.fft.irfft2(spectrum, s=(side, side))
    return (0.5 + 0.12 * (field - field.mean()) / field.std()).astype(np.float32)


@pytest.mark.parametrize("slope", [2.0, 3.0])
def test_without_noise_a_disk_reads_its_own_radius(slope: float) -> None:
    rng = np.random.default_rng(3)

    def acquire(params: BlurParams | None) -> np.ndarray:
        field = _power_law_field(rng, slope=slope)
        blurred = field if params is None else cv2.filter2D(field, cv2.CV_32F, psf_kernel(params).astype(np.float32))
        return np.clip(np.rint(blurred * 65535), 0, 65535).astype(np.uint16)

    reference = spectral.reference_log_power([spectral.window_spectra(acquire(None)) for _ in range(5)])
    for radius in (4.0, 6.0):
        psf = _psf(acquire(BlurParams("disk", radius / 2)), reference)
        assert psf.kind == "disk" and psf.radius_px == pytest.approx(radius, abs=0.15)


def test_disk_transfer_has_its_first_zero_where_the_bessel_function_has() -> None:
    radius = 4.0
    first_zero = 3.8317 / (2 * math.pi * radius)  # J1's first zero / (2 pi R)
    assert abs(spectral.disk_transfer(np.array([first_zero]), radius)[0]) < 1e-3
    assert spectral.disk_transfer(np.array([0.5 * first_zero]), radius)[0] > 0.5


@pytest.mark.parametrize("params", [BlurParams("gaussian", 2.0), BlurParams("disk", 3.0)], ids=["gaussian", "disk"])
def test_the_rig_wiener_restores_well_beyond_the_blurred_input(
    held_out, reference, rig_noise, params: BlurParams
) -> None:
    acquired = _acquire(held_out, params)
    restored = rig_wiener(acquired, reference, rig_noise)
    assert restored is not None and restored.shape == held_out.shape and restored.dtype == np.float32
    assert _restored_psnr(restored, held_out) > psnr_db(acquired, held_out) + 1.0


def test_an_in_focus_tile_sent_anyway_keeps_the_rigs_look(held_out, reference, rig_noise) -> None:
    acquired = _acquire(held_out, None)  # the noise added once more is all it lost
    assert _restored_psnr(rig_wiener(acquired, reference, rig_noise), held_out) > psnr_db(acquired, held_out)


def test_a_tile_too_small_for_a_spectral_reading_gets_none(held_out, reference) -> None:
    assert rig_wiener(held_out[:100, :100], reference) is None


def test_blend_weights_the_model_output_and_keeps_its_dtype() -> None:
    model = np.full((4, 4), 1000, np.uint16)
    wiener = np.full((4, 4), 3000 / 65535, np.float32)
    np.testing.assert_array_equal(blend(model, wiener, 1.0), model)
    assert blend(model, wiener, 0.0).dtype == np.uint16 and int(blend(model, wiener, 0.0)[0, 0]) == 3000
    assert int(blend(model, wiener, 0.25)[0, 0]) == 2500
    with pytest.raises(ValueError, match="model_weight must be in"):
        RigRestoration((np.zeros(2), np.ones(2, bool)), 1.5, "m")


def test_probe_psfs_sum_to_one_and_the_disk_has_the_sigma_it_names() -> None:
    for family, sigma in PROBES:
        if family == "tilted":  # no single PSF (next test)
            continue
        kernel = probe_kernel(family, sigma, 30.0)
        assert kernel.sum() == pytest.approx(1.0, abs=1e-5) and kernel.shape[0] % 2 == 1
    disk = probe_kernel("disk", 2.0, 0.0).astype(np.float64)
    half = disk.shape[0] // 2
    xs = np.arange(-half, half + 1, dtype=np.float64)
    assert math.sqrt(float((disk * xs[None, :] ** 2).sum())) == pytest.approx(2.0, rel=0.05)


def test_a_tilted_probe_is_sharp_at_one_edge_and_blurred_at_the_far_one(held_out) -> None:
    unit = held_out.astype(np.float32) / 255
    tilted = probe_blur(unit, "tilted", 3.0, 0.0)  # the blur grows along +x
    far = probe_blur(unit, "gaussian", 3.0, 0.0)
    np.testing.assert_allclose(tilted[:, 0], unit[:, 0], atol=1e-6)
    np.testing.assert_allclose(tilted[:, -1], far[:, -1], atol=1e-6)
    assert {family for family, _ in PROBES} == {"gaussian", "disk", "astigmatic", "tilted"}


def test_the_restorer_blends_a_rig_measured_with_its_model_and_names_it(held_out, reference, caplog) -> None:
    restorer = TileRestorer.from_config(DeblurConfig(backend="classical"))
    acquired = _acquire(held_out, BlurParams("gaussian", 2.0))
    noise = 1e-4
    soft = BlurAssessment(0.5, "soft", 2.0)
    alone, alone_versions = restorer.restore_versioned([acquired], [soft])
    ours = RigRestoration(reference, 0.25, CLASSICAL_VERSION, noise)
    mixed, versions = restorer.restore_versioned([acquired], [soft], rigs=[ours])
    assert alone_versions == [CLASSICAL_VERSION] and versions == [f"{CLASSICAL_VERSION}+rig-wiener-0.75"]
    wiener = rig_wiener(acquired, reference, noise)
    assert wiener is not None
    np.testing.assert_array_equal(mixed[0], blend(alone[0], wiener, 0.25))
    # A blend measured with another model says nothing about this one: the model alone, logged once.
    other = RigRestoration(reference, 0.25, "deblur-other", noise)
    with caplog.at_level(logging.WARNING, logger="appliance.restoration.restorer"):
        for _ in range(2):
            again, again_versions = restorer.restore_versioned([acquired], [soft], rigs=[other])
            np.testing.assert_array_equal(again[0], alone[0])
            assert again_versions == [CLASSICAL_VERSION]
    assert sum("measured with deblur model deblur-other" in r.message for r in caplog.records) == 1


def test_a_batch_on_several_threads_blends_each_tile_with_its_own_rig(held_out, reference) -> None:
    # The rig Wiener of a batch runs on the replica's threads (2 CPUs here): each tile must come back with its
    # own rig's blend, in its place, and a tile without a rig with the model alone.
    restorer = TileRestorer.from_config(DeblurConfig(backend="classical", num_cpus_per_replica=2))
    tiles = [_acquire(held_out, BlurParams(family, 2.0), seed) for seed, family in enumerate(("gaussian", "disk"))]
    tiles += [_acquire(held_out[:, ::-1].copy(), BlurParams("gaussian", 1.5), 2), held_out[:100, :100].copy()]
    soft = [BlurAssessment(0.5, "soft", 2.0)] * len(tiles)
    ours = [RigRestoration(reference, weight, CLASSICAL_VERSION, 1e-4) for weight in (0.25, 0.5)]
    rigs = [ours[0], ours[1], None, ours[0]]
    restored, versions = restorer.restore_versioned(tiles, soft, rigs=rigs)
    alone = restorer.restore(tiles, soft)
    for i in (0, 1):
        wiener = rig_wiener(tiles[i], reference, 1e-4)
        assert wiener is not None
        np.testing.assert_array_equal(restored[i], blend(alone[i], wiener, (0.25, 0.5)[i]))
    np.testing.assert_array_equal(restored[2], alone[2])
    np.testing.assert_array_equal(restored[3], alone[3])  # too small for a spectral reading: the model alone
    assert versions == [
        f"{CLASSICAL_VERSION}+rig-wiener-0.75",
        f"{CLASSICAL_VERSION}+rig-wiener-0.50",
        CLASSICAL_VERSION,
        CLASSICAL_VERSION,
    ]


def test_a_calibration_file_holds_the_blend_only_with_a_spectrum_and_in_version_3(rig, tmp_path: Path) -> None:
    measured = calibrate(rig, [f"{i}.png" for i in range(5)], BlurDetector.from_config(DetectorConfig()))
    blend_record = RestorationBlend(deblur_model="m", model_weight=0.5, psnr_db={"0.5": 30.0}, probes=6)
    path = tmp_path / "calibration.json"
    save_calibration(measured.model_copy(update={"restoration": blend_record}), path)
    loaded = load_calibration(path)
    assert loaded.version == 3 and loaded.restoration == blend_record
    restoration = rig_restoration(loaded)
    assert restoration is not None and (restoration.model_weight, restoration.deblur_model) == (0.5, "m")
    assert restoration.own_noise_power == pytest.approx(loaded.noise_level**2)
    raw = json.loads(path.read_text())
    for update, match in [
        ({"version": 2}, "version 2 holds no restoration blend"),
        ({"spectral": None, "mapping": "quadrature"}, "needs the spectral reference"),
        ({"restoration": {**raw["restoration"], "model_weight": 1.5}}, "model_weight"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**raw, **update}))
        with pytest.raises(CalibrationError, match=match):
            load_calibration(bad)


@pytest.mark.system
def test_calibration_measures_the_blend_on_the_rigs_own_tiles_with_the_bundled_model(rig, rig_noise) -> None:
    restorer = TileRestorer.from_config(DeblurConfig(backend="onnx"))
    reference = spectral.reference_log_power([s for s in map(spectral.window_spectra, rig) if s is not None])
    # Two 256 px crops: 16 probe restorations per measurement bound the test's time (a calibration probes <= 8 tiles).
    probed = [t[128:384, 128:384] for t in rig[:2]]
    first = measure_model_weight(restorer, probed, reference, rig_noise)
    assert first is not None and first.probes == len(probed) * len(PROBES)
    assert first.model_weight in MODEL_WEIGHTS and set(first.psnr_db) == set(MODEL_WEIGHTS)
    assert first.psnr_db[first.model_weight] == max(first.psnr_db.values())
    measured = calibrate(rig, [f"{i}.png" for i in range(5)], BlurDetector.from_config(DetectorConfig()))
    assert measured.noise_level**2 == pytest.approx(rig_noise)
    # Seeded probes: the same tiles give the same weight, which the calibration records with the model's version.
    calibrated = with_restoration_blend(measured, probed, restorer)
    assert calibrated.restoration is not None and calibrated.restoration.model_weight == first.model_weight
    assert calibrated.restoration.deblur_model == restorer.weights_version
    assert calibrated.restoration.psnr_db == {f"{w:g}": round(v, 3) for w, v in first.psnr_db.items()}
    # Tiles too small for a spectral reading: no blend, the calibration as it was.
    small = [t[:100, :100] for t in rig]
    assert measure_model_weight(restorer, small, reference, rig_noise) is None
    assert with_restoration_blend(measured, small, restorer) == measured


def test_a_16_bit_tile_that_is_not_square_is_restored_on_its_own_scale(rig, held_out) -> None:
    def wide(tile: np.ndarray) -> np.ndarray:  # 16-bit, 512 x 384: another dtype and shape than the rig's
        return (tile[:, :384].astype(np.uint16) * 257).astype(np.uint16)

    reference = spectral.reference_log_power([s for s in (spectral.window_spectra(wide(t)) for t in rig) if s])
    own_noise = float(np.median([noise_level(wide(t)) for t in rig])) ** 2
    truth = wide(held_out)
    acquired = _acquire(truth, BlurParams("gaussian", 2.0))
    restored = rig_wiener(acquired, reference, own_noise)
    assert restored is not None and restored.shape == (512, 384)
    out = np.clip(np.rint(restored * 65535), 0, 65535).astype(np.uint16)
    assert psnr_db(out, truth) > psnr_db(acquired, truth) + 1.0
