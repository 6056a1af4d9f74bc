"""Richardson–Lucy deconvolution: a benchmark baseline of the learned deblur model (numpy in, numpy out).

Not shipped in the runtime: the appliance restores with the learned model or Wiener
(`appliance.restoration.wiener`); bench/deblur_eval.py compares against both.
"""

from __future__ import annotations

import cv2
import numpy as np

from appliance.restoration.wiener import check_inputs


def richardson_lucy(
    image: np.ndarray, psf: np.ndarray, iterations: int, initial: np.ndarray | None = None
) -> np.ndarray:
    """Richardson–Lucy deconvolution (maximum likelihood under Poisson noise), `iterations` >= 1.

    image: float32 (H, W), non-negative (e.g. [0, 1]); initial: estimate to continue from (a previous
    result, to sweep iteration counts cheaply), default flat; returns float32 (H, W), non-negative.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    image, psf = check_inputs(image, psf)
    observed = np.maximum(image, 0.0)
    kernel = psf.astype(np.float32)
    kernel_flipped = np.ascontiguousarray(kernel[::-1, ::-1])
    eps = np.float32(1e-6)  # keeps the ratio finite where the estimate reaches 0
    if initial is None:
        estimate = np.full_like(observed, max(float(observed.mean()), 1e-3))
    else:
        estimate = np.asarray(initial, dtype=np.float32)
    for _ in range(iterations):
        # cv2.filter2D correlates; correlating with the flipped kernel is convolution.
        blurred = cv2.filter2D(estimate, -1, kernel_flipped, borderType=cv2.BORDER_REFLECT_101)
        ratio = observed / np.maximum(blurred, eps)
        estimate = estimate * cv2.filter2D(ratio, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    return estimate
