"""Deblur per source (bench/deblur_sources.py) on one tiny crop of a real source: fields, units, the oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from appliance.config import DeblurConfig, DetectorConfig
from appliance.detection.calibration import calibrate
from appliance.detection.detector import BlurDetector
from appliance.pixels import centre_crop
from appliance.restoration.restorer import TileRestorer
from appliance.tile_io import read_tile
from bench.deblur_eval import make_assessor
from bench.deblur_sources import rig_for_tile, rig_split, rigs_calibrated_on, score_source
from bench.detector_sources import CORPUS, Source
from models.blur_synth import DATA_DIR, FAMILIES

pytestmark = pytest.mark.fast

CROPS = {  # one 8-bit and one 16-bit source: PSNR is on each tile's own dtype range
    "uint8": CORPUS / "syconn_sbem_j0126" / "j0126_raw_img_153.png",
    "uint16": CORPUS / "n2v_sem_demo_16bit" / "n2v_sem_test_input.png",
}


@pytest.fixture(scope="module")
def restorer() -> TileRestorer:
    return TileRestorer.from_config(DeblurConfig(backend="onnx", num_cpus_per_replica=1.0))


@pytest.mark.parametrize("dtype", sorted(CROPS))
def test_one_crop_gives_psnr_in_db_per_cell_and_the_oracle_beats_the_input_at_sigma_2(
    restorer: TileRestorer, dtype: str
) -> None:
    if not CROPS[dtype].is_file():
        pytest.skip(f"{CROPS[dtype]} missing (../shared/data/em-corpus)")
    tile = centre_crop(read_tile(CROPS[dtype]), 64)
    assert str(tile.dtype) == dtype
    entry = score_source(restorer, [("crop", tile)], np.random.default_rng(0), make_assessor("blind"), (2.0,))
    cells = entry["cells"]
    assert set(cells) == {f"{family}@2" for family in FAMILIES} | {"in_focus"}
    assert entry["dtype"] == dtype and entry["tile_shapes"] == [[64, 64]]
    for cell in cells.values():  # dB on the dtype's full range: 255 applied to uint16 would read far below 10
        assert all(10.0 < v < 80.0 and math.isfinite(v) for v in cell.values()), cell
    assert "wiener" not in cells["tilted@2"]  # no single PSF, no oracle
    for family in ("gaussian", "disk", "astigmatic"):
        cell = cells[f"{family}@2"]
        assert max(cell["wiener"], cell["rl"]) >= cell["input"], (family, cell)
    summary = entry["summary"]
    margins = summary["margins"]["gaussian@2"]
    gaussian = cells["gaussian@2"]
    assert margins["over_input_db"] == pytest.approx(gaussian["model"] - gaussian["input"])
    assert margins["over_oracle_db"] == pytest.approx(gaussian["model"] - max(gaussian["wiener"], gaussian["rl"]))
    assert summary["by_family"]["tilted"].keys() == {"over_input_db"}
    assert summary["meets_done_when"] == (summary["gain_over_input_every_cell"] and summary["within_oracle_every_cell"])


def isbi_crops(slices: range) -> list[tuple[str, np.ndarray]]:
    """Two 256 px crops of each ISBI validation slice: a source of one rig."""
    images = [read_tile(DATA_DIR / f"{i}.png") for i in slices]
    return [(f"{i}[{o}]", image[o : o + 256, o : o + 256].copy()) for i, image in enumerate(images) for o in (0, 256)]


def test_calibrated_tiles_are_restored_by_a_rig_calibrated_on_five_other_tiles_of_the_source() -> None:
    crops = isbi_crops(range(22, 25))
    source = Source("isbi-crops", crops, [], "3 slices, 2 crops each")
    restorer = TileRestorer.from_config(DeblurConfig(backend="classical"))
    detector = BlurDetector.from_config(DetectorConfig())
    rig, what = rig_for_tile(source, crops[2][0], restorer, detector)
    assert rig is not None and what == f"model share {rig.model_weight:g}"
    assert rig.deblur_model == restorer.weights_version
    # The calibration is the appliance's own on the 5 other crops: the same reference as calibrating them directly.
    others = [t for n, t in crops if n != crops[2][0]]
    direct = calibrate(others, [n for n, _ in crops if n != crops[2][0]], detector).spectral_arrays()
    assert direct is not None
    np.testing.assert_array_equal(rig.reference[0], direct[0])
    # A source whose calibration is refused is restored by the model alone, and why is kept.
    blank = Source("blank", [(f"b{i}", np.full((256, 256), 90, np.uint8)) for i in range(6)], [], "constant")
    none, why = rig_for_tile(blank, "b0", restorer, detector)
    assert none is None and why.startswith("calibration refused: ") and "constant image" in why


def test_the_rig_protocol_calibrates_once_on_the_first_five_tiles_and_tests_only_the_others() -> None:
    crops = isbi_crops(range(22, 26))
    source = Source("isbi-crops", crops, [], "4 slices, 2 crops each")
    known_good, tested = rig_split(source, 6, 128)
    assert [n for n, _ in known_good] == [n for n, _ in crops[:5]]
    assert [n for n, _ in tested] == [n for n, _ in crops[5:]]  # 3 left: all of them, never a known-good one
    assert all(t.shape == (128, 128) for _, t in tested)
    restorer = TileRestorer.from_config(DeblurConfig(backend="classical"))
    detector = BlurDetector.from_config(DetectorConfig())
    rigs = rigs_calibrated_on(source, known_good, [n for n, _ in tested], restorer, detector)
    direct = calibrate([t for _, t in known_good], [n for n, _ in known_good], detector).spectral_arrays()
    assert direct is not None and len(rigs) == 3
    for rig, what in rigs:  # one calibration, the same for every tested tile
        assert rig is not None and what == f"model share {rig.model_weight:g}"
        np.testing.assert_array_equal(rig.reference[0], direct[0])
