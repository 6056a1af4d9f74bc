"""Runtime blur detector on real held-out EM: labels, region map, bad input, ONNX backend and export."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.config import DetectorConfig
from appliance.detection.detector import (
    BLUR_DETECTOR_MODEL,
    GRID,
    BlurDetector,
    ClassicalBackend,
    OnnxBackend,
    blur_score_from_sigma,
    extract_patches,
)
from appliance.messages import TILE_LABELS
from appliance.tile_io import TileError
from models.blur_synth import BlurParams, load_image, load_split, synthesize

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def test_images() -> list[np.ndarray]:
    return [load_image(p) for p in load_split("test")]


@pytest.fixture(scope="module")
def learned() -> BlurDetector:
    assert BLUR_DETECTOR_MODEL.is_file(), (
        f"bundled weights missing: {BLUR_DETECTOR_MODEL} (run models/detector/train.py)"
    )
    return BlurDetector.from_config(DetectorConfig())


@pytest.fixture(scope="module")
def classical() -> BlurDetector:
    return BlurDetector.from_config(DetectorConfig(backend="classical"))


def _render(images: list[np.ndarray], params: BlurParams | None, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [synthesize(im, params, rng) for im in images]


def test_auto_picks_the_bundled_onnx_model(learned: BlurDetector) -> None:
    assert isinstance(learned.backend, OnnxBackend)
    assert learned.model_version.startswith("blurnet-")
    assert "CPUExecutionProvider" in learned.backend.providers


def test_missing_configured_model_is_an_error_not_a_silent_fallback(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model_path"):
        BlurDetector.from_config(DetectorConfig(model_path=tmp_path / "nope.onnx"))


@pytest.mark.parametrize("which", ["learned", "classical"])
def test_sharp_tiles_are_sharp_and_blur_raises_the_score(
    which: str, test_images: list[np.ndarray], request: pytest.FixtureRequest
) -> None:
    detector: BlurDetector = request.getfixturevalue(which)
    sharp = detector.assess(_render(test_images, None))
    blurred = detector.assess(_render(test_images, BlurParams("gaussian", 2.0)))
    assert [a.label for a in sharp] == ["sharp"] * len(test_images)
    assert max(a.blur_score for a in sharp) < min(a.blur_score for a in blurred)
    for a in sharp + blurred:
        assert a.label in TILE_LABELS and 0.0 <= a.blur_score <= 1.0
        assert len(a.region_scores) == GRID and all(len(row) == GRID for row in a.region_scores)
        assert a.model_version == detector.model_version


@pytest.mark.parametrize(
    ("params", "label"),
    [
        (BlurParams("gaussian", 2.0), "soft"),
        (BlurParams("disk", 1.8), "soft"),
        (BlurParams("astigmatic", 2.0, anisotropy=2.5, angle_deg=60.0), "soft"),
        (BlurParams("gaussian", 5.0), "retake"),
    ],
)
def test_learned_labels_follow_the_restorable_limit(
    learned: BlurDetector, test_images: list[np.ndarray], params: BlurParams, label: str
) -> None:
    results = learned.assess(_render(test_images, params, seed=1))
    assert [a.label for a in results] == [label] * len(test_images)
    for a in results:
        if label == "retake":
            assert a.sigma_px > DetectorConfig().max_restorable_sigma_px and "restorable" in a.reason
        else:
            assert a.sigma_px == pytest.approx(params.sigma_px, rel=0.35)


def test_learned_estimates_astigmatism(learned: BlurDetector, test_images: list[np.ndarray]) -> None:
    results = learned.assess(_render(test_images, BlurParams("astigmatic", 3.0, 3.0, angle_deg=120.0), 2))
    for a in results:
        assert a.anisotropy > 1.6
        assert min(abs(a.angle_deg - 120.0), 180.0 - abs(a.angle_deg - 120.0)) < 20.0


def test_region_map_catches_a_tilted_section(learned: BlurDetector, test_images: list[np.ndarray]) -> None:
    # Blur grows to the right (angle 0): sharp left columns, strongly blurred right columns.
    results = learned.assess(_render(test_images, BlurParams("tilted", 7.0, angle_deg=0.0), seed=3))
    for a in results:
        regions = np.array(a.region_scores)
        assert regions[:, -2:].mean() > regions[:, :2].mean() + 0.3
        assert a.label == "retake" and "partial blur" in a.reason


def test_mostly_blank_sharp_tile_is_not_called_blurred(learned: BlurDetector, test_images: list[np.ndarray]) -> None:
    tiles = []
    for image in test_images:
        blank = np.full_like(image, int(np.median(image)))
        blank[:256, :256] = image[:256, :256]  # one quadrant of neuropil, 75 % empty resin
        tiles.append(blank)
    assert [a.label for a in learned.assess(_render(tiles, None, seed=4))] == ["sharp"] * len(tiles)


def test_sizes_dtypes_read_only_and_batches(learned: BlurDetector, test_images: list[np.ndarray]) -> None:
    image = test_images[0]
    wide = (image.astype(np.uint16) * 257)[:, :300]
    small = np.ascontiguousarray(image[:40, :50])
    big = np.tile(image, (3, 3))
    for tile in (wide, small, big):
        tile.flags.writeable = False  # the detector must not write into the caller's buffer
    results = learned.assess([wide, small, big], names=["wide.tif", "small.tif", "big.tif"])
    assert len(results) == 3
    assert results[2].label == "sharp"
    assert results[0].to_record()["region_scores"] == results[0].region_scores
    assert learned.assess([]) == []


@pytest.mark.parametrize(
    ("pixels", "problem"),
    [
        (np.zeros((64, 64), np.float32), "unsupported dtype"),
        (np.full((64, 64), np.nan, np.float64), "unsupported dtype"),
        (np.zeros((64, 64, 3), np.uint8), "2-D"),
        (np.zeros((0, 64), np.uint8), "empty"),
        (np.full((64, 64), 7, np.uint8), "constant"),
        (np.zeros((16, 64), np.uint8), "smaller"),
    ],
)
def test_bad_input_raises_tile_error_naming_the_tile(classical: BlurDetector, pixels: np.ndarray, problem: str) -> None:
    with pytest.raises(TileError, match=problem) as info:
        classical.assess([pixels], names=["section-0042/tile-7.tif"])
    assert "section-0042/tile-7.tif" in str(info.value)


def test_patches_are_native_resolution(test_images: list[np.ndarray]) -> None:
    big = np.tile(test_images[0], (5, 5))[:2400, :2400]
    cfg = DetectorConfig()
    patches, cells = extract_patches(big, cfg.patch_rows, cfg.patches_per_row)
    assert patches.shape == (cfg.patch_rows * cfg.patches_per_row, 64, 64)
    assert np.all(np.bincount(cells, minlength=GRID * GRID) == 2)  # two patches in every cell
    y0 = int(round(2400 / cfg.patch_rows / 2 - 32))  # first row, first column line
    np.testing.assert_allclose(patches[0], big[y0 : y0 + 64, y0 : y0 + 64] / 255.0, atol=1e-6)


def test_score_mapping_is_monotone() -> None:
    sig = np.array([0.0, 0.5, 1.0, 3.0, 6.0, 20.0])
    score = blur_score_from_sigma(sig)
    assert score[0] == 0.0 and np.all(np.diff(score) > 0) and score[-1] <= 1.0


def test_classical_backend_gives_blank_patches_no_weight() -> None:
    rng = np.random.default_rng(0)
    noise_only = (0.5 + 0.01 * rng.standard_normal((4, 64, 64))).astype(np.float32)
    assert np.all(ClassicalBackend().estimate(noise_only).weight == 0.0)


def test_exported_onnx_agrees_with_torch(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from models.detector.export import export
    from models.detector.network import BlurNet

    torch.manual_seed(0)
    model = BlurNet()
    model.eval()
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(
        {"state_dict": model.state_dict(), "config": {"model": {"widths": [8, 16, 32, 48, 64]}}, "epoch": 0}, checkpoint
    )
    onnx_path = export(checkpoint, tmp_path)  # export itself asserts ORT == torch on random patches
    rng = np.random.default_rng(1)
    patches = rng.random((8, 64, 64), dtype=np.float32)
    got = OnnxBackend(onnx_path).session.run(None, {"patches": patches[:, None]})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(patches[:, None])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
