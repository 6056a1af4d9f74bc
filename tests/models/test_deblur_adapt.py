"""Adapting a deblur model to one rig (models/deblur/adapt.py): fine-tuned on the rig's known-good tiles,
exported beside its base, refused with a clear error (nothing written) when it cannot serve."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from appliance.config import DeblurConfig
from appliance.messages import BlurAssessment
from appliance.restoration.restorer import TileRestorer
from appliance.tile_io import read_tile
from appliance.weights import WEIGHTS_DIR
from models.deblur.adapt import AdaptError, adapt, main, tiles_digest
from models.deblur.export import export_run
from models.deblur.recipe import build_model

TIER = "fast"
SAMPLES = WEIGHTS_DIR.parent / "tools" / "sample_tiles"
NO_BASE = Path("/nonexistent/deblur.onnx")  # tile checks come first: these tests never reach the base
TINY = {"width": 4, "enc_blocks": [1, 1], "middle_blocks": 1, "dec_blocks": [1, 1], "noise_map": True}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny blind model, exported as the runtime's weights are (onnx, pt2, json)."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = build_model(TINY)
    config = {"run_name": "tiny", "model": TINY}
    torch.save({"model": model.state_dict(), "config": config, "step": 1, "val_psnr": 0.0}, folder / "best.pt")
    export_run(folder, folder / "weights", name="tiny")
    return folder / "weights" / "tiny.onnx"


def rig_tiles(count: int = 5, side: int = 112) -> tuple[list[np.ndarray], list[str]]:
    """`count` in-focus crops of the bundled sharp sample tiles (one rig)."""
    tiles, names = [], []
    for path in sorted(SAMPLES.glob("sharp_*.png")):
        tile = read_tile(path)
        for y in (0, 256):
            tiles.append(tile[y : y + side, 40 : 40 + side].copy())
            names.append(f"{path.name}[{y}]")
    return tiles[:count], names[:count]


@pytest.mark.system
def test_an_adapted_model_restores_the_rigs_tiles_better_and_records_where_it_came_from(
    tiny_base: Path, tmp_path: Path
) -> None:
    tiles, names = rig_tiles()
    out = tmp_path / "rig" / "deblur-rig.onnx"
    done = adapt(tiles, names, out, tiny_base, steps=30, threads=2)
    assert done.adapted_psnr_db > done.base_psnr_db and done.steps == 30
    sidecar = json.loads(out.with_suffix(".json").read_text())
    record = sidecar["recipe"]["adaptation"]
    assert record["tiles"] == names and record["tiles_sha256"] == tiles_digest(tiles)
    assert record["base_model"] == json.loads(tiny_base.with_suffix(".json").read_text())["model_version"]
    assert record["val_psnr_db_after"] > record["val_psnr_db_before"]
    assert sidecar["model_version"].startswith("deblur-tiny-rig") and sidecar["model_version"].endswith("-step30")
    assert out.with_suffix(".pt2").is_file()
    restorer = TileRestorer.from_config(DeblurConfig(backend="onnx", model_path=out, num_cpus_per_replica=1.0))
    assert restorer.weights_version == sidecar["model_version"]
    (restored,) = restorer.restore([tiles[0]], [BlurAssessment(1.0, "soft", float("nan"))])
    assert restored.shape == tiles[0].shape and restored.dtype == np.uint8


@pytest.mark.system
def test_an_adaptation_that_does_not_help_writes_nothing(tiny_base: Path, tmp_path: Path) -> None:
    tiles, names = rig_tiles()
    out = tmp_path / "deblur-rig.onnx"
    # A learning rate this high wrecks the weights within a few steps: the rig's own tiles restore worse.
    with pytest.raises(AdaptError, match="no better than .*nothing written, keep the base model"):
        adapt(tiles, names, out, tiny_base, steps=5, threads=2, lr=50.0)
    assert not list(tmp_path.iterdir())


def test_too_few_tiles_are_refused(tmp_path: Path) -> None:
    tiles, names = rig_tiles(4)
    with pytest.raises(AdaptError, match="at least 5 known-good tiles of one rig; got 4"):
        adapt(tiles, names, tmp_path / "rig.onnx", NO_BASE)


def test_tiles_of_two_bit_depths_are_refused_naming_them(tmp_path: Path) -> None:
    tiles, names = rig_tiles()
    tiles[3] = tiles[3].astype(np.uint16) * 257
    with pytest.raises(AdaptError, match=r"sharp_a.png\[0\] is uint8, sharp_b.png\[256\] is uint16"):
        adapt(tiles, names, tmp_path / "rig.onnx", NO_BASE)


def test_a_tile_too_small_to_train_on_is_named(tmp_path: Path) -> None:
    tiles, names = rig_tiles()
    tiles[2] = tiles[2][:90, :90].copy()
    with pytest.raises(AdaptError, match=r"sharp_b.png\[0\]: \(90, 90\) is too small to adapt on; .* >= 96 px"):
        adapt(tiles, names, tmp_path / "rig.onnx", NO_BASE)


def test_a_constant_tile_is_named(tmp_path: Path) -> None:
    tiles, names = rig_tiles()
    tiles[1] = np.full_like(tiles[1], 128)
    with pytest.raises(AdaptError, match=r"sharp_a.png\[256\]"):
        adapt(tiles, names, tmp_path / "rig.onnx", NO_BASE)


def test_the_base_is_never_overwritten_and_must_have_its_sidecar(tmp_path: Path) -> None:
    tiles, names = rig_tiles()
    base = tmp_path / "base.onnx"
    with pytest.raises(AdaptError, match="never replaces its base"):
        adapt(tiles, names, base, base)
    with pytest.raises(AdaptError, match=r"\.onnx file"):
        adapt(tiles, names, tmp_path / "rig.pt2", base)
    with pytest.raises(AdaptError, match="at least 1 step"):
        adapt(tiles, names, tmp_path / "rig.onnx", base, steps=0)
    base.write_bytes(b"an onnx file without its sidecar")
    with pytest.raises(AdaptError, match=r"base\.json"):
        adapt(tiles, names, tmp_path / "rig.onnx", base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.onnx"]


def test_the_command_names_an_rgb_file_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiles, _ = rig_tiles()
    paths = []
    for i, tile in enumerate(tiles):
        paths.append(tmp_path / f"t{i}.png")
        cv2.imwrite(str(paths[-1]), tile)
    rgb = np.stack([tiles[0], tiles[1], tiles[2]], axis=-1)
    cv2.imwrite(str(paths[4]), rgb)
    code = main([*map(str, paths), "--out", str(tmp_path / "out" / "rig.onnx"), "--base", str(NO_BASE)])
    assert code == 2
    assert "t4.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
