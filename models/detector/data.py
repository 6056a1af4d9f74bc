"""Training patches for the blur detector: real EM + models.blur_synth, with labels per patch.

Each rendering takes one training image, applies a random dihedral flip, a downscale (other pixel
sizes), a contrast/brightness change (dark, bright, faint content) or replaces it by nearly blank resin,
then blurs it with a random family (or not), adds Poisson-Gaussian noise, quantises to 8 or 16 bit and
cuts PATCH x PATCH patches. Labels are the blur at each patch's centre (the tilted family varies).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from appliance.detection.patches import PATCH
from appliance.pixels import tilted_sigma_map
from models.blur_synth import (
    BlurParams,
    load_image,
    load_split,
    quantize,
    sample_blur,
    synthesize,
    to_unit_float,
)
from models.content_synth import random_content
from models.detector.corpus import ISBI_SOURCE, RealRenderConfig, RealTile, corpus_sources, render_real, same_source
from models.detector.recipe import PatchDataConfig


@dataclass(frozen=True)
class PatchSet:
    """patches: uint16 (N, PATCH, PATCH) on the 16-bit scale; labels per patch (N,)."""

    patches: np.ndarray
    sigma: np.ndarray  # px, major axis, local
    anisotropy: np.ndarray
    angle_deg: np.ndarray
    astigmatic: np.ndarray  # bool: angle/anisotropy labels are meaningful

    def as_unit_float(self) -> np.ndarray:
        return self.patches.astype(np.float32) / 65535.0


def _augment_content(image: np.ndarray, rng: np.random.Generator, cfg: PatchDataConfig) -> np.ndarray:
    """Float [0, 1] image -> flipped, downscaled, contrast/brightness-changed or blanked copy."""
    image = np.rot90(image, int(rng.integers(4)))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    scale = rng.uniform(*cfg.scale_range)
    if scale < 0.99:
        size = max(PATCH * 2, int(round(image.shape[0] * scale)))
        image = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_AREA)
    level = rng.uniform(0.05, 0.95)
    if rng.random() < cfg.p_blank:
        # Blank resin / empty field: a faint, smooth background with no structure to focus on.
        field = cv2.GaussianBlur(rng.normal(0, 1, image.shape).astype(np.float32), (0, 0), 40.0)
        return np.clip(level + 0.5 * field / (np.abs(field).max() + 1e-6) * rng.uniform(0, 0.05), 0, 1)
    lo, hi = cfg.contrast_range
    contrast = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    out = level + contrast * (image - image.mean())
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def cut_patches(tile: np.ndarray, params: BlurParams | None, n: int, rng: np.random.Generator) -> PatchSet:
    """n random PATCH x PATCH patches of a uint16-scale tile, labelled with the blur at each patch centre."""
    h, w = tile.shape
    ys = rng.integers(0, h - PATCH + 1, n)
    xs = rng.integers(0, w - PATCH + 1, n)
    offs = np.arange(PATCH)
    patches = tile[ys[:, None, None] + offs[None, :, None], xs[:, None, None] + offs[None, None, :]]
    if params is None:
        sigma, aniso, angle, astig = np.zeros(n), np.ones(n), np.zeros(n), np.zeros(n, bool)
    elif params.family == "tilted":
        sigma_map = tilted_sigma_map(tile.shape, params.sigma_px, params.angle_deg)
        sigma = sigma_map[ys + PATCH // 2, xs + PATCH // 2].astype(np.float64)
        aniso, angle, astig = np.ones(n), np.zeros(n), np.zeros(n, bool)
    else:
        sigma = np.full(n, params.sigma_px)
        aniso = np.full(n, params.anisotropy)
        angle = np.full(n, params.angle_deg)
        astig = np.full(n, params.family == "astigmatic")
    return PatchSet(patches, sigma, aniso, angle, astig)


def render_patches(sharp: np.ndarray, rng: np.random.Generator, cfg: PatchDataConfig) -> PatchSet:
    """One rendering of one sharp ISBI image (synthetic noise) -> cfg.patches_per_image labelled patches."""
    content = _augment_content(to_unit_float(sharp), rng, cfg)
    if cfg.p_content and rng.random() < cfg.p_content:
        content = random_content(content, rng)
    params: BlurParams | None = None
    if rng.random() >= cfg.p_sharp:
        params = sample_blur(rng, sigma_range=tuple(cfg.sigma_range))
    dtype = np.uint16 if rng.random() < cfg.p_uint16 else np.uint8
    tile = synthesize(quantize(content, np.uint16), params, rng, noise=True, dtype=dtype)
    if tile.dtype == np.uint8:
        tile = tile.astype(np.uint16) * 257  # one scale for storage; the net sees [0, 1] either way
    return cut_patches(tile, params, cfg.patches_per_image, rng)


def render_real_patches(tile: RealTile, rng: np.random.Generator, cfg: PatchDataConfig) -> PatchSet:
    """One rendering of a real em-corpus tile (its own noise, models/detector/corpus.py) -> labelled patches."""
    assert cfg.corpus is not None
    c = cfg.corpus
    render_cfg = RealRenderConfig(
        crop_px=c.crop_px,
        scale_range=(c.scale_range[0], c.scale_range[1]),
        p_scale=c.p_scale,
        contrast_range=(c.contrast_range[0], c.contrast_range[1]),
        p_content=cfg.p_content,
        p_sharp=cfg.p_sharp,
        sigma_range=(cfg.sigma_range[0], cfg.sigma_range[1]),
        noise_gain_range=(c.noise_gain_range[0], c.noise_gain_range[1]),
    )
    rendered, params = render_real(tile, rng, render_cfg)
    return cut_patches(rendered, params, cfg.patches_per_image, rng)


def build_patch_set(
    split: str, renderings: int, seed: int, cfg: PatchDataConfig, holdout: str | None = None
) -> PatchSet:
    """`renderings` renderings, each seeded by (seed, index), never of the `holdout` source.

    ISBI renderings cycle over the split's images; with a `corpus` section, a share of renderings comes
    from real em-corpus tiles instead (source uniform, then tile uniform: a one-image source weighs as
    much as a 21-tile one). The em-corpus has no val split of its own: val renderings of it are other
    crops of the same training tiles (they choose the epoch, they never test).
    """
    use_isbi = holdout is None or not same_source(holdout, ISBI_SOURCE)
    images = [load_image(p) for p in load_split(split)] if use_isbi else []  # type: ignore[arg-type]
    sources = corpus_sources(holdout=holdout) if cfg.corpus is not None else []
    if not images and not sources:
        raise ValueError("build_patch_set: nothing to render (ISBI held out and no corpus section)")
    parts = []
    for i in range(renderings):
        rng = np.random.default_rng([seed, i])
        share = cfg.corpus.share if cfg.corpus is not None and images else 1.0
        if sources and rng.random() < share:
            source = sources[int(rng.integers(len(sources)))]
            parts.append(render_real_patches(source.tiles[int(rng.integers(len(source.tiles)))], rng, cfg))
        else:
            parts.append(render_patches(images[i % len(images)], rng, cfg))
    return PatchSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in PatchSet.__dataclass_fields__))


def cached_patch_set(
    split: str, renderings: int, seed: int, cfg: PatchDataConfig, cache_dir: Path, holdout: str | None = None
) -> PatchSet:
    """build_patch_set, cached as .npz in cache_dir (rebuilding takes minutes on 2 cores)."""
    digest = hashlib.sha1(repr(sorted(cfg.model_dump().items())).encode()).hexdigest()[:10]
    key = f"{split}-{renderings}-{seed}-{digest}-{holdout or 'all'}.npz"
    path = cache_dir / key
    if path.is_file():
        with np.load(path) as z:
            return PatchSet(*(z[f] for f in PatchSet.__dataclass_fields__))
    data = build_patch_set(split, renderings, seed, cfg, holdout)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f: getattr(data, f) for f in PatchSet.__dataclass_fields__})
    return data
