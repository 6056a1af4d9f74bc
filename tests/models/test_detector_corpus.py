"""The detector's em-corpus training data: content kinds, real-tile renderings, source hold-out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.noise import image_noise_sigma
from models import content_synth
from models.blur_synth import to_unit_float
from models.detector.corpus import CORPUS_DIR, RealRenderConfig, corpus_sources, render_real, same_source
from models.detector.data import build_patch_set
from models.detector.recipe import load_detector_recipe

pytestmark = pytest.mark.fast

CORPUS_RECIPE = Path(__file__).resolve().parents[2] / "models" / "detector" / "corpus.yaml"
needs_corpus = pytest.mark.skipif(not CORPUS_DIR.is_dir(), reason="../shared/data/em-corpus not present")


def _tissue() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(0.5 + 0.2 * rng.standard_normal((128, 160)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(content_synth.RANDOM_KINDS))
def test_every_content_kind_changes_the_tile_and_keeps_its_shape_and_range(kind: str) -> None:
    f = _tissue()
    out = content_synth.RANDOM_KINDS[kind](f, np.random.default_rng(1))
    assert out.shape == f.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not np.allclose(out, f)


def test_random_content_is_reproducible_from_its_generator() -> None:
    f = _tissue()
    a = content_synth.random_content(f, np.random.default_rng(5))
    b = content_synth.random_content(f, np.random.default_rng(5))
    assert np.array_equal(a, b) and a.dtype == np.float32


def test_isbi_splits_are_one_source() -> None:
    assert same_source("isbi2012-train_test", "isbi2012-train")
    assert not same_source("syconn_sbem_j0126", "isbi2012-train")


@needs_corpus
def test_the_held_out_source_is_never_loaded() -> None:
    names = {s.name for s in corpus_sources()}
    assert len(names) == 7
    held = "neubias_training_em"
    assert {s.name for s in corpus_sources(holdout=held)} == names - {held}


@needs_corpus
def test_a_sharp_rendering_keeps_the_rig_noise_and_a_blurred_one_gets_it_back() -> None:
    source = corpus_sources()[0]
    tile = source.tiles[0]
    cfg = RealRenderConfig(
        crop_px=192,
        scale_range=(1.0, 1.0),
        p_scale=0.0,
        contrast_range=(1.0, 1.0),
        p_content=0.0,
        p_sharp=1.0,
        sigma_range=(2.0, 2.0),
        noise_gain_range=(1.0, 1.0),
    )
    sharp, params = render_real(tile, np.random.default_rng(2), cfg)
    assert params is None and sharp.dtype == np.uint16 and sharp.shape == (192, 192)
    blurred, params = render_real(tile, np.random.default_rng(2), cfg.__class__(**{**cfg.__dict__, "p_sharp": 0.0}))
    assert params is not None and params.sigma_px == pytest.approx(2.0)
    native = image_noise_sigma(to_unit_float(sharp))
    again = image_noise_sigma(to_unit_float(blurred))
    assert again == pytest.approx(native, rel=0.35)  # blur removed the noise; the rendering put it back


@needs_corpus
def test_a_fold_without_isbi_renders_only_corpus_tiles() -> None:
    data = load_detector_recipe(CORPUS_RECIPE).data
    patches = build_patch_set("train", 12, seed=3, cfg=data, holdout="isbi2012-train_test")
    assert patches.patches.shape == (12 * data.patches_per_image, 64, 64)
    assert np.all(patches.sigma >= 0) and np.any(patches.sigma > 0)
    # Without the corpus there is nothing left once ISBI is held out: refused, not silently ISBI.
    with pytest.raises(ValueError, match="nothing to render"):
        build_patch_set("train", 2, seed=3, cfg=data.model_copy(update={"corpus": None}), holdout="isbi2012-train")
