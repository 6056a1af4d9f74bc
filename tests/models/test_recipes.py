"""Every training recipe loads typed, refuses typos, and gives the values it gave before the typed recipes.

FROZEN holds the effective values of each deblur stage and of the detector recipe as they were when
the recipes were four hand-kept copies (read from those YAML files before the parent + overrides
rewrite): the `extends` chains must reproduce them exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.deblur.recipe import DeblurRecipe, RecipeError, build_model, effective_recipe, load_recipe, recipe_dict
from models.detector.recipe import build_blurnet, load_detector_recipe

pytestmark = pytest.mark.fast

DEBLUR = Path(__file__).resolve().parents[2] / "models" / "deblur"
DETECTOR = Path(__file__).resolve().parents[2] / "models" / "detector" / "config.yaml"

_STAGE1 = {
    "run_name": "nafnet-w16-v1",
    "seed": 20261125,
    "threads": 1,
    "model": {"width": 16, "enc_blocks": [1, 1, 2], "middle_blocks": 2, "dec_blocks": [1, 1, 1]},
    "data": {
        "patch": 128,
        "margin": 32,
        "batch": 8,
        "sigma_range": [0.4, 4.5],
        "families": ["gaussian", "disk", "astigmatic", "tilted"],
        "sharp_fraction": 0.05,
        "uint16_fraction": 0.2,
        "val_patches": 48,
        "val_patch": 192,
    },
    "train": {
        "steps": 1100,
        "max_minutes": 38,
        "lr": 1.0e-3,
        "min_lr": 1.0e-6,
        "warmup_steps": 100,
        "weight_decay": 1.0e-4,
        "betas": [0.9, 0.9],
        "grad_clip": 0.5,
        "val_every": 100,
    },
}
_STAGE2 = {
    **_STAGE1,
    "run_name": "nafnet-w16-v1-ft",
    "seed": 20261126,
    "init_from": {"config": "models/deblur/stage1.yaml", "checkpoint": "best.pt"},
    "data": {**_STAGE1["data"], "val_seed": 20261126},
    "train": {**_STAGE1["train"], "max_minutes": 17, "lr": 5.0e-4, "warmup_steps": 50},
}
_STAGE3 = {
    **_STAGE2,
    "run_name": "nafnet-w16-v2-noisemap",
    "seed": 20261127,
    "threads": 2,
    "init_from": {"config": "models/deblur/stage2.yaml", "checkpoint": "best.pt"},
    "model": {**_STAGE2["model"], "noise_map": True},
    "data": {**_STAGE2["data"], "sigma_range": [0.4, 3.5]},
    "train": {
        **_STAGE2["train"],
        "steps": 6000,
        "max_minutes": 60,
        "loss": "psnr",
        "lr": 3.0e-4,
        "warmup_steps": 100,
        "val_every": 250,
    },
}
_STAGE4 = {
    **_STAGE3,
    "run_name": "nafnet-w16-v2-noisefree",
    "seed": 20261128,
    "init_from": {"config": "models/deblur/stage3.yaml", "checkpoint": "best.pt"},
    "data": {**_STAGE3["data"], "noise_free_fraction": 0.1},
    "train": {**_STAGE3["train"], "steps": 3500, "max_minutes": 32, "lr": 2.0e-4},
}
_GPU = {
    "run_name": "nafnet-w32-psf-v3",
    "seed": 20261201,
    "threads": 2,
    "device": "cpu",
    "model": {
        "width": 32,
        "enc_blocks": [1, 1, 3],
        "middle_blocks": 4,
        "dec_blocks": [1, 1, 1],
        "noise_map": True,
        "psf_planes": True,
    },
    "data": {
        "source": "packed",
        "packed": ".gpu/em_train.npz",
        "patch": 192,
        "margin": 16,
        "batch": 64,
        "sigma_range": [0.4, 3.5],
        "families": ["gaussian", "disk", "astigmatic", "tilted"],
        "sharp_fraction": 0.05,
        "uint16_fraction": 0.2,
        "noise_free_fraction": 0.1,
        "blind_fraction": 0.2,
        "wrong_estimate_fraction": 0.05,
        "estimate_bias_px": [0.0, 0.8],
        "estimate_gain_log_sd": 0.12,
        "val_patches": 128,
        "val_patch": 192,
        "val_seed": 20261202,
    },
    "train": {
        "steps": 100000,
        "max_minutes": 3.5,
        "schedule": "time",
        "loss": "psnr",
        "lr": 1.0e-3,
        "min_lr": 1.0e-6,
        "warmup_steps": 100,
        "weight_decay": 1.0e-4,
        "betas": [0.9, 0.9],
        "grad_clip": 0.5,
        "val_every": 500,
    },
    "cpu_overrides": {"data": {"batch": 2, "val_patches": 4}},
}
# Issue 14's leave-one-source-out rounds (models/deblur/loso.py), as they ran on the H200 on 2026-11-26.
_LOSO = {
    "run_name": "nafnet-w16-v4-loso",
    "seed": 20261203,
    "threads": 2,
    "device": "cpu",
    "init_from": {"program": "appliance/weights/deblur.pt2"},
    "model": {
        "width": 16,
        "enc_blocks": [1, 1, 2],
        "middle_blocks": 2,
        "dec_blocks": [1, 1, 1],
        "noise_map": True,
        "psf_planes": False,
    },
    "data": {
        "source": "packed",
        "packed": ".gpu/em_train.npz",
        "patch": 128,
        "margin": 16,
        "batch": 64,
        "sigma_range": [0.4, 3.5],
        "families": ["gaussian", "disk", "astigmatic", "tilted"],
        "sharp_fraction": 0.1,
        "uint16_fraction": 0.2,
        "noise_free_fraction": 0.05,
        "photons_range": [30.0, 30000.0],
        "own_noise_fraction": 0.5,
        "val_patches": 128,
        "val_patch": 128,
        "val_seed": 20261204,
    },
    "train": {
        "steps": 100000,
        "max_minutes": 2.0,
        "schedule": "time",
        "loss": "psnr",
        "lr": 3.0e-4,
        "min_lr": 1.0e-6,
        "warmup_steps": 50,
        "weight_decay": 1.0e-4,
        "betas": [0.9, 0.9],
        "grad_clip": 0.5,
        "val_every": 250,
    },
    "cpu_overrides": {"data": {"batch": 4, "val_patches": 8}},
}
_LOSO_SCRATCH = {
    **_LOSO,
    "run_name": "nafnet-w16-v4-loso-scratch",
    "init_from": None,
    "train": {**_LOSO["train"], "lr": 1.0e-3, "warmup_steps": 100},
}
_LOSO_DEEP = {
    **_LOSO,
    "run_name": "nafnet-w16-v4-loso-deep",
    "init_from": None,
    "model": {**_LOSO["model"], "enc_blocks": [1, 1, 4], "middle_blocks": 6},
}
# models/deblur/adapt.py replaces `model` with the base model's and the patch sides and bit depth per rig.
_ADAPT = {
    **_LOSO,
    "run_name": "rig-adapt",
    "seed": 20261128,
    "init_from": None,
    "data": {
        **_LOSO["data"],
        "own_noise_fraction": 1.0,
        "batch": 8,
        "val_patches": 32,
        "val_patch": 128,
        "val_seed": 20261129,
    },
    "train": {
        **_LOSO["train"],
        "steps": 200,
        "max_minutes": 30.0,
        "schedule": "steps",
        "lr": 1.0e-4,
        "warmup_steps": 10,
        "val_every": 1000000,
    },
    "cpu_overrides": None,
}
FROZEN = {
    "adapt.yaml": _ADAPT,
    "loso.yaml": _LOSO,
    "loso_scratch.yaml": _LOSO_SCRATCH,
    "loso_deep.yaml": _LOSO_DEEP,
    "stage1.yaml": _STAGE1,
    "stage2.yaml": _STAGE2,
    "stage3.yaml": _STAGE3,
    "config.yaml": _STAGE4,
    "gpu.yaml": _GPU,
}
FROZEN_DETECTOR = {
    "seed": 20261125,
    "out_dir": "models/detector/runs/v1",
    "data": {
        "train_renderings": 3000,
        "val_images": 500,
        "patches_per_image": 16,
        "sigma_range": [0.3, 8.0],
        "p_sharp": 0.3,
        "p_blank": 0.08,
        "contrast_range": [0.03, 1.0],
        "scale_range": [0.6, 1.0],
        "p_uint16": 0.3,
        "p_content": 0.0,  # added with the em-corpus recipe; 0 and None draw nothing: v1 renders as before
        "corpus": None,
    },
    "model": {"widths": [8, 16, 32, 48, 64]},
    "train": {
        "epochs": 9,
        "batch_size": 256,
        "lr": 0.003,
        "weight_decay": 0.0001,
        "mse_weight": 0.2,
        "aniso_weight": 3.0,
        "angle_weight": 2.0,
        "threads": 2,
        "select_by": "loss",  # added with the fine-tune variants; v1 kept the lowest val loss
    },
}


def test_every_deblur_recipe_is_frozen_here() -> None:
    assert sorted(p.name for p in DEBLUR.glob("*.yaml")) == sorted(FROZEN)


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_stage_gives_the_values_it_gave_as_a_copy(name: str) -> None:
    assert recipe_dict(DEBLUR / name) == FROZEN[name]
    assert load_recipe(DEBLUR / name) == DeblurRecipe.model_validate(FROZEN[name])


def test_gpu_recipe_on_cpu_applies_its_overrides() -> None:
    on_cpu = effective_recipe(DEBLUR / "gpu.yaml", device="cpu", max_minutes=0.5, data_path=Path("x.npz"))
    assert (on_cpu.data.batch, on_cpu.data.val_patches, on_cpu.train.max_minutes) == (2, 4, 0.5)
    assert on_cpu.data.packed == "x.npz" and on_cpu.cpu_overrides is None
    on_gpu = effective_recipe(DEBLUR / "gpu.yaml", device="cuda")
    assert (on_gpu.data.batch, on_gpu.data.val_patches) == (64, 128)


def test_a_typo_is_refused_naming_the_file_and_field(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"extends: {DEBLUR / 'stage1.yaml'}\ntrain:\n  lerning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"typo.yaml: invalid recipe: train.lerning_rate: Extra inputs"):
        load_recipe(typo)
    bad_override = tmp_path / "bad_override.yaml"
    bad_override.write_text(f"extends: {DEBLUR / 'gpu.yaml'}\ncpu_overrides:\n  data:\n    bach: 2\n")
    with pytest.raises(RecipeError, match=r"data.bach"):
        load_recipe(bad_override)


def test_network_is_built_from_the_typed_config() -> None:
    model = build_model(load_recipe(DEBLUR / "config.yaml").model)
    assert model.noise_map is not None and model.size_multiple == 8 and model.input_channels == 1
    assert sum(p.numel() for p in model.parameters()) == 389793  # the bundled deblur.json's count


def test_detector_recipe_loads_typed_with_the_frozen_values(tmp_path: Path) -> None:
    recipe = load_detector_recipe(DETECTOR)
    assert recipe.as_dict() == FROZEN_DETECTOR
    assert build_blurnet(recipe.model)(__import__("torch").zeros(2, 1, 64, 64)).shape == (2, 5)
    typo = tmp_path / "typo.yaml"
    typo.write_text(DETECTOR.read_text().replace("p_sharp:", "p_sharpp:"))
    with pytest.raises(ValueError, match=r"data.p_sharpp"):
        load_detector_recipe(typo)


def test_membrane_recipe_loads_typed(tmp_path: Path) -> None:
    from models.membrane.train import load_config

    recipe = Path(__file__).resolve().parents[2] / "models" / "membrane" / "config.yaml"
    assert load_config(recipe).run_name == "unet-w16-d3"
    typo = tmp_path / "typo.yaml"
    typo.write_text(recipe.read_text().replace("dice_weight:", "dise_weight:"))
    with pytest.raises(ValueError, match="dise_weight"):
        load_config(typo)
