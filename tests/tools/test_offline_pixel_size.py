"""`score`, `deblur` and `calibrate` take the tiles' pixel size, as the running appliance takes it from a header."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import tifffile
from typer.testing import CliRunner

from appliance.detection.calibration import RestorationBlend, load_calibration, save_calibration
from appliance.restoration.restorer import CLASSICAL_VERSION
from appliance.tile_io import read_tile
from appliance.tools.cli import app
from models.blur_synth import DATA_DIR, BlurParams, apply_blur, quantize, to_unit_float

pytestmark = pytest.mark.fast


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A calibration of five real 4 nm ISBI slices (with a hand-made restoration blend for the classical
    restorer), and two other slices at 6 nm, each in focus and blurred by sigma 2.5 px."""
    folder = tmp_path_factory.mktemp("pixel-size")
    isbi = [read_tile(DATA_DIR / f"{i}.png") for i in range(7)]
    known_good = []
    for i in range(5):
        known_good.append(folder / f"known-good-{i}.tif")
        tifffile.imwrite(known_good[-1], isbi[i])
    path = folder / "calibration.json"
    code, out, err = invoke(
        "calibrate", *map(str, known_good), "--out", str(path), "--pixel-size-nm", "4", "--no-restoration"
    )
    assert code == 0, out + err
    blend = RestorationBlend(deblur_model=CLASSICAL_VERSION, model_weight=0.25, psnr_db={"0.25": 30.0}, probes=1)
    save_calibration(load_calibration(path).model_copy(update={"restoration": blend}), path)
    tiles = []
    for i, slice_ in enumerate(isbi[5:7]):
        at6 = cv2.resize(slice_, (341, 341), interpolation=cv2.INTER_AREA)  # 4 nm -> 6 nm
        tiles += [folder / f"sharp-{i}.tif", folder / f"soft-{i}.tif"]
        tifffile.imwrite(tiles[-2], at6)
        tifffile.imwrite(tiles[-1], quantize(apply_blur(to_unit_float(at6), BlurParams("gaussian", 2.5))))
    return path, tiles


def scored(*args: str) -> tuple[list[dict[str, object]], str]:
    code, out, err = invoke("score", "--json", *args)
    assert code == 0, out + err
    return [json.loads(line) for line in out.splitlines()], err


def test_score_reads_tiles_against_the_rig_spectrum_at_their_pixel_size(rig: tuple[Path, list[Path]]) -> None:
    calibration, tiles = rig
    records, err = scored(*map(str, tiles), "--calibration", str(calibration), "--pixel-size-nm", "6")
    assert err == ""
    assert [r["label"] for r in records] == ["sharp", "soft", "sharp", "soft"], records
    assert all(r["pixel_size_nm"] == 6.0 and "in-focus spectrum" in str(r["reason"]) for r in records)
    # Without a pixel size the tiles are taken as of the calibration's (the record says nothing of one).
    records, _ = scored(*map(str, tiles), "--calibration", str(calibration))
    assert all("pixel_size_nm" not in r and "in-focus spectrum" in str(r["reason"]) for r in records)


def test_beyond_twice_the_calibrations_pixel_size_the_quadrature_rule_judges_and_says_so(
    rig: tuple[Path, list[Path]],
) -> None:
    calibration, tiles = rig
    records, err = scored(*map(str, tiles), "--calibration", str(calibration), "--pixel-size-nm", "10")
    assert "warning: tiles at 10 nm are beyond 0.5-2x the calibration's 4 nm" in err
    assert all("quadrature" in str(r["reason"]) and r["pixel_size_nm"] == 10.0 for r in records), records


def test_deblur_restores_with_the_rig_wiener_at_the_tiles_pixel_size_and_the_model_alone_beyond(
    rig: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    calibration, tiles = rig
    soft = str(tiles[1])
    versions = {}
    for nm in ("6", "10"):
        code, out, err = invoke(
            "deblur", soft, "--out", str(tmp_path / nm), "--calibration", str(calibration), "--backend", "classical",
            "--pixel-size-nm", nm,
        )  # fmt: skip
        assert code == 0, out + err
        record = json.loads(out)
        assert record["action"] == "restored" and record["pixel_size_nm"] == float(nm)
        versions[nm] = record["deblur_version"]
    assert versions == {"6": f"{CLASSICAL_VERSION}+rig-wiener-0.75", "10": CLASSICAL_VERSION}


def test_a_pixel_size_without_a_calibration_is_refused_and_nothing_is_written(
    rig: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    _, tiles = rig
    code, out, err = invoke("score", str(tiles[0]), "--pixel-size-nm", "6")
    assert code == 2 and out == "" and "error: --pixel-size-nm 6 needs --calibration" in err
    code, out, err = invoke("deblur", str(tiles[1]), "--out", str(tmp_path / "out"), "--pixel-size-nm", "6")
    assert code == 2 and out == "" and "needs --calibration" in err
    assert not (tmp_path / "out").exists()


def test_calibrate_takes_one_pixel_size_per_file(tmp_path: Path) -> None:
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.tif")
        tifffile.imwrite(files[-1], read_tile(DATA_DIR / f"{i}.png"))
    out = tmp_path / "calibration.json"
    sizes = [arg for nm in ("4", "4", "4", "4.4", "4.4") for arg in ("--pixel-size-nm", nm)]
    code, stdout, err = invoke("calibrate", *map(str, files), "--out", str(out), *sizes, "--no-restoration")
    assert code == 0, stdout + err
    assert load_calibration(out).pixel_size_nm == 4.0 and "pixel size 4 nm" in stdout
    # A count that is neither one nor one per file is refused before any tile is read; nothing is written.
    out.unlink()
    code, stdout, err = invoke("calibrate", *map(str, files), "--out", str(out), *sizes[:4])
    assert code == 1 and "error: 2 pixel sizes for 5 tiles" in err
    assert not out.exists()
