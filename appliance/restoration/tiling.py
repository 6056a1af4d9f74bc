"""Overlap-and-blend tiled inference: run a fully convolutional model on an image of any size.

Pure numpy: the model is any callable `run_batch(patches (N, C, P, P) float32) -> (N, 1, P, P) float32`.
The image is reflect-padded by `overlap`, cut into patches (side <= P) that overlap by 2 * `overlap`, and
the outputs are blended with weights that ramp down to ~0 at each patch border, so the pixels a patch
restored with little context (next to its zero-padded border) carry little weight: no seams, and the
result matches whole-image inference within tolerance.

Extra input channels (`planes`, e.g. the PSF planes of `appliance.restoration.psf_planes`) are per-pixel functions
of the position in the image: they are padded and cut exactly like the pixels, so each patch sees the
values the whole image would have there (C = 1 + len(planes)).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

BatchFn = Callable[[np.ndarray], np.ndarray]


def patch_starts(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets of patches of `patch` px covering `length` px with at most `stride` between starts."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch, stride))
    starts.append(length - patch)  # the last patch ends exactly at the border
    return starts


def _ramp(length: int, overlap: int) -> np.ndarray:
    ramp = np.ones(length, dtype=np.float64)
    if overlap > 0:
        # Neighbouring patches share 2 * overlap px; over that band one patch's weight rises as the
        # other's falls (raised cosine, they sum to 1), so the pixels a patch saw near its own border,
        # with little context, count least. Starts just above 0: every pixel keeps a positive weight.
        band = 2 * overlap
        t = (np.arange(band) + 0.5) / band
        edge = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:band] = edge
        ramp[length - band :] = edge[::-1]
    return ramp


def blend_window(height: int, width: int, overlap: int) -> np.ndarray:
    """(height, width) float32 weights: raised-cosine ramp over 2 * `overlap` px at each border."""
    return np.outer(_ramp(height, overlap), _ramp(width, overlap)).astype(np.float32)


def run_tiled(
    image: np.ndarray,
    run_batch: BatchFn,
    patch: int,
    overlap: int,
    batch_size: int,
    multiple: int = 1,
    planes: np.ndarray | None = None,
) -> np.ndarray:
    """Apply `run_batch` to a float32 (H, W) image of any size by overlapping patches; float32 (H, W) out.

    patch: patch side P (px, a multiple of `multiple`); overlap: context margin (px) on each side, < P/4;
    batch_size: patches per `run_batch` call; multiple: the network's size constraint (2^levels);
    planes: optional float32 (K, H, W) channels fed beside the pixels (patches are (N, 1 + K, P, P)).
    """
    if image.ndim != 2:
        raise ValueError(f"run_tiled: expected a 2-D image, got shape {image.shape}")
    if planes is not None and (planes.ndim != 3 or planes.shape[1:] != image.shape):
        raise ValueError(f"run_tiled: planes of shape {planes.shape} for an image of shape {image.shape}")
    if patch % multiple or patch <= 4 * overlap:
        raise ValueError(f"run_tiled: patch {patch} must be a multiple of {multiple} and > 4 * overlap {overlap}")
    height, width = image.shape
    patch_h = _patch_side(height, patch, overlap, multiple)
    patch_w = _patch_side(width, patch, overlap, multiple)
    pad_bottom = max(0, patch_h - (height + 2 * overlap))
    pad_right = max(0, patch_w - (width + 2 * overlap))
    channels = [image] if planes is None else [image, *planes]
    padded = np.stack([_reflect_pad(c, overlap, overlap + pad_bottom, overlap, overlap + pad_right) for c in channels])
    ph, pw = padded.shape[1:]
    window = blend_window(patch_h, patch_w, overlap)
    accum = np.zeros((ph, pw), dtype=np.float32)
    weight = np.zeros((ph, pw), dtype=np.float32)
    positions = [
        (y, x)
        for y in patch_starts(ph, patch_h, patch_h - 2 * overlap)
        for x in patch_starts(pw, patch_w, patch_w - 2 * overlap)
    ]
    for first in range(0, len(positions), batch_size):
        chunk = positions[first : first + batch_size]
        batch = np.stack([padded[:, y : y + patch_h, x : x + patch_w] for y, x in chunk])
        out = run_batch(np.ascontiguousarray(batch, dtype=np.float32))
        if out.shape != (len(chunk), 1, patch_h, patch_w):
            raise RuntimeError(f"run_tiled: model returned shape {out.shape} for input {batch.shape}")
        for (y, x), restored in zip(chunk, out[:, 0], strict=True):
            accum[y : y + patch_h, x : x + patch_w] += restored * window
            weight[y : y + patch_h, x : x + patch_w] += window
    result = accum / weight
    return result[overlap : overlap + height, overlap : overlap + width]


def _patch_side(length: int, patch: int, overlap: int, multiple: int) -> int:
    """Smallest patch side <= `patch` that covers `length` px in as few patches as `patch` allows.

    A fixed side would waste work: a 512 px tile with 32 px context needs 576 px, i.e. four 512 px
    patches, where one 576 px patch (or, capped at 512, two 320 px ones per axis) does.
    """
    count = max(1, -(-length // (patch - 2 * overlap)))
    return min(patch, _round_up(-(-length // count) + 2 * overlap, multiple))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _reflect_pad(image: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """Reflect padding that also works when a pad is wider than the image (repeats the reflection)."""
    out = np.asarray(image, dtype=np.float32)
    while top or bottom or left or right:
        h, w = out.shape
        t, b = min(top, h - 1), min(bottom, h - 1)
        left_now, right_now = min(left, w - 1), min(right, w - 1)
        out = np.asarray(cv2.copyMakeBorder(out, t, b, left_now, right_now, cv2.BORDER_REFLECT_101))
        top, bottom, left, right = top - t, bottom - b, left - left_now, right - right_now
    return out
