"""Task-level scoring of EM tiles: membrane probability (`segment`) and membrane F1 (`membrane_f1`).

Used by the benchmarks as F1(segment(x), segment(in_focus)) for x in {retake, blurred input, restored}:
a restorer that wins PSNR by smoothing but loses membranes scores low here. Bench-only: the runtime
appliance never imports it. Weights: models/membrane/weights/membrane_unet.pt (MODEL_CARD.md), loaded
once per process, run on the CPU.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np
import torch

from appliance.restoration.tiling import run_tiled
from models.membrane.data import network_input
from models.membrane.network import MembraneUNet

WEIGHTS = Path(__file__).resolve().parent / "weights" / "membrane_unet.pt"
# Tiled inference: a 512 px slice runs as one 608 px patch, a 2400 px tile as 3 x 3 patches of ~900 px.
# With 48 px of context per side, tiled output is within 0.03 (probability) of whole-image inference
# at the seams (measured on a 1000 px tile; tests/test_membrane.py), far below what moves a 0.5 threshold.
PATCH_PX = 1024
OVERLAP_PX = 48


def load_checkpoint(path: Path) -> dict:
    """The exported checkpoint: {"model": state dict (fp16), "channels": [...], ...} (see train.export)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: membrane segmenter weights missing; train them with "
            "`python -m models.membrane.train --config models/membrane/config.yaml`"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


@cache
def load_segmenter(path: Path = WEIGHTS) -> MembraneUNet:
    """The exported network in eval mode, float32 on the CPU; loaded once per path and process."""
    checkpoint = load_checkpoint(path)
    model = MembraneUNet(checkpoint["channels"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in checkpoint["model"].items()})
    return model.eval()


def segment(pixels: np.ndarray, weights: Path = WEIGHTS) -> np.ndarray:
    """Membrane probability of a uint8/uint16 EM tile (H, W): float32 (H, W) in [0, 1].

    The tile is mapped to the model scale by its own 0.1-99.9 % intensity window (as in training), so
    8- and 16-bit tiles of any used range look alike; tiles of any size run in overlapping patches.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"segment: expected a uint8/uint16 (H, W) tile, got {pixels.dtype} {pixels.shape}")
    model = load_segmenter(weights)

    def run_batch(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.probability(torch.from_numpy(batch)).numpy()

    prob = run_tiled(network_input(pixels), run_batch, PATCH_PX, OVERLAP_PX, 1, model.size_multiple)
    return np.clip(prob, 0.0, 1.0).astype(np.float32)


def as_mask(prob_or_mask: np.ndarray, threshold: float) -> np.ndarray:
    """bool (H, W) membrane mask: a bool array as is, a probability map thresholded at `threshold` (>=)."""
    values = np.asarray(prob_or_mask)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D membrane map, got shape {values.shape}")
    return values if values.dtype == bool else values >= threshold


def near_membrane(mask: np.ndarray, tolerance_px: float) -> np.ndarray:
    """bool (H, W): pixels within `tolerance_px` (Euclidean) of a True pixel of `mask`."""
    if not mask.any():
        return np.zeros_like(mask)
    if tolerance_px <= 0:
        return mask.copy()
    # distanceTransform measures each non-zero pixel's distance to the nearest zero: membrane = 0.
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance <= tolerance_px


def membrane_f1(
    pred_prob: np.ndarray, ref_prob_or_mask: np.ndarray, threshold: float = 0.5, tolerance_px: float = 2.0
) -> float:
    """F1 of membrane pixels with a boundary tolerance, in [0, 1].

    pred_prob: float (H, W) membrane probability (or a bool mask); ref_prob_or_mask: the reference, a
    probability map (thresholded like the prediction) or a bool mask (e.g. `data.membrane_mask` of an
    ISBI label). Precision = share of predicted membrane pixels within `tolerance_px` of a reference
    membrane pixel; recall = share of reference membrane pixels within `tolerance_px` of a predicted
    one (the BSDS boundary-matching idea, with a distance transform instead of a one-to-one matching).
    tolerance_px = 0 gives plain pixel F1. A membrane shifted or thickened by a pixel or two, which is
    within the labels' own uncertainty, is not counted as an error. Both maps empty: 1.0; one empty: 0.0.
    """
    pred = as_mask(pred_prob, threshold)
    ref = as_mask(ref_prob_or_mask, threshold)
    if pred.shape != ref.shape:
        raise ValueError(f"membrane_f1: prediction {pred.shape} and reference {ref.shape} differ in shape")
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    precision = float((pred & near_membrane(ref, tolerance_px)).sum()) / float(pred.sum())
    recall = float((ref & near_membrane(pred, tolerance_px)).sum()) / float(ref.sum())
    if precision + recall == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)
