"""Training and validation pairs for the deblur model: real ISBI EM blurred by `models.blur_synth`.

Each pair is (blurred, sharp) on the model scale of `appliance.restoration.intensity` (float32 (1, P, P)), the
intensity window taken from the blurred patch exactly as the runtime takes it from a tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from appliance.restoration.intensity import intensity_window, to_model_scale
from models.blur_synth import load_image, load_split, sample_blur, synthesize, to_unit_float


def load_images(split: str) -> list[np.ndarray]:
    """All uint8 images (H, W) of one split of isbi2012-train ("train" | "val" | "test")."""
    return [load_image(path) for path in load_split(split)]  # type: ignore[arg-type]


def augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random rotation by a multiple of 90 degrees and mirror: EM sections have no preferred axis."""
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def make_pair(
    images: Sequence[np.ndarray],
    rng: np.random.Generator,
    patch: int,
    margin: int,
    families: Sequence[str],
    sigma_range: tuple[float, float],
    sharp_fraction: float,
    uint16_fraction: float,
    noise_free_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One random (blurred, sharp) pair, float32 (1, patch, patch) each, on the model scale."""
    image = images[int(rng.integers(len(images)))]
    side = patch + 2 * margin
    y = int(rng.integers(image.shape[0] - side + 1))
    x = int(rng.integers(image.shape[1] - side + 1))
    crop = augment(image[y : y + side, x : x + side], rng)
    params = None
    if rng.random() >= sharp_fraction:
        params = sample_blur(rng, str(rng.choice(list(families))), sigma_range)
    dtype = np.uint16 if rng.random() < uint16_fraction else np.uint8
    # Noise-free examples (quantisation only) only when asked: earlier stages' streams stay as they were.
    noise = not (noise_free_fraction > 0.0 and rng.random() < noise_free_fraction)
    blurred = synthesize(crop, params, rng, noise=noise, dtype=dtype)[margin:-margin, margin:-margin]
    sharp = to_unit_float(crop)[margin:-margin, margin:-margin] * float(np.iinfo(dtype).max)
    window = intensity_window(blurred)
    return to_model_scale(blurred, window)[None], to_model_scale(sharp, window)[None]


def make_batch(images: Sequence[np.ndarray], rng: np.random.Generator, batch: int, **kwargs) -> tuple:
    """`batch` pairs stacked: float32 (B, 1, P, P) blurred and sharp."""
    pairs = [make_pair(images, rng, **kwargs) for _ in range(batch)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
