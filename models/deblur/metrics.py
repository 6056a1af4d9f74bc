"""Image-quality metrics for restoration (numpy in, float out): SSIM against a ground truth (PSNR:
appliance.pixels.psnr_db, which the runtime's rig blend measurement uses too)."""

from __future__ import annotations

import cv2
import numpy as np


def ssim(image: np.ndarray, truth: np.ndarray, peak: float) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03) of two 2-D images."""
    x = np.asarray(image, np.float64)
    y = np.asarray(truth, np.float64)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT_101)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())
