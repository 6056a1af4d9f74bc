"""The detector's warm start: the bundled ONNX's weights, loaded into BlurNet, compute what the ONNX computes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from appliance.weights import BLUR_DETECTOR_MODEL, WEIGHTS_DIR
from models.blur_synth import load_image, load_split, to_unit_float
from models.detector.loso import init_saw_holdout
from models.detector.recipe import build_blurnet, load_detector_recipe
from models.detector.warm_start import load_onnx_into, match_batch_norms, onnx_weights, warm_start

pytestmark = pytest.mark.fast

DETECTOR = Path(__file__).resolve().parents[2] / "models" / "detector"
BUNDLED = WEIGHTS_DIR / BLUR_DETECTOR_MODEL.name


def _real_patches(n: int, seed: int) -> torch.Tensor:
    """n random 64x64 patches of ISBI val images, float32 (n, 1, 64, 64) in [0, 1]."""
    rng = np.random.default_rng(seed)
    images = [to_unit_float(load_image(p)) for p in load_split("val")]
    out = []
    for _ in range(n):
        image = images[int(rng.integers(len(images)))]
        y, x = rng.integers(0, image.shape[0] - 64, 2)
        out.append(image[y : y + 64, x : x + 64])
    return torch.from_numpy(np.stack(out)[:, None].copy())


def _bundled_blurnet() -> torch.nn.Module:
    return build_blurnet(load_detector_recipe(DETECTOR / "corpus_finetune.yaml").model)


def test_the_loaded_weights_are_the_onnx_initializers() -> None:
    model = load_onnx_into(_bundled_blurnet(), BUNDLED)
    convs, head = onnx_weights(BUNDLED)
    for block, (weight, bias) in zip(model.features, convs, strict=True):
        conv, norm = block[0], block[1]
        assert np.array_equal(conv.weight.detach().numpy(), weight)
        # The batch norm is the folded one: it adds the ONNX's bias and nothing else (eval mode).
        scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach().numpy()
        assert np.allclose(scale, 1.0) and np.allclose((norm.bias - norm.running_mean).detach().numpy(), bias)
    state = model.state_dict()
    assert head and all(np.array_equal(state[name].numpy(), value) for name, value in head.items())


def test_the_warm_started_net_reproduces_the_onnx_on_real_patches_in_eval_and_nearly_in_train_mode() -> None:
    model = _bundled_blurnet()
    worst = warm_start(model, BUNDLED, _real_patches(256, seed=1), _real_patches(32, seed=2))
    assert worst < 1e-4
    # Batch norms matched to real patches: a training-mode forward (batch statistics) starts from v1, too.
    x = _real_patches(256, seed=3)
    model.eval()
    with torch.no_grad():
        want = model(x)
        model.train()
        got = model(x)
    assert float((got[:, 0] - want[:, 0]).abs().median()) < 0.1  # log(sigma + 0.5)


def test_identity_batch_norms_would_not_start_from_v1_in_train_mode() -> None:
    """Why match_batch_norms exists: without it, batch statistics re-normalise every layer."""
    model = load_onnx_into(_bundled_blurnet(), BUNDLED)
    x = _real_patches(256, seed=3)
    model.eval()
    with torch.no_grad():
        want = model(x)
        raw = copy.deepcopy(model).train()(x)
        matched = match_batch_norms(model, x).train()(x)
    err = lambda out: float((out[:, 0] - want[:, 0]).abs().median())  # noqa: E731
    assert err(raw) > 3 * err(matched)


def test_only_the_isbi_fold_is_marked_as_seen_by_v1() -> None:
    recipe = DETECTOR / "corpus_finetune.yaml"
    assert load_detector_recipe(recipe).init_from_onnx == "appliance/weights/blur_detector.onnx"
    assert init_saw_holdout(recipe, "isbi2012-train_test")
    assert not init_saw_holdout(recipe, "neubias_training_em")
    assert not init_saw_holdout(DETECTOR / "corpus.yaml", "isbi2012-train_test")  # from scratch: nothing seen


def test_the_finetune_recipe_is_the_corpus_recipe_plus_its_overrides() -> None:
    warm, scratch = (load_detector_recipe(DETECTOR / name) for name in ("corpus_finetune.yaml", "corpus.yaml"))
    assert (warm.seed, warm.data, warm.model) == (scratch.seed, scratch.data, scratch.model)  # same renderings
    assert (warm.train.epochs, warm.train.lr, scratch.init_from_onnx) == (3, 0.001, None)
    assert "init_from_onnx" not in scratch.as_dict() and warm.as_dict()["init_from_onnx"] == warm.init_from_onnx


@pytest.mark.parametrize(
    ("name", "changed"),
    [
        ("corpus_finetune_selerr.yaml", {"select_by": "mean_abs_err_log_sigma"}),
        ("corpus_finetune_lowlr.yaml", {"select_by": "mean_abs_err_log_sigma", "lr": 0.0003}),
    ],
)
def test_a_finetune_variant_changes_only_its_named_train_fields(name: str, changed: dict) -> None:
    base, variant = (load_detector_recipe(DETECTOR / n) for n in ("corpus_finetune.yaml", name))
    assert base.train.select_by == "loss"
    assert {k: getattr(variant.train, k) for k in changed} == changed
    assert variant.train.model_copy(update={k: getattr(base.train, k) for k in changed}) == base.train
    same = ("data", "model", "seed", "init_from_onnx")
    assert [getattr(variant, k) for k in same] == [getattr(base, k) for k in same]  # same renderings, same init


def test_an_unknown_selection_metric_is_refused_naming_the_field(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"extends: {DETECTOR / 'corpus_finetune.yaml'}\ntrain:\n  select_by: val_auroc\n")
    with pytest.raises(ValueError, match=r"typo.yaml: invalid recipe: train.select_by: Input should be 'loss'"):
        load_detector_recipe(typo)
