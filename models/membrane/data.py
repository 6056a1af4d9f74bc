"""Training and validation examples for the membrane segmenter: ISBI 2012 images and their membrane labels.

An example is (pixels, membrane) as float32 (1, P, P) each: pixels on the model scale of
`appliance.restoration.intensity` (window from the pixels themselves, as `score.segment` does at inference),
membrane 1.0 where the label is black. Most examples are the in-focus images as they are; a share are
noisy copies and mildly blurred noisy copies (`models.blur_synth`), so that the segmenter does not call
a slightly soft membrane background. Splits are blur_synth.SPLITS; the test split is never read here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.restoration.intensity import intensity_window, to_model_scale
from models.blur_synth import DATA_DIR, BlurParams, load_image, load_split, sample_blur, synthesize
from models.deblur.data import augment

# ISBI2012_LABELS_DIR lets CI point at a copy elsewhere; default: the folder beside the images.
LABELS_DIR = Path(os.environ.get("ISBI2012_LABELS_DIR", DATA_DIR.with_name(DATA_DIR.name + "-labels")))
# Labels are 0 (membrane) / 255 (cell interior); anything darker than mid-grey counts as membrane.
MEMBRANE_BELOW = 128


@dataclass(frozen=True)
class LabelledImage:
    """One dataset slice: uint8 pixels (H, W) and its membrane mask, bool (H, W)."""

    pixels: np.ndarray
    membrane: np.ndarray


@dataclass(frozen=True)
class Degradation:
    """How the training stream mixes in-focus images with degraded copies (see config.yaml `data:`)."""

    noisy_fraction: float  # noise only (a retake's look)
    blurred_fraction: float  # blur then noise; the rest stays in focus and noise-free
    families: tuple[str, ...]
    sigma_range: tuple[float, float]  # px, log-uniform
    gain_range: tuple[float, float]  # intensity jitter on the model scale: x * gain + offset, after gamma
    offset_range: tuple[float, float]
    gamma_range: tuple[float, float]


def membrane_mask(label_pixels: np.ndarray) -> np.ndarray:
    """ISBI label image (H, W), black = membrane -> bool (H, W), True on membrane."""
    return np.asarray(label_pixels) < MEMBRANE_BELOW


def label_path(image_path: Path) -> Path:
    """The label file of a dataset image (same file name in LABELS_DIR); checks it exists."""
    path = LABELS_DIR / image_path.name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: membrane label of {image_path} missing (set ISBI2012_LABELS_DIR)")
    return path


def load_labelled(split: str) -> list[LabelledImage]:
    """Every image of one split ("train" | "val" | "test") with its membrane mask."""
    return [
        LabelledImage(load_image(path), membrane_mask(load_image(label_path(path))))
        for path in load_split(split)  # type: ignore[arg-type]
    ]


def network_input(pixels: np.ndarray) -> np.ndarray:
    """uint8/uint16 tile (H, W) -> float32 (H, W) on the model scale (its own 0.1-99.9 % window -> [0, 1])."""
    return to_model_scale(pixels, intensity_window(pixels))


def jitter(scaled: np.ndarray, rng: np.random.Generator, degradation: Degradation) -> np.ndarray:
    """Mild contrast change on model-scale pixels: gamma on [0, 1], then gain and offset."""
    gamma = math.exp(rng.uniform(*np.log(degradation.gamma_range)))
    out = np.clip(scaled, 0.0, 1.0) ** gamma
    return (out * rng.uniform(*degradation.gain_range) + rng.uniform(*degradation.offset_range)).astype(np.float32)


def degrade(crop: np.ndarray, rng: np.random.Generator, degradation: Degradation) -> np.ndarray:
    """uint8 crop -> the same crop in focus, noisy, or blurred and noisy (uint8), drawn per the fractions."""
    draw = rng.random()
    if draw < degradation.noisy_fraction:
        return synthesize(crop, None, rng)
    if draw < degradation.noisy_fraction + degradation.blurred_fraction:
        family = str(rng.choice(list(degradation.families)))
        return synthesize(crop, sample_blur(rng, family, degradation.sigma_range), rng)
    return crop


def make_example(
    images: Sequence[LabelledImage], rng: np.random.Generator, patch: int, margin: int, degradation: Degradation
) -> tuple[np.ndarray, np.ndarray]:
    """One random (pixels, membrane) example, float32 (1, patch, patch) each.

    The crop is `margin` px larger on each side while it is blurred, so its borders blur like a tile's.
    """
    image = images[int(rng.integers(len(images)))]
    side = patch + 2 * margin
    y = int(rng.integers(image.pixels.shape[0] - side + 1))
    x = int(rng.integers(image.pixels.shape[1] - side + 1))
    window = (slice(y, y + side), slice(x, x + side))
    # Stacked so that one rotation/mirror draw moves pixels and label together.
    both = augment(np.stack([image.pixels[window], image.membrane[window].astype(np.uint8)], axis=-1), rng)
    inner = (slice(margin, margin + patch), slice(margin, margin + patch))
    pixels = degrade(np.ascontiguousarray(both[..., 0]), rng, degradation)[inner]
    scaled = jitter(network_input(pixels), rng, degradation)
    return scaled[None], both[..., 1][inner].astype(np.float32)[None]


def make_batch(
    images: Sequence[LabelledImage],
    rng: np.random.Generator,
    batch: int,
    patch: int,
    margin: int,
    degradation: Degradation,
) -> tuple[np.ndarray, np.ndarray]:
    """`batch` examples stacked: float32 (B, 1, P, P) pixels and membrane."""
    pairs = [make_example(images, rng, patch, margin, degradation) for _ in range(batch)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def validation_views(
    images: Sequence[LabelledImage], seed: int, sigma_px: float
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Fixed validation set: each image in focus, noisy, and Gaussian-blurred by `sigma_px` + noise.

    Returns (name, uint8 pixels (H, W), membrane bool (H, W)) triples; the draws depend only on `seed`.
    """
    rng = np.random.default_rng(seed)
    views = []
    for index, image in enumerate(images):
        views.append((f"{index}/in_focus", image.pixels, image.membrane))
        views.append((f"{index}/noisy", synthesize(image.pixels, None, rng), image.membrane))
        blurred = synthesize(image.pixels, BlurParams("gaussian", sigma_px), rng)
        views.append((f"{index}/blurred", blurred, image.membrane))
    return views
