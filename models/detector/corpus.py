"""Real EM of many instruments for the blur detector's training, split by source (issue 14 point 4).

Sources: the isbi2012-train split (one ssTEM volume) and every folder of ../shared/data/em-corpus
(their `soft/` tiles are never training targets). A leave-one-source-out fold trains without one source
(`holdout`) and is tested on it by `bench/detector_sources.py --loso`.

A rendering of a real tile keeps that instrument's look: its own noise, dtype, contrast and native
sharpness. Native = in focus = label 0; a blurred rendering is labelled with the blur *added*.
Steps: random crop, dihedral flip, optional area downscale (another pixel size), optional mild
contrast change, optional non-blur content (models/content_synth.py), optional blur (any family),
then Gaussian noise so the tile carries its rig's noise level (times a random gain), quantised back to
the tile's own dtype. The noise level is the tile's Immerkaer estimate, as `bench/detector_sources.py`
uses for its blurred tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from appliance.detection.patches import PATCH
from appliance.noise import image_noise_sigma
from appliance.tile_io import read_tile
from models.blur_synth import REPO_ROOT, BlurParams, apply_blur, quantize, sample_blur, to_unit_float

CORPUS_DIR = REPO_ROOT.parent / "shared" / "data" / "em-corpus"
ISBI_SOURCE = "isbi2012-train"  # the bench calls its held-out split "isbi2012-train_test": same source


@dataclass(frozen=True)
class RealTile:
    """One in-focus tile of a source: native pixels and its noise sigma (fraction of the dtype range)."""

    name: str
    pixels: np.ndarray
    noise: float


@dataclass(frozen=True)
class TrainingSource:
    name: str
    tiles: tuple[RealTile, ...]


def same_source(a: str, b: str) -> bool:
    """Source names match; the ISBI volume's splits are one source."""
    return a == b or (a.startswith(ISBI_SOURCE) and b.startswith(ISBI_SOURCE))


def corpus_sources(corpus: Path = CORPUS_DIR, holdout: str | None = None) -> list[TrainingSource]:
    """Every em-corpus folder's in-focus tiles except `holdout`'s; clear error if the corpus is missing."""
    if not corpus.is_dir():
        raise FileNotFoundError(f"{corpus}: em-corpus folder not found (expected ../shared/data/em-corpus)")
    out = []
    for folder in sorted(p for p in corpus.iterdir() if p.is_dir()):
        if holdout is not None and same_source(folder.name, holdout):
            continue
        files = sorted(p for p in folder.glob("*.png") if p.name != "contact.png")
        tiles = []
        for path in files:
            pixels = read_tile(path)
            tiles.append(RealTile(path.name, pixels, image_noise_sigma(to_unit_float(pixels))))
        if tiles:
            out.append(TrainingSource(folder.name, tuple(tiles)))
    if not out:
        raise ValueError(f"{corpus}: no source left to train on (holdout={holdout!r})")
    return out


def _crop(pixels: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    h, w = pixels.shape
    sh, sw = min(side, h), min(side, w)
    y, x = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
    return pixels[y : y + sh, x : x + sw]


@dataclass(frozen=True)
class RealRenderConfig:
    """How a real tile is rendered; the values come from the recipe's `data.corpus` section."""

    crop_px: int
    scale_range: tuple[float, float]
    p_scale: float
    contrast_range: tuple[float, float]
    p_content: float
    p_sharp: float
    sigma_range: tuple[float, float]
    noise_gain_range: tuple[float, float]


def render_real(
    tile: RealTile, rng: np.random.Generator, cfg: RealRenderConfig
) -> tuple[np.ndarray, BlurParams | None]:
    """One rendering of a real in-focus tile -> (uint16-scale tile, blur or None)."""
    from models.content_synth import random_content  # keeps the module import light

    scale = rng.uniform(*cfg.scale_range) if rng.random() < cfg.p_scale else 1.0
    raw = _crop(tile.pixels, int(math.ceil(cfg.crop_px / scale)), rng)
    image = to_unit_float(raw)
    image = np.rot90(image, int(rng.integers(4)))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = np.ascontiguousarray(image, dtype=np.float32)
    noise = tile.noise
    if scale < 0.99:
        size = (max(PATCH, round(image.shape[1] * scale)), max(PATCH, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    contrast = math.exp(rng.uniform(*np.log(cfg.contrast_range)))
    mean = float(image.mean())
    image = np.clip(mean + contrast * (image - mean), 0.0, 1.0)
    noise *= contrast
    if rng.random() < cfg.p_content:
        image = random_content(image, rng)
    params = None if rng.random() < cfg.p_sharp else sample_blur(rng, sigma_range=cfg.sigma_range)
    if params is not None:
        image = apply_blur(image, params)
    # Back to the rig's noise (times a gain): blur and downscale removed part of it.
    target = noise * math.exp(rng.uniform(*np.log(cfg.noise_gain_range)))
    present = image_noise_sigma(image)
    extra = math.sqrt(max(target**2 - present**2, 0.0))
    if extra > 0:
        image = image + rng.normal(0.0, extra, image.shape).astype(np.float32)
    out = quantize(np.clip(image, 0.0, 1.0), raw.dtype)
    return (out.astype(np.uint16) * 257 if out.dtype == np.uint8 else out), params
