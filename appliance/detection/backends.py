"""Patch backends of the blur detector: per patch a blur sigma (px) and a reliability weight.

- `OnnxBackend`: the learned patch CNN (models/detector) in ONNX Runtime, CUDA provider when available;
- `ClassicalBackend`: re-blur gradient ratio (Zhuo & Sim 2011), no learning.
Each reads its sidecar (`appliance.sidecar.DetectorSidecar`): version, patch size, the sigma calibration
table and the PSF-shape constant, all written by the scripts in models/detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from appliance.detection.patches import PATCH
from appliance.noise import patch_noise_sigma
from appliance.onnx_session import open_session
from appliance.sidecar import DetectorSidecar, SidecarError
from appliance.weights import CLASSICAL_DETECTOR_SIDECAR


@dataclass(frozen=True)
class PatchEstimates:
    """Per-patch output of a backend; all arrays have shape (N,)."""

    sigma_px: np.ndarray  # Gaussian-equivalent blur sigma (major axis), px
    weight: np.ndarray  # reliability >= 0 (0 = says nothing about focus)


class PatchBackend(Protocol):
    model_version: str
    intrinsic_c2: float | None  # the PSF-shape constant of the backend's sidecar (px^2); None = not calibrated
    local_window_scale: float  # the sidecar's tile-over-patch-mean sigma ratio (1.0 where it has none)

    def estimate(self, patches: np.ndarray) -> PatchEstimates:
        """patches: float32 (N, PATCH, PATCH) scaled to [0, 1] by the tile's dtype range."""
        ...


def _check_patch(sidecar: DetectorSidecar, path: Path) -> None:
    if sidecar.patch != PATCH:
        raise SidecarError(f"{path}: backend expects {sidecar.patch} px patches, runtime cuts {PATCH}")


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    return np.hypot(cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3))


def _presmoothed_noise_gain() -> float:
    delta = np.zeros((15, 15), np.float32)
    delta[7, 7] = 1.0
    response = cv2.Sobel(cv2.GaussianBlur(delta, (0, 0), 0.7), cv2.CV_32F, 1, 0, ksize=3)
    return float(np.sqrt((response**2).sum()))


REBLUR_SIGMA_PX = 2.0
_NOISE_GAIN = _presmoothed_noise_gain()


def reblur_sigma(patch: np.ndarray) -> tuple[float, float]:
    """Uncalibrated re-blur sigma (px) of one float patch (H, W) and its weight (0 = no usable edges).

    For an edge blurred by sigma, the ratio R = |grad I| / |grad (I * G_r)| = sqrt(sigma^2 + r^2) / sigma,
    so sigma = r / sqrt(R^2 - 1). The edge threshold keeps noise from posing as sharp detail.
    """
    noise = float(patch_noise_sigma(patch[None])[0])
    smooth = cv2.GaussianBlur(patch, (0, 0), 0.7)
    g0 = _gradient_magnitude(smooth)
    g1 = _gradient_magnitude(cv2.GaussianBlur(smooth, (0, 0), REBLUR_SIGMA_PX))
    edges = g0 >= max(float(np.quantile(g0, 0.9)), 4.0 * noise * _NOISE_GAIN)
    if edges.mean() < 0.01:
        return 0.0, 0.0
    ratio = max(float(g0[edges].sum() / max(g1[edges].sum(), 1e-12)), 1.0001)
    return REBLUR_SIGMA_PX / math.sqrt(ratio * ratio - 1.0), 1.0


class ClassicalBackend:
    """Re-blur gradient ratio per patch, mapped to true sigma by the sidecar's table.

    The raw value includes the images' own blur and the pre-smoothing, and stops rising beyond ~2 px (few
    edges survive the noise threshold): the table clamps there, and strong blur relies on "not judgeable"
    (no edges left). Patches without edges clearly above the noise get weight 0.
    """

    def __init__(self, sidecar_path: Path = CLASSICAL_DETECTOR_SIDECAR) -> None:
        sidecar = DetectorSidecar.load(sidecar_path)
        _check_patch(sidecar, sidecar_path)
        self.intrinsic_c2 = sidecar.intrinsic_c2
        self.local_window_scale = sidecar.local_window_scale or 1.0
        if sidecar.sigma_calibration is None:
            raise SidecarError(f"{sidecar_path}: no sigma_calibration; {DetectorSidecar.rewrite_hint}")
        self._calibration = sidecar.sigma_calibration
        self.model_version = sidecar.model_version

    def estimate(self, patches: np.ndarray) -> PatchEstimates:
        raw, weight = np.zeros(len(patches)), np.zeros(len(patches))
        for k, patch in enumerate(patches):
            raw[k], weight[k] = reblur_sigma(patch)
        return PatchEstimates(self._calibration.apply(raw), weight)


class OnnxBackend:
    """The learned patch CNN (models/detector) run by ONNX Runtime; CUDA when available, else CPU.

    Model contract (its sidecar, written by models/detector/export.py): input `patches` float32
    (N, 1, PATCH, PATCH) in [0, 1]; output float32 (N, 5) = [log(sigma + log_offset), log variance of
    that, log anisotropy, cos 2 angle, sin 2 angle]. The last three heads are not used: the structure
    tensor (psf_shape.py) measured better on the val split.
    sidecar: use this one instead of the file's (models/detector/calibrate.py tries constants with it).
    """

    def __init__(self, model_path: Path, intra_op_threads: int = 0, sidecar: DetectorSidecar | None = None) -> None:
        sidecar_path = model_path.with_suffix(".json")
        sidecar = sidecar if sidecar is not None else DetectorSidecar.load(sidecar_path)
        _check_patch(sidecar, sidecar_path)
        self.intrinsic_c2 = sidecar.intrinsic_c2
        self.local_window_scale = sidecar.local_window_scale or 1.0
        if sidecar.log_offset is None:
            raise SidecarError(f"{sidecar_path}: no log_offset; {DetectorSidecar.rewrite_hint}")
        self._log_offset = sidecar.log_offset
        self._calibration = sidecar.sigma_calibration  # None only while calibrate measures the raw network
        self.model_version = sidecar.model_version
        self.session = open_session(model_path, intra_op_threads)
        self.providers = self.session.get_providers()
        self._input = self.session.get_inputs()[0].name

    def estimate(self, patches: np.ndarray) -> PatchEstimates:
        out = self.session.run(None, {self._input: patches[:, None, :, :].astype(np.float32, copy=False)})[0]
        out = out.astype(np.float64)
        sigma = np.maximum(np.exp(out[:, 0]) - self._log_offset, 0.0)
        if self._calibration is not None:
            sigma = self._calibration.apply(sigma)
        weight = np.exp(-out[:, 1])  # inverse predicted variance of log-sigma
        return PatchEstimates(sigma, weight)
