"""Spectral reading of blur added to a rig's in-focus spectrum, and the calibration that carries it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from appliance import spectral
from appliance.config import DetectorConfig
from appliance.detection.calibration import (
    CalibrationError,
    FocusReference,
    RigCalibration,
    apply_calibration,
    calibrate,
    leave_one_out_readings,
    load_calibration,
    noise_level,
    rig_reference,
    save_calibration,
    spectral_scale,
)
from appliance.detection.detector import BlurDetector
from appliance.detection.online_baseline import OnlineBaseline
from appliance.messages import BlurAssessment
from appliance.pixels import centre_crop
from appliance.tile_io import read_tile
from bench.detector_sources import CORPUS, MAX_SIDE
from models.blur_synth import DATA_DIR, BlurParams, blur_with_noise

pytestmark = pytest.mark.fast

CFG = DetectorConfig()


@pytest.fixture(scope="module")
def rig() -> list[np.ndarray]:
    """Five real in-focus ISBI 2012 tiles (512x512 uint8): one rig's known-good tiles."""
    return [read_tile(DATA_DIR / f"{i}.png") for i in range(5)]


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    """An in-focus tile of the same rig that the reference never saw (ISBI test slice 27)."""
    return read_tile(DATA_DIR / "27.png")


@pytest.fixture(scope="module")
def reference(rig: list[np.ndarray]) -> spectral.SpectralReferenceArrays:
    spectra = [spectral.window_spectra(t) for t in rig]
    assert all(s is not None for s in spectra)
    return spectral.reference_log_power([s for s in spectra if s is not None])


@pytest.fixture(scope="module")
def detector() -> BlurDetector:
    return BlurDetector.from_config(CFG)


def _acquire(tile: np.ndarray, params: BlurParams | None, seed: int = 0) -> np.ndarray:
    """The tile blurred by params (None: as it is), with noise at its own level again, as a rig would see it."""
    return blur_with_noise(tile, params, noise_level(tile), np.random.default_rng(seed))


def _read(tile: np.ndarray, reference: spectral.SpectralReferenceArrays) -> spectral.SpectralReading:
    spectra = spectral.window_spectra(tile)
    assert spectra is not None
    reading = spectral.read_added_blur(spectra, *reference)
    assert reading is not None
    return reading


def test_an_in_focus_tile_of_the_rig_reads_no_added_blur(held_out, reference) -> None:
    assert _read(_acquire(held_out, None), reference).sigma_px < 0.8  # the `sharp` threshold


@pytest.mark.parametrize("sigma_px", [1.0, 2.0, 3.0])
def test_gaussian_blur_is_read_as_the_sigma_added(held_out, reference, sigma_px: float) -> None:
    reading = _read(_acquire(held_out, BlurParams("gaussian", sigma_px)), reference)
    assert reading.sigma_px == pytest.approx(sigma_px, rel=0.2)


def test_astigmatism_reads_the_major_axis_and_its_angle(held_out, reference) -> None:
    params = BlurParams("astigmatic", 2.5, anisotropy=2.5, angle_deg=30.0)
    reading = _read(_acquire(held_out, params), reference)
    assert reading.sigma_px == pytest.approx(2.5, rel=0.2)
    assert reading.anisotropy > 1.5
    assert min(abs(reading.angle_deg - 30.0), 180 - abs(reading.angle_deg - 30.0)) < 15


def test_blur_growing_across_the_tile_is_read_where_it_is_worst(held_out, reference) -> None:
    tilted = _acquire(held_out, BlurParams("tilted", 3.0, angle_deg=0.0))  # sharp left, 3 px right
    reading = _read(tilted, reference)
    assert reading.where.startswith("quadrant") and reading.where.endswith(",1")
    assert reading.sigma_px > 1.2


def _estimate(tile: np.ndarray, reference: spectral.SpectralReferenceArrays) -> float:
    spectra = spectral.window_spectra(tile)
    assert spectra is not None
    estimate = spectral.estimate_added_blur(spectra, *reference)
    assert estimate is not None
    return estimate


def test_the_estimate_of_an_isotropic_blur_is_its_sigma_where_the_reading_runs_high(reference) -> None:
    """Over ten ISBI slices the reference never saw and sigma 1-3 px, the blur estimate is within 10 % of the true
    sigma (median; 6 % over all 25 other slices); the decision's reading (the worst region's major axis) lies
    above it."""
    errors, excess = [], []
    for index, sigma_px in ((i, s) for i in range(20, 30) for s in (1.0, 1.5, 2.0, 3.0)):
        tile = _acquire(read_tile(DATA_DIR / f"{index}.png"), BlurParams("gaussian", sigma_px), seed=index)
        estimate = _estimate(tile, reference)
        errors.append(abs(estimate - sigma_px) / sigma_px)
        excess.append(_read(tile, reference).sigma_px - estimate)
    assert float(np.median(errors)) <= 0.10
    assert float(np.median(excess)) > 0.0


def test_the_estimate_of_a_disk_is_its_second_moment_where_a_gaussian_fit_reads_high(reference) -> None:
    """A uniform disk of radius R (a defocused round aperture) has sigma R / 2; its spectrum falls faster than the
    Gaussian's of that sigma. On these slices a Gaussian fit alone read it 1.09x (median error 8.9 %); read over
    PSF shapes, 0.96x (3.9 %)."""
    errors = []
    for index, sigma_px in ((i, s) for i in range(20, 30) for s in (1.0, 1.5, 2.0, 3.0)):
        tile = _acquire(read_tile(DATA_DIR / f"{index}.png"), BlurParams("disk", sigma_px), seed=index)
        errors.append(abs(_estimate(tile, reference) - sigma_px) / sigma_px)
    assert float(np.median(errors)) <= 0.06


def test_the_estimate_of_astigmatism_is_its_major_axis(held_out, reference) -> None:
    params = BlurParams("astigmatic", 2.5, anisotropy=2.5, angle_deg=30.0)
    assert _estimate(_acquire(held_out, params), reference) == pytest.approx(2.5, rel=0.15)


def test_the_estimate_takes_a_quadrant_only_where_it_stands_out(held_out, reference) -> None:
    """A blur growing to 3 px across the tile is estimated where it is worst; an in-focus tile has no blur."""
    assert _estimate(_acquire(held_out, BlurParams("tilted", 3.0, angle_deg=0.0)), reference) > 1.2
    assert _estimate(_acquire(held_out, None), reference) < 0.5


def test_the_worst_reading_decides_sharp_and_the_estimate_soft_or_retake() -> None:
    """The worst region's major axis decides whether a calibrated tile is sharp (blur along one axis or in one
    quadrant is soft focus); the estimate is the verdict's sigma: the soft/retake boundary and the restoration."""
    reference = FocusReference(0.5, 0.5, spectral=True)
    judged = BlurAssessment(blur_score=0.3, label="sharp", sigma_px=0.6, model_version="m")
    cases = [
        ((0.7, 0.6), "sharp", 0.6),
        ((0.7, 0.85), "sharp", 0.85),
        ((0.95, 0.6), "soft", 0.6),
        ((1.4, 1.1), "soft", 1.1),
        ((3.4, 2.9), "soft", 2.9),
        ((3.6, 3.2), "retake", 3.2),
    ]
    for (worst, estimate), label, sigma in cases:
        verdict = replace(judged, spectral_sigma_px=worst, spectral_estimate_px=estimate)
        calibrated = apply_calibration(verdict, reference, CFG)
        assert (calibrated.label, calibrated.sigma_px) == (label, sigma), (worst, estimate, calibrated.reason)


def test_contrast_does_not_read_as_blur(held_out, reference) -> None:
    """The fit's intercept takes contrast: a low-contrast acquisition of an in-focus field is still in focus."""
    faint = (128 + (held_out.astype(np.float32) - 128) * 0.3).round().astype(np.uint8)
    assert _read(_acquire(faint, None), reference).sigma_px < 0.8


def test_too_small_or_featureless_tiles_give_no_reading(reference) -> None:
    assert spectral.window_spectra(np.full((100, 400), 7, np.uint8)) is None
    flat = np.random.default_rng(0).normal(128, 3, (256, 256)).round().astype(np.uint8)
    spectra = spectral.window_spectra(flat)
    assert spectra is not None and spectral.read_added_blur(spectra, *reference) is None


# --- the calibration carries the reference; the detector reads; apply_calibration takes the reading -------


def test_calibrate_records_the_reference_and_the_detector_reads_against_it(rig, held_out, detector, tmp_path) -> None:
    cal = calibrate(rig, [f"{i}.png" for i in range(5)], detector, pixel_size_nm=4.0)
    assert cal.version == 3 and cal.mapping == "spectral" and cal.spectral is not None
    path = tmp_path / "calibration.json"
    save_calibration(cal, path)
    loaded = load_calibration(path, detector.model_version)
    assert loaded.spectral == cal.spectral
    reference = loaded.spectral.arrays()  # type: ignore[union-attr]

    blurred = _acquire(held_out, BlurParams("gaussian", 2.0))
    plain, read = detector.assess([blurred, blurred], spectral_references=[None, reference])
    assert plain.spectral_sigma_px is None
    assert read.spectral_sigma_px == pytest.approx(2.0, rel=0.2)
    assert "spectral_sigma_px" in read.to_record() and "spectral_sigma_px" not in plain.to_record()

    assert read.spectral_estimate_px == pytest.approx(2.0, rel=0.2)
    verdict = apply_calibration(read, rig_reference(loaded, 4.0), CFG)
    assert verdict.sigma_px == read.spectral_estimate_px and verdict.label == "soft"
    assert "in-focus spectrum" in verdict.reason and f"worst region and axis {read.spectral_sigma_px:.2f} px" in (
        verdict.reason
    )
    # Another pixel size within 2x: the tile is read against the reference rescaled to it (below); the rig
    # Wiener restores a finer one against the reference as it is. Within 5 % or unknown: as it is...
    assert rig_reference(loaded, 8.0).spectral and rig_reference(loaded, 2.0).spectral
    rescaled = [loaded.spectral_arrays(8.0), loaded.spectral_arrays(2.0), loaded.spectral_arrays(8.0, restoring=True)]
    for arrays in rescaled:
        assert arrays is not None and not np.array_equal(arrays[0], reference[0])
    as_is = [loaded.spectral_arrays(4.1), loaded.spectral_arrays(None), loaded.spectral_arrays(2.0, restoring=True)]
    for arrays in as_is:
        assert arrays is not None and np.array_equal(arrays[0], reference[0])
    # ...beyond it there is no reference for that tile, and quadrature is used.
    assert loaded.spectral_arrays(10.0) is None and loaded.restoration_inputs(10.0) is None
    other = apply_calibration(read, rig_reference(loaded, 10.0), CFG)
    assert "quadrature" in other.reason and not rig_reference(loaded, 10.0).spectral


def _specimen(pixel_nm: float, seed: int, blur_px: float = 0.0) -> np.ndarray:
    """A 512 px uint8 field of one specimen imaged at pixel_nm: the same power spectrum in cycles/nm (a knee at
    1/40 nm, not a power law, so the pixel size shows), a Gaussian blur of blur_px (px at pixel_nm), white noise."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(512)[:, None], np.fft.rfftfreq(512)[None, :]
    f2 = fx * fx + fy * fy
    power = (1.0 + f2 / pixel_nm**2 * 40.0**2) ** -2 * np.exp(-4 * np.pi**2 * f2 * blur_px**2)
    coefficients = (rng.normal(size=f2.shape) + 1j * rng.normal(size=f2.shape)) * np.sqrt(power)
    coefficients[0, 0] = 0.0
    field = np.fft.irfft2(coefficients, s=(512, 512))
    field = field / field.std() * 40.0 + 128.0 + rng.normal(0.0, 2.0, field.shape)
    return np.clip(field.round(), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def specimen_at_4nm() -> spectral.SpectralReferenceArrays:
    spectra = [spectral.window_spectra(_specimen(4.0, seed)) for seed in range(5)]
    return spectral.reference_log_power([s for s in spectra if s is not None])


@pytest.mark.parametrize("pixel_nm", [6.0, 8.0])
def test_a_tile_of_another_pixel_size_is_read_against_the_reference_rescaled_to_it(
    specimen_at_4nm, pixel_nm: float
) -> None:
    """The in-focus PSF and the specimen are fixed in nm: a reference taken at 4 nm, rescaled to the tile's
    pixel size, reads the blur added to a 6 or 8 nm tile; the reference as it is reads it too low."""
    scale = spectral_scale(4.0, pixel_nm)
    assert scale == pytest.approx(4.0 / pixel_nm)
    rescaled = spectral.reference_at_scale(specimen_at_4nm, scale)
    assert not rescaled[1].all() and rescaled[1].sum() >= spectral.MIN_BINS  # bins beyond the reference's range
    assert _read(_specimen(pixel_nm, 9), rescaled).sigma_px < 0.8
    for blur_px in (1.0, 2.0):
        tile = _specimen(pixel_nm, 9, blur_px)
        read, as_is = _read(tile, rescaled).sigma_px, _read(tile, specimen_at_4nm).sigma_px
        assert read == pytest.approx(blur_px, rel=0.1)
        assert abs(read - blur_px) < abs(as_is - blur_px)


def test_a_finer_tile_is_read_rescaled_and_restored_against_the_reference_as_it_is(specimen_at_4nm) -> None:
    """A 3 nm tile is read on the band the 4 nm reference covers, rescaled. Its restoration takes the reference
    as it is: rescaled, it has no bins in the finer tile's top band (that lost the rig Wiener 0.1-0.9 dB per
    tile on real tiles)."""
    assert spectral_scale(4.0, 3.0) == pytest.approx(4.0 / 3.0)
    assert spectral_scale(4.0, 3.0, restoring=True) == spectral_scale(4.0, 4.1) == spectral_scale(None, 3.0) == 1.0
    assert spectral_scale(4.0, 1.9) is None and spectral_scale(4.0, 8.5, restoring=True) is None  # beyond 2x
    rescaled = spectral.reference_at_scale(specimen_at_4nm, 4.0 / 3.0)
    assert _read(_specimen(3.0, 9), rescaled).sigma_px < 0.8
    for blur_px in (1.0, 2.0):
        assert _read(_specimen(3.0, 9, blur_px), rescaled).sigma_px == pytest.approx(blur_px, rel=0.1)


def test_calibrate_takes_one_pixel_size_per_tile(rig, detector) -> None:
    """One rig's known-good tiles at two magnifications: the calibration is at their median pixel size, each
    tile's model sigma recorded at it; sizes beyond 2x of it are refused naming the tile."""
    names = [f"{i}.png" for i in range(5)]
    plain = calibrate(rig, names, detector)
    mixed = calibrate(rig, names, detector, pixel_size_nm=[4.0, 4.0, 4.0, 5.0, 5.0])
    assert mixed.pixel_size_nm == 4.0 and mixed.spectral is not None
    assert [t.sigma_px for t in mixed.tiles] == pytest.approx(
        [t.sigma_px * f for t, f in zip(plain.tiles, [1, 1, 1, 1.25, 1.25], strict=True)]
    )
    assert calibrate(rig, names, detector, pixel_size_nm=[4.0] * 5).spectral == plain.spectral
    with pytest.raises(CalibrationError, match=r"4\.png: pixel size 9 nm against 4 nm"):
        calibrate(rig, names, detector, pixel_size_nm=[4.0, 4.0, 4.0, 4.0, 9.0])
    with pytest.raises(ValueError, match="5 tiles but 4 pixel sizes"):
        calibrate(rig, names, detector, pixel_size_nm=[4.0] * 4)


def test_calibration_tiles_are_read_leave_one_out_as_the_runtime_reads_a_tile(rig) -> None:
    """A known-good tile within spectral_scale's tolerance of the calibration's pixel size is read against the
    others' spectrum as it is (the runtime would read it so); one beyond it, against the spectrum rescaled."""
    spectra = [spectral.window_spectra(t) for t in rig]
    scales = [1.0, 1.0, 1.0, 1.03, 1.25]
    readings = leave_one_out_readings(spectra, scales)
    assert readings is not None
    for i, expected_scale in ((3, 1.0), (4, 1 / 1.25)):
        others = [s for j, s in enumerate(spectra) if j != i]
        reference = spectral.reference_log_power(others, scales[:i] + scales[i + 1 :])
        expected = spectral.read_added_blur(spectra[i], *spectral.reference_at_scale(reference, expected_scale))
        assert expected is not None and readings[i].sigma_px == pytest.approx(expected.sigma_px)


def test_a_beam_reference_keeps_the_spectral_reading(rig, held_out, detector) -> None:
    cal = calibrate(rig, [f"{i}.png" for i in range(5)], detector)
    beams = OnlineBaseline(CFG, cal)
    assert beams.label_reference(3, 0.4, 4.0).spectral
    assert not FocusReference(0.4, 0.4).spectral


def test_empty_tiles_get_no_spectral_reading(reference, detector) -> None:
    resin = np.random.default_rng(1).normal(120, 4, (512, 512)).round().astype(np.uint8)
    (verdict,) = detector.assess([resin], spectral_references=[reference])
    assert verdict.label == "empty" and verdict.spectral_sigma_px is None


def test_small_calibration_tiles_fall_back_to_quadrature(rig, detector) -> None:
    crops = [t[:100, :100] for t in rig]
    cal = calibrate(crops, [f"{i}.png" for i in range(5)], detector)
    assert cal.spectral is None and cal.mapping == "quadrature"


def test_version_1_files_load_and_another_bin_layout_is_refused(rig, detector, tmp_path: Path) -> None:
    cal = calibrate(rig, [f"{i}.png" for i in range(5)], detector)
    raw = json.loads(cal.model_dump_json())
    old = {k: v for k, v in raw.items() if k != "spectral"} | {"version": 1, "mapping": "quadrature"}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    assert load_calibration(path).spectral is None
    assert not rig_reference(load_calibration(path)).spectral

    other = RigCalibration.model_validate(raw | {"spectral": raw["spectral"] | {"window_px": 64}})
    with pytest.raises(CalibrationError, match="recalibrate"):
        other.spectral.arrays()  # type: ignore[union-attr]


def test_a_tile_of_another_instrument_among_the_rigs_is_named(rig, detector) -> None:
    corpus = CORPUS / "axondeepseg_sem_rat_spinalcord"
    foreign = centre_crop(read_tile(sorted(p for p in corpus.glob("*.png") if p.name != "contact.png")[0]), MAX_SIDE)
    names = [f"{i}.png" for i in range(4)] + ["rat_sem.png"]
    with pytest.raises(CalibrationError, match=r"^rat_sem\.png: .*power spectrum agrees.*another instrument"):
        calibrate([*rig[:4], foreign], names, detector)


def test_tiles_in_two_focus_states_are_refused_by_their_spectra(rig, detector) -> None:
    soft = [_acquire(t, BlurParams("gaussian", 2.0), seed=i) for i, t in enumerate(rig[:4])]
    names = [f"soft{i}.png" for i in range(4)] + ["sharp.png"]
    with pytest.raises(CalibrationError, match=r"focus states: sharp\.png is ~\d\.\d px sharper"):
        calibrate([*soft, rig[4]], names, detector)


def test_the_models_spot_retake_stands_only_where_the_spot_reads_beyond_repair_in_its_spectrum() -> None:
    """The spectrum reads the tile and its quadrants; a 1/16 spot beyond repair is the model's local windows', and
    the windows' own spectra around the spot confirm it (folds and charging make the model claim spots)."""
    reference = FocusReference(0.5, 0.5, spectral=True)
    regions = [[0.2] * 8 for _ in range(8)]
    spot = BlurAssessment(
        0.9, "retake", 6.0, region_scores=regions, reason="partial blur: region row 4 col 4 ...", spectral_sigma_px=0.5
    )
    confirmed = apply_calibration(replace(spot, spectral_spot_sigma_px=5.2), reference, CFG)
    assert confirmed.label == "retake" and confirmed.reason.startswith("partial blur: region row 4 col 4")
    assert apply_calibration(replace(spot, spectral_spot_sigma_px=0.9), reference, CFG).label == "sharp"
    # A whole tile the model over-reads (another instrument) is judged by its spectrum.
    over_read = replace(spot, reason="blur sigma ~6.0 px exceeds the restorable limit 3 px: refocus")
    assert apply_calibration(over_read, reference, CFG).label == "sharp"


def test_a_spectral_reference_with_non_finite_values_is_refused_naming_the_file(rig, detector, tmp_path) -> None:
    cal = calibrate(rig, [f"{i}.png" for i in range(5)], detector)
    raw = json.loads(cal.model_dump_json())
    raw["spectral"]["log_power"][3] = float("nan")
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(raw))  # json writes NaN, as a hand-edited or corrupted file could hold
    with pytest.raises(CalibrationError, match=r"(?s)nan\.json: not a valid rig calibration.*log_power.*finite"):
        load_calibration(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"mapping": "quadrature"}, r"mapping 'quadrature' with a spectral reference"),
        ({"spectral": None}, r"mapping 'spectral' with no spectral reference"),
        ({"version": 1}, r"version 1 holds no spectral reference"),
    ],
)
def test_a_calibration_file_that_contradicts_itself_is_refused_naming_the_file(
    rig, detector, tmp_path, edit: dict, message: str
) -> None:
    cal = calibrate(rig, [f"{i}.png" for i in range(5)], detector)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps({**json.loads(cal.model_dump_json()), **edit}))
    with pytest.raises(CalibrationError, match=rf"(?s)edited\.json: not a valid rig calibration.*{message}"):
        load_calibration(path)
