"""Rig calibration: quadrature rule, labels, refusals naming the file, JSON files, pixel size."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from appliance.config import ConfigError, DetectorConfig
from appliance.detection.calibration import (
    MIN_TILES,
    CalibrationError,
    FocusReference,
    RigCalibration,
    TileStats,
    added_blur_px,
    apply_calibration,
    apply_to_all,
    calibrate,
    calibration_from_stats,
    load_calibration,
    load_configured_calibration,
    region_sigma_px,
    rig_reference,
    save_calibration,
    scale_to_pixel_size,
)
from appliance.detection.detector import BlurDetector, blur_score_from_sigma
from appliance.messages import BlurAssessment
from appliance.tile_io import read_tile
from models.blur_synth import DATA_DIR, BlurParams, synthesize

pytestmark = pytest.mark.fast

SHARED = DATA_DIR  # ../shared/data/isbi2012-train (or ISBI2012_DIR)
CFG = DetectorConfig()


@pytest.fixture(scope="module")
def detector() -> BlurDetector:
    return BlurDetector.from_config(CFG)


@pytest.fixture(scope="module")
def isbi_tiles() -> list[tuple[str, np.ndarray]]:
    """Six real in-focus ISBI 2012 tiles (512x512 uint8) from the train split."""
    return [(f"{i}.png", read_tile(SHARED / f"{i}.png")) for i in range(6)]


def _stats(name: str, sigma_px: float, noise: float = 0.01, dtype: str = "uint8") -> TileStats:
    return TileStats(
        name=name,
        shape=(512, 512),
        dtype=dtype,
        sigma_px=sigma_px,
        region_sigma_median_px=sigma_px,  # type: ignore[arg-type]
        anisotropy=1.0,
        noise_level=noise,
        mean_level=0.5,
        contrast=0.15,
        skewness=-0.3,
    )


def _calibration(baseline: float = 1.5, region: float = 1.5) -> RigCalibration:
    stats = [_stats(f"t{i}.png", baseline) for i in range(MIN_TILES)]
    cal = calibration_from_stats(stats, "blurnet-test")
    return cal.model_copy(update={"region_baseline_sigma_px": region})


def _assessment(sigma_px: float, regions_px: float | None = None) -> BlurAssessment:
    regions = np.full((8, 8), sigma_px if regions_px is None else regions_px)
    return BlurAssessment(
        blur_score=float(blur_score_from_sigma(sigma_px)),
        label="soft",
        sigma_px=sigma_px,
        region_scores=blur_score_from_sigma(regions).tolist(),
        model_version="blurnet-test",
    )


# --- quadrature rule and labels --------------------------------------------------------------------


def test_added_blur_is_quadrature_difference_and_never_negative() -> None:
    assert added_blur_px(2.5, 1.5) == pytest.approx(2.0)
    assert added_blur_px(1.2, 1.5) == 0.0
    np.testing.assert_allclose(added_blur_px(np.array([1.5, 1.7, 5.0]), 1.5), [0.0, 0.8, np.sqrt(25 - 2.25)])


def test_rig_baseline_tile_becomes_sharp_and_added_blur_sets_label() -> None:
    cal = _calibration(baseline=1.5)
    at_baseline = apply_calibration(_assessment(1.6), cal, CFG)
    assert at_baseline.label == "sharp" and at_baseline.sigma_px == pytest.approx(np.sqrt(1.6**2 - 1.5**2), abs=1e-3)
    soft = apply_calibration(_assessment(2.5), cal, CFG)  # 2 px added
    assert soft.label == "soft" and soft.sigma_px == pytest.approx(2.0, abs=1e-3)
    assert soft.blur_score == pytest.approx(float(blur_score_from_sigma(2.0)), abs=1e-4)
    retake = apply_calibration(_assessment(4.0), cal, CFG)  # 3.7 px added > 3.0 restorable
    assert retake.label == "retake" and "restorable limit" in retake.reason and "calibrated" in retake.reason
    assert retake.model_version == "blurnet-test"
    partial = replace(_assessment(4.0), label="retake", reason="partial blur: region row 1 col 2")
    assert apply_calibration(partial, cal, CFG).reason.startswith("partial blur: region row 1 col 2; calibrated")


def test_regions_are_corrected_with_the_region_baseline() -> None:
    cal = _calibration(baseline=1.5, region=1.0)
    out = apply_calibration(_assessment(1.5, regions_px=1.25), cal, CFG)
    np.testing.assert_allclose(region_sigma_px(out), np.sqrt(1.25**2 - 1.0), atol=2e-3)


def test_not_judgeable_tile_is_left_alone() -> None:
    tile = BlurAssessment(blur_score=1.0, label="retake", sigma_px=0.2, reason="not judgeable: blank")
    assert apply_calibration(tile, _calibration(), CFG) is tile


def test_empty_tile_stays_empty() -> None:
    tile = BlurAssessment(blur_score=0.0, label="empty", sigma_px=0.0, reason="no tissue: 0 of 64 regions")
    assert apply_calibration(tile, _calibration(), CFG) is tile


def test_custom_thresholds_are_used_for_the_label() -> None:
    cfg = DetectorConfig(sharp_sigma_px=0.5, max_restorable_sigma_px=1.5)
    assert apply_calibration(_assessment(np.hypot(1.5, 0.7)), _calibration(1.5), cfg).label == "soft"
    assert apply_calibration(_assessment(np.hypot(1.5, 2.0)), _calibration(1.5), cfg).label == "retake"


# --- calibrate on real tiles and its refusals ------------------------------------------------------


def test_calibrate_real_tiles_records_baseline_and_model(detector: BlurDetector, isbi_tiles) -> None:
    names, tiles = zip(*isbi_tiles, strict=True)
    cal = calibrate(list(tiles), list(names), detector)
    assert cal.tile_count == 6 and cal.model_version == detector.model_version
    assert [t.name for t in cal.tiles] == list(names)
    assert 0.0 <= cal.baseline_sigma_px < 0.8 and cal.dtype == "uint8" and cal.noise_level > 0
    # A sharp tile of the same rig stays sharp; a 2 px blur of it reads as ~2 px added.
    rng = np.random.default_rng(1)
    sharp, blurred = detector.assess(
        [
            read_tile(SHARED / "7.png"),
            synthesize(read_tile(SHARED / "7.png"), BlurParams("gaussian", 2.0), rng, noise=False),
        ]
    )
    assert apply_calibration(sharp, cal, CFG).label == "sharp"
    assert apply_calibration(blurred, cal, CFG).sigma_px == pytest.approx(2.0, rel=0.3)


def test_too_few_tiles_says_how_many_are_needed(detector: BlurDetector, isbi_tiles) -> None:
    names, tiles = zip(*isbi_tiles[:1], strict=True)
    with pytest.raises(CalibrationError, match=f"at least {MIN_TILES}.*got 1"):
        calibrate(list(tiles), list(names), detector)


def test_blurred_tile_among_sharp_ones_is_named(detector: BlurDetector, isbi_tiles) -> None:
    names, tiles = (list(x) for x in zip(*isbi_tiles, strict=True))
    tiles[3] = synthesize(tiles[3], BlurParams("gaussian", 3.0), np.random.default_rng(2))
    names[3] = "blurred_3.png"
    with pytest.raises(CalibrationError, match=r"^blurred_3\.png: .*out of focus"):
        calibrate(tiles, names, detector)


def test_constant_and_rgb_images_are_named(detector: BlurDetector, isbi_tiles) -> None:
    names, tiles = (list(x) for x in zip(*isbi_tiles, strict=True))
    flat = [*tiles[:4], np.full((512, 512), 90, np.uint8)]
    with pytest.raises(CalibrationError, match=r"^flat\.png: constant image"):
        calibrate(flat, [*names[:4], "flat.png"], detector)
    resin = [*tiles[:4], synthesize(np.full((512, 512), 140, np.uint8), None, np.random.default_rng(3))]
    with pytest.raises(CalibrationError, match=r"^resin\.png: no tissue.*pick tiles with tissue"):
        calibrate(resin, [*names[:4], "resin.png"], detector)
    rgb = [*tiles[:4], np.dstack([tiles[4], tiles[4] // 2, tiles[4]])]
    with pytest.raises(CalibrationError, match=r"^colour\.png: colour"):
        calibrate(rgb, [*names[:4], "colour.png"], detector)


def test_mixed_instruments_are_refused() -> None:
    two_rigs = [_stats(f"a{i}.png", 0.2) for i in range(3)] + [_stats(f"b{i}.png", 2.0) for i in range(3)]
    with pytest.raises(CalibrationError, match="mixed instruments.*a0.png.*b0.png"):
        calibration_from_stats(two_rigs, "m")
    dtypes = [_stats(f"a{i}.png", 0.3) for i in range(4)] + [_stats("b.png", 0.3, dtype="uint16")]
    with pytest.raises(CalibrationError, match="mixed instruments.*b.png=uint16"):
        calibration_from_stats(dtypes, "m")
    noise = [_stats(f"a{i}.png", 0.3) for i in range(4)] + [_stats("noisy.png", 0.3, noise=0.2)]
    with pytest.raises(CalibrationError, match="noise level of noisy.png"):
        calibration_from_stats(noise, "m")


# --- files -----------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path: Path) -> None:
    cal = _calibration()
    path = tmp_path / "rig" / "calibration.json"
    save_calibration(cal, path)
    assert load_calibration(path, model_version="blurnet-test") == cal
    assert not list(path.parent.glob("*.part"))


def test_load_refuses_bad_version_extra_key_and_other_model(tmp_path: Path) -> None:
    raw = json.loads(_calibration().model_dump_json())
    bad = [("version", 4, "version"), ("surprise", 1, "surprise"), ("tile_count", 3, "tile_count")]
    for field, value, match in bad:
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps({**raw, field: value}))
        with pytest.raises(CalibrationError, match=rf"(?s){field}\.json: not a valid rig calibration.*{match}"):
            load_calibration(path)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match="recalibrate"):
        load_calibration(good, model_version="blurnet-v9")


# --- running baseline ------------------------------------------------------------------------------


def test_baseline_scales_with_pixel_size_because_the_in_focus_psf_is_fixed_in_nm() -> None:
    cal = _calibration(baseline=1.5, region=1.2).model_copy(update={"pixel_size_nm": 4.0})
    assert rig_reference(cal, 4.0) == FocusReference(1.5, 1.2)
    assert rig_reference(cal, 8.0) == FocusReference(0.75, 0.6)  # coarser pixels: the same PSF in fewer px
    assert rig_reference(cal, 2.0).baseline_sigma_px == pytest.approx(3.0)
    # Unknown on either side: the baseline in px as calibrated (the behaviour before pixel sizes).
    assert rig_reference(cal, None) == FocusReference(1.5, 1.2)
    assert rig_reference(_calibration(baseline=1.5, region=1.2), 8.0) == FocusReference(1.5, 1.2)
    assert scale_to_pixel_size(1.5, None, 8.0) == scale_to_pixel_size(1.5, 4.0, None) == 1.5


def test_a_scaled_reference_judges_a_tile_of_another_pixel_size() -> None:
    cal = _calibration(baseline=1.5).model_copy(update={"pixel_size_nm": 4.0})
    # A 2 nm tile of the same rig reads its in-focus PSF as 3 px: sharp against the scaled baseline...
    scaled = apply_calibration(_assessment(3.0), rig_reference(cal, 2.0), CFG)
    assert (scaled.label, scaled.sigma_px, scaled.baseline_sigma_px) == ("sharp", 0.0, 3.0)
    assert "rig baseline 3.00 px" in scaled.reason
    # ...while the unscaled baseline would call it ~2.6 px of added blur.
    assert apply_calibration(_assessment(3.0), cal, CFG).label == "soft"


def test_calibration_files_without_pixel_size_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    raw = json.loads(_calibration().model_dump_json())
    del raw["pixel_size_nm"]  # written before the field existed
    path.write_text(json.dumps(raw))
    assert load_calibration(path).pixel_size_nm is None
    with pytest.raises(ValueError, match="pixel_size_nm"):
        RigCalibration.model_validate({**raw, "pixel_size_nm": 0.0})


def test_calibration_requires_created_time_and_counts() -> None:
    cal = _calibration()
    assert cal.created_utc <= datetime.now(UTC)
    with pytest.raises(ValueError, match="tile_count"):
        RigCalibration(**{**cal.model_dump(), "tile_count": 6})


# --- detector.calibration in rig.yaml ---------------------------------------------------------------


def test_configured_model_version_is_read_without_loading_the_model(detector: BlurDetector) -> None:
    assert BlurDetector.configured_model_version(CFG) == detector.model_version
    classical = DetectorConfig(backend="classical")
    assert BlurDetector.configured_model_version(classical) == BlurDetector.from_config(classical).model_version


def test_configured_calibration_is_checked_naming_the_field_and_the_file(
    tmp_path: Path, detector: BlurDetector
) -> None:
    assert load_configured_calibration(CFG) is None
    good = tmp_path / "good.json"
    save_calibration(_calibration().model_copy(update={"model_version": detector.model_version}), good)
    loaded = load_configured_calibration(CFG.model_copy(update={"calibration": good}))
    assert loaded is not None and loaded.model_version == detector.model_version
    other = tmp_path / "other.json"
    save_calibration(_calibration(), other)  # made with "blurnet-test"
    missing = tmp_path / "missing.json"
    for path, problem in ((other, "made with detector 'blurnet-test'"), (missing, "cannot read calibration")):
        with pytest.raises(ConfigError) as info:
            load_configured_calibration(CFG.model_copy(update={"calibration": path}))
        assert str(info.value).startswith(f"detector.calibration: {path}: ") and problem in str(info.value)


def test_apply_to_all_is_the_identity_without_a_calibration() -> None:
    tiles = [_assessment(1.5), _assessment(3.0)]
    assert apply_to_all(tiles, None, CFG) == tiles
    calibrated = apply_to_all(tiles, _calibration(), CFG)
    assert [a.sigma_px for a in calibrated] == [0.0, pytest.approx(np.sqrt(9 - 2.25), abs=1e-3)]
