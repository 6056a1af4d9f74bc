"""Leave-one-source-out deblur training (models/deblur/loso.py, loso.yaml) and its device synthesis."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from appliance.noise import patch_noise_sigma
from models.blur_synth import load_image, load_split
from models.deblur.gpu_synth import (
    DeviceImages,
    SynthConfig,
    add_noise_and_quantise,
    draw_blur,
    make_batch,
    noise_sigma,
)
from models.deblur.loso import folds
from models.deblur.pack_data import PackedImage, write_packed
from models.deblur.recipe import RecipeError, effective_recipe, load_recipe
from models.deblur.train import REPO_ROOT, parent_checkpoint, train

LOSO = REPO_ROOT / "models/deblur/loso.yaml"


def synth_config(**changes) -> SynthConfig:
    cfg = SynthConfig.from_data(effective_recipe(LOSO, device="cuda").data, psf_planes=False)
    return SynthConfig(**{**cfg.__dict__, **changes})


@pytest.mark.fast
def test_noise_sigma_is_the_appliance_immerkaer_estimate() -> None:
    images = np.random.default_rng(0).random((3, 40, 52), dtype=np.float32)
    np.testing.assert_allclose(noise_sigma(torch.from_numpy(images)[:, None]).numpy(), patch_noise_sigma(images), 1e-5)


@pytest.mark.fast
def test_own_noise_samples_carry_the_crops_own_level() -> None:
    """Own-noise samples get Gaussian noise at gain x the crop's Immerkaer level; the others Poisson."""
    flat = torch.full((64, 1, 96, 96), 0.5)
    flat[:, :, ::2] += 0.04 * torch.randn(64, 1, 48, 96, generator=torch.Generator().manual_seed(1))
    cfg = synth_config(own_noise_fraction=1.0, noise_free_fraction=0.0, uint16_fraction=1.0)
    draw = draw_blur(np.random.default_rng(2), cfg, 64)
    assert (draw.own_noise_gain > 0).all() and (draw.photons == 0).all()
    own = noise_sigma(flat)
    noisy = add_noise_and_quantise(flat, draw, torch.Generator().manual_seed(3), own)
    added = (noisy - flat.clamp(0, 1)).std(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(added, draw.own_noise_gain * own.numpy(), rtol=0.03)


@pytest.mark.fast
def test_photons_range_reaches_clean_instruments() -> None:
    cfg = synth_config(own_noise_fraction=0.0, noise_free_fraction=0.0)
    photons = draw_blur(np.random.default_rng(4), cfg, 4000).photons
    assert photons.min() >= 30.0 and photons.max() <= 30000.0 and (photons > 10000).mean() > 0.1


@pytest.mark.fast
def test_blind_config_gives_pixels_only() -> None:
    image = load_image(load_split("train")[0])[:200, :200]
    images = DeviceImages([image], torch.device("cpu"))
    cfg = synth_config(batch=3, patch=48, margin=16)
    inputs, sharp = make_batch(images, np.random.default_rng(5), torch.Generator().manual_seed(5), cfg)
    assert inputs.shape == sharp.shape == (3, 1, 48, 48)


@pytest.mark.fast
def test_recipe_checks_its_new_fields(tmp_path: Path) -> None:
    recipe = load_recipe(LOSO)
    assert recipe.init_from is not None and recipe.init_from.program == "appliance/weights/deblur.pt2"
    assert load_recipe(REPO_ROOT / "models/deblur/loso_scratch.yaml").init_from is None
    raw = yaml.safe_load(LOSO.read_text())
    for bad, field in (
        ({"init_from": {"config": "a.yaml", "program": "b.pt2"}}, "init_from"),
        ({"data": {**raw["data"], "photons_range": [100.0, 10.0]}}, "photons_range"),
        ({"data": {**raw["data"], "own_noise_fraction": 1.5}}, "own_noise_fraction"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**raw, **bad}))
        with pytest.raises(RecipeError, match=field):
            load_recipe(path)
    isbi = tmp_path / "isbi.yaml"
    isbi.write_text(f"extends: {REPO_ROOT / 'models/deblur/stage1.yaml'}\ndata:\n  own_noise_fraction: 0.5\n")
    with pytest.raises(RecipeError, match="own_noise_fraction: only source: packed"):
        load_recipe(isbi)
    merged = effective_recipe(LOSO, exclude_sources=("neubias_training_em",), run_name="loso-x")
    assert merged.data.exclude_sources == ("neubias_training_em",) and merged.run_name == "loso-x"


@pytest.mark.fast
def test_parent_program_gives_the_bundled_weights() -> None:
    from models.deblur.recipe import build_model

    model = build_model(load_recipe(LOSO).model)
    model.load_state_dict(parent_checkpoint(load_recipe(LOSO).init_from)["model"], strict=True)


@pytest.mark.fast
def test_folds_plan_one_run_per_source_then_all() -> None:
    plan = folds(["neubias", "isbi2012", "axon"], LOSO, Path("scratch.yaml"), ("isbi2012",))
    assert [(f.run_name, f.held_out, f.config.name) for f in plan] == [
        ("loso-axon", "axon", "loso.yaml"),
        ("loso-isbi2012", "isbi2012", "scratch.yaml"),
        ("loso-neubias", "neubias", "loso.yaml"),
        ("loso-all", None, "loso.yaml"),
    ]


@pytest.fixture(scope="module")
def packed_two_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = load_image(load_split("train")[0])
    val = load_image(load_split("val")[0])
    images = [
        PackedImage("a", "isbi2012", "train", image[:96, :96].copy()),
        PackedImage("b", "other", "train", image[100:196, 100:196].copy()),
        PackedImage("v", "isbi2012", "val", val[:96, :96].copy()),
        PackedImage("w", "otherval", "val", val[100:196, 100:196].copy()),
    ]
    path = tmp_path_factory.mktemp("packed") / "two.npz"
    write_packed(images, path)
    return path


def tiny_recipe(folder: Path) -> Path:
    cfg = yaml.safe_load(LOSO.read_text())
    cfg.pop("init_from")
    cfg["model"].update(width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1])
    cfg["data"].update(patch=48, margin=16, batch=3, val_patches=4, val_patch=48)
    cfg["train"].update(steps=2, val_every=2, warmup_steps=1)
    cfg.pop("cpu_overrides")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.system
def test_a_fold_never_sees_its_source(packed_two_sources: Path, tmp_path: Path) -> None:
    config = tiny_recipe(tmp_path)
    run = train(config, "cpu", packed_two_sources, tmp_path / "out", 2.0, ("otherval",), "fold")
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert "val/isbi2012_psnr" in history[-1] and "val/otherval_psnr" not in history[-1]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["exclude_sources"] == ["otherval"]
    with pytest.raises(ValueError, match="not in the packed file"):
        train(config, "cpu", packed_two_sources, tmp_path / "out", 2.0, ("typo",), "bad")
    with pytest.raises(ValueError, match="no validation source left"):
        train(config, "cpu", packed_two_sources, tmp_path / "out", 2.0, ("isbi2012", "otherval"), "none")


@pytest.mark.system
def test_loso_command_trains_every_fold_and_packs_the_weights(packed_two_sources: Path, tmp_path: Path) -> None:
    config = tiny_recipe(tmp_path)
    out = tmp_path / "loso"
    command = [sys.executable, "-m", "models.deblur.loso", "--config", str(config), "--scratch-config", str(config)]
    command += ["--data", str(packed_two_sources), "--device", "cpu", "--out-dir", str(out), "--budget-s", "60"]
    command += ["--workers", "2", "--only", "loso-other", "loso-otherval", "loso-all"]
    subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True, timeout=300)
    summary = json.loads((out / "loso.json").read_text())
    assert sorted(r["run_name"] for r in summary["runs"]) == ["loso-all", "loso-other", "loso-otherval"]
    assert all(r["exit_code"] == 0 and r["steps_done"] == 2 for r in summary["runs"])
    packed = []
    for tar in sorted(out.glob("loso-weights-*.tar")):
        with tarfile.open(tar) as archive:
            packed += archive.getnames()
    assert sorted(n for n in packed if n.endswith(".pt")) == ["loso-all.pt", "loso-other.pt", "loso-otherval.pt"]


@pytest.mark.fast
def test_a_deeper_model_starts_at_its_parents_output(tmp_path: Path) -> None:
    """loso_deep.yaml: appended NAFBlocks are the identity at start; weights that do not fit are refused."""
    from models.deblur.recipe import build_model
    from models.deblur.train import load_parent_weights

    torch.manual_seed(0)
    parent = build_model(load_recipe(LOSO).model)
    for block in parent.modules():  # non-zero residual scales, so the parent is not itself an identity
        if hasattr(block, "beta"):
            torch.nn.init.normal_(block.beta, std=0.1)
            torch.nn.init.normal_(block.gamma, std=0.1)
    checkpoint = tmp_path / "fold.pt"
    torch.save({"model": parent.state_dict(), "step": 1}, checkpoint)
    cfg = effective_recipe(REPO_ROOT / "models/deblur/loso_deep.yaml", init_checkpoint=checkpoint)
    deep = build_model(cfg.model)
    load_parent_weights(deep, parent_checkpoint(cfg.init_from)["model"])
    x = torch.rand(1, 1, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(deep.eval()(x), parent.eval()(x))
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in parent.parameters())
    wider = build_model(load_recipe(LOSO).model.model_copy(update={"width": 8}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_parent_weights(wider, parent.state_dict())
    lacking = {k: v for k, v in parent.state_dict().items() if k != "ending.weight"}
    with pytest.raises(ValueError, match="ending.weight"):
        load_parent_weights(build_model(cfg.model), lacking)
