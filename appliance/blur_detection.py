"""Runtime blur detector: per tile a blur score, a label, a PSF estimate and a coarse region map.

A tile is judged from patches sampled at native resolution (never downscaled: focus lives in the finest
detail): the tile is split into a GRID x GRID grid of cells and PATCH x PATCH patches are cut from each
cell. A backend estimates, for every patch, the blur sigma (px) and a reliability weight (blank resin
or noise-only patches say little about focus). The same aggregation then turns patch estimates into the
tile's verdict, so backends are interchangeable:

- region map: reliability-weighted mean of log-sigma per cell, smoothed over 3x3 cells;
- PSF shape: anisotropy and major-axis angle from the blurred patches' structure tensors (psf_shape.py);
- tile sigma (major axis): the worse of the whole-tile mean and the worst reliable region (catches a
  tilted section), times sqrt(anisotropy) (backends read an elliptical PSF's geometric-mean sigma);
- label: sigma <= sharp_sigma_px -> sharp; <= max_restorable_sigma_px -> soft; else retake (with reason);
  too little reliable structure -> retake ("not judgeable").

Backends: `onnx` (learned CNN, `appliance/weights/blur_detector.onnx`, ONNX Runtime, CUDA provider when
available) and `classical` (re-blur gradient ratio, Zhuo & Sim 2011, calibrated on the training split).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from appliance.assessment import BlurAssessment, TileLabel
from appliance.config import DetectorConfig
from appliance.onnx_session import open_session
from appliance.psf_shape import psf_shape, structure_tensors
from appliance.tile_io import check_tile_pixels

GRID = 8  # region map is GRID x GRID cells
PATCH = 64  # px, native resolution
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUNDLED_MODEL = WEIGHTS_DIR / "blur_detector.onnx"
# blur_score = tanh(sigma / SCORE_SCALE_PX): 0 = sharp, 0.32 at 1 px, 0.76 at 3 px, 0.96 at 6 px.
SCORE_SCALE_PX = 3.0
# Below this share of reliable patches (in patch-equivalents) a tile cannot be judged.
MIN_RELIABLE_FRACTION = 0.05
_LOG_OFFSET = 0.5  # sigma is averaged as log(sigma + offset) so 0 px is finite


def blur_score_from_sigma(sigma_px: float | np.ndarray) -> float | np.ndarray:
    """Map a blur sigma (px, >= 0) to the blur score in [0, 1) (0 = sharp)."""
    return np.tanh(np.maximum(sigma_px, 0.0) / SCORE_SCALE_PX)


@dataclass(frozen=True)
class PatchEstimates:
    """Per-patch output of a backend; all arrays have shape (N,)."""

    sigma_px: np.ndarray  # Gaussian-equivalent blur sigma (major axis), px
    weight: np.ndarray  # reliability >= 0 (0 = says nothing about focus)


_ESTIMATE_FIELDS = tuple(PatchEstimates.__dataclass_fields__)


class PatchBackend(Protocol):
    model_version: str

    def estimate(self, patches: np.ndarray) -> PatchEstimates:
        """patches: float32 (N, PATCH, PATCH) scaled to [0, 1] by the tile's dtype range."""
        ...


# ---------------------------------------------------------------------------------------------------
# Patch sampling


def patch_grid(shape: tuple[int, int], per_cell: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-left corners (ys, xs) of the patches of a tile of `shape` and each patch's cell index.

    Each of the GRID x GRID cells gets per_cell x per_cell patches spread evenly inside it; tiles
    smaller than GRID * PATCH get overlapping patches (the tile is padded to at least PATCH first).
    """
    h, w = max(shape[0], PATCH), max(shape[1], PATCH)
    ys, xs, cells = [], [], []
    for r in range(GRID):
        for c in range(GRID):
            for i in range(per_cell):
                for j in range(per_cell):
                    cy = (r + (i + 0.5) / per_cell) * h / GRID
                    cx = (c + (j + 0.5) / per_cell) * w / GRID
                    ys.append(min(max(int(round(cy - PATCH / 2)), 0), h - PATCH))
                    xs.append(min(max(int(round(cx - PATCH / 2)), 0), w - PATCH))
                    cells.append(r * GRID + c)
    return np.array(ys), np.array(xs), np.array(cells)


def extract_patches(tile: np.ndarray, per_cell: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Cut the patch grid out of a uint8/uint16 tile: float32 (N, PATCH, PATCH) in [0, 1], cells (N,)."""
    scale = 1.0 / float(np.iinfo(tile.dtype).max)
    if tile.shape[0] < PATCH or tile.shape[1] < PATCH:
        pad_y, pad_x = max(PATCH - tile.shape[0], 0), max(PATCH - tile.shape[1], 0)
        tile = np.pad(tile, ((0, pad_y), (0, pad_x)), mode="reflect")
    ys, xs, cells = patch_grid(tile.shape, per_cell)
    offs = np.arange(PATCH)
    patches = tile[ys[:, None, None] + offs[None, :, None], xs[:, None, None] + offs[None, None, :]]
    return patches.astype(np.float32) * np.float32(scale), cells


# ---------------------------------------------------------------------------------------------------
# Backends


_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
# Median raw re-blur estimate -> true added sigma on the training split, measured by
# `python -m models.detector.calibrate_classical`: the raw value includes the images' own blur and the
# pre-smoothing, and under-reads large blur (few edges survive the noise threshold).
# Beyond ~2 px the raw value stops rising, so the classical backend cannot tell 2 px from 6 px: it
# reports at most 2 px and relies on "not judgeable" (no edges left) for strong blur.
_CLASSICAL_RAW = np.array([0.75, 0.83, 1.07, 1.35])
_CLASSICAL_TRUE = np.array([0.0, 0.5, 1.0, 2.0])


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    return np.hypot(cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3))


def _presmoothed_noise_gain() -> float:
    delta = np.zeros((15, 15), np.float32)
    delta[7, 7] = 1.0
    response = cv2.Sobel(cv2.GaussianBlur(delta, (0, 0), 0.7), cv2.CV_32F, 1, 0, ksize=3)
    return float(np.sqrt((response**2).sum()))


class ClassicalBackend:
    """Re-blur gradient ratio per patch (no learning): sigma from |grad I| / |grad (I * G_r)| at edges.

    For an edge blurred by sigma, the ratio R = sqrt(sigma^2 + r^2) / sigma, so sigma = r / sqrt(R^2 - 1).
    Patches without edges clearly above the noise get weight 0.
    """

    model_version = "classical-reblur-v1"
    _reblur_sigma = 2.0
    _noise_gain = _presmoothed_noise_gain()

    def estimate(self, patches: np.ndarray) -> PatchEstimates:
        n = len(patches)
        sigma = np.zeros(n)
        weight = np.zeros(n)
        for k, patch in enumerate(patches):
            sigma[k], weight[k] = self._one(patch)
        return PatchEstimates(sigma, weight)

    def _one(self, patch: np.ndarray) -> tuple[float, float]:
        raw, weight = self.raw_sigma(patch)
        return float(np.interp(raw, _CLASSICAL_RAW, _CLASSICAL_TRUE)), weight

    def raw_sigma(self, patch: np.ndarray) -> tuple[float, float]:
        """Uncalibrated re-blur sigma (px) of one float patch and its weight (0 = no usable edges)."""
        # Immerkaer's noise estimate; the edge threshold keeps noise from posing as sharp detail.
        noise = float(np.abs(cv2.filter2D(patch, cv2.CV_32F, _IMMERKAER)[1:-1, 1:-1]).mean())
        noise *= math.sqrt(math.pi / 2) / 6
        smooth = cv2.GaussianBlur(patch, (0, 0), 0.7)
        g0 = _gradient_magnitude(smooth)
        g1 = _gradient_magnitude(cv2.GaussianBlur(smooth, (0, 0), self._reblur_sigma))
        edges = g0 >= max(float(np.quantile(g0, 0.9)), 4.0 * noise * self._noise_gain)
        if edges.mean() < 0.01:
            return 0.0, 0.0
        ratio = max(float(g0[edges].sum() / max(g1[edges].sum(), 1e-12)), 1.0001)
        return self._reblur_sigma / math.sqrt(ratio * ratio - 1.0), 1.0


def calibrate_sigma(sigma: np.ndarray, estimated: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Map raw sigma through a monotone table; beyond its end, scale by the last ratio."""
    mapped = np.interp(sigma, estimated, true)
    beyond = sigma > estimated[-1]
    mapped[beyond] = sigma[beyond] * (true[-1] / estimated[-1])
    return mapped


class OnnxBackend:
    """The learned patch CNN (models/detector) run by ONNX Runtime; CUDA when available, else CPU.

    Model contract (written by models/detector/export.py into blur_detector.json):
    input `patches` float32 (N, 1, PATCH, PATCH) in [0, 1]; output `estimates` float32 (N, 5) =
    [log(sigma + 0.5), log variance of that, log anisotropy, cos 2 angle, sin 2 angle]. The last three
    heads are not used: the structure tensor (psf_shape.py) measured better on the val split.
    """

    def __init__(self, model_path: Path, intra_op_threads: int = 0) -> None:
        meta_path = model_path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.model_version = str(meta.get("model_version", f"onnx:{model_path.name}"))
        if int(meta.get("patch", PATCH)) != PATCH:
            raise ValueError(f"{model_path}: model expects {meta['patch']} px patches, runtime cuts {PATCH}")
        # Monotone table (val split, models/detector/calibrate.py): network sigma -> true sigma in px.
        table = meta.get("sigma_calibration")
        self._calibration = (
            (np.array(table["estimated"], float), np.array(table["true"], float)) if table else None
        )
        self.session = open_session(model_path, intra_op_threads)
        self.providers = self.session.get_providers()
        self._input = self.session.get_inputs()[0].name

    def estimate(self, patches: np.ndarray) -> PatchEstimates:
        out = self.session.run(None, {self._input: patches[:, None, :, :].astype(np.float32, copy=False)})[0]
        out = out.astype(np.float64)
        sigma = np.maximum(np.exp(out[:, 0]) - _LOG_OFFSET, 0.0)
        if self._calibration is not None:
            sigma = calibrate_sigma(sigma, *self._calibration)
        weight = np.exp(-out[:, 1])  # inverse predicted variance of log-sigma
        return PatchEstimates(sigma, weight)


# ---------------------------------------------------------------------------------------------------
# Aggregation: patch estimates -> region map -> tile verdict


def _box3(grid: np.ndarray) -> np.ndarray:
    padded = np.pad(grid, 1)
    return sum(padded[i : i + GRID, j : j + GRID] for i in range(3) for j in range(3))


@dataclass(frozen=True)
class _TileEstimate:
    sigma_px: float
    global_sigma_px: float
    region_sigma: np.ndarray  # (GRID, GRID)
    worst_cell: tuple[int, int]
    best_sigma_px: float
    reliable_fraction: float
    anisotropy: float
    angle_deg: float


def aggregate(
    est: PatchEstimates, cells: np.ndarray, tensors: np.ndarray, min_weight: float
) -> _TileEstimate:
    """Combine one tile's patch estimates into region map, sigma and PSF shape.

    cells: each patch's cell index (N,); tensors: psf_shape.structure_tensors of the patches (N, 3).
    Backends read an elliptical PSF as its geometric-mean sigma; the reported sigma is the major axis.
    """
    logs = np.log(est.sigma_px + _LOG_OFFSET)
    w = est.weight
    cell_w = np.bincount(cells, weights=w, minlength=GRID * GRID).reshape(GRID, GRID)
    cell_wl = np.bincount(cells, weights=w * logs, minlength=GRID * GRID).reshape(GRID, GRID)
    total_w = float(w.sum())
    global_log = float((w * logs).sum() / total_w) if total_w > 0 else math.log(_LOG_OFFSET)
    smooth_w, smooth_wl = _box3(cell_w), _box3(cell_wl)
    region_log = np.where(smooth_w > 0, smooth_wl / np.maximum(smooth_w, 1e-300), global_log)
    region_sigma = np.maximum(np.exp(region_log) - _LOG_OFFSET, 0.0)
    # Only regions backed by enough reliable patches may raise the tile's verdict.
    trusted = smooth_w >= 3.0 * min_weight
    global_sigma = max(math.exp(global_log) - _LOG_OFFSET, 0.0)
    if trusted.any():
        masked = np.where(trusted, region_sigma, -1.0)
        worst = np.unravel_index(int(np.argmax(masked)), masked.shape)
        worst_sigma = float(masked[worst])
        best_sigma = float(np.where(trusted, region_sigma, np.inf).min())
    else:
        worst, worst_sigma, best_sigma = (0, 0), global_sigma, global_sigma
    # Shape only from clearly blurred patches: a sharp patch's gradients show content, not the PSF.
    blurred = w * (est.sigma_px > 1.0) * (np.abs(tensors).sum(axis=1) > 0)
    if blurred.sum() >= 3.0 * min_weight:
        anisotropy, angle = psf_shape(tensors, blurred, global_sigma)
    else:  # too few blurred patches with structure to read a PSF shape from
        anisotropy, angle = 1.0, 0.0
    return _TileEstimate(
        sigma_px=max(global_sigma, worst_sigma) * math.sqrt(anisotropy),
        global_sigma_px=global_sigma,
        region_sigma=region_sigma,
        worst_cell=(int(worst[0]), int(worst[1])),
        best_sigma_px=best_sigma,
        reliable_fraction=float(cell_w.sum() / max(len(w), 1) / max(min_weight, 1e-12)),
        anisotropy=anisotropy,
        angle_deg=angle,
    )


class BlurDetector:
    """Judges tiles: blur score, label (sharp / soft / retake), PSF estimate and region map."""

    def __init__(self, backend: PatchBackend, cfg: DetectorConfig, per_cell: int = 1) -> None:
        self.backend = backend
        self.cfg = cfg
        self.per_cell = per_cell
        self.model_version: str = backend.model_version
        # A patch with this weight counts as one fully reliable patch-equivalent.
        self._unit_weight = 1.0 if isinstance(backend, ClassicalBackend) else _ONNX_UNIT_WEIGHT

    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> BlurDetector:
        """Build the backend named by cfg.backend (`auto`: bundled learned model if present)."""
        model_path = Path(cfg.model_path) if cfg.model_path is not None else BUNDLED_MODEL
        # auto falls back only when no model was asked for: a missing configured model is an error.
        fallback = cfg.model_path is None and not model_path.is_file()
        if cfg.backend == "classical" or (cfg.backend == "auto" and fallback):
            return cls(ClassicalBackend(), cfg)
        if not model_path.is_file():
            raise FileNotFoundError(
                f"detector.model_path: {model_path} does not exist; point it at an ONNX file or use "
                "detector.backend: classical"
            )
        return cls(OnnxBackend(model_path, intra_op_threads=cfg.inference_threads), cfg)

    def assess(self, tiles: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[BlurAssessment]:
        """Judge a batch of 2-D uint8/uint16 tiles (any size >= 32 px); raises TileError on bad input."""
        names = list(names) if names is not None else [f"tile[{i}]" for i in range(len(tiles))]
        if len(names) != len(tiles):
            raise ValueError(f"assess: {len(tiles)} tiles but {len(names)} names")
        for tile, name in zip(tiles, names, strict=True):
            check_tile_pixels(tile, name)
        if not tiles:
            return []
        cut = [extract_patches(np.asarray(t), self.per_cell) for t in tiles]
        all_patches = np.concatenate([p for p, _ in cut])
        estimates = self.backend.estimate(all_patches)
        tensors = structure_tensors(all_patches)
        results, start = [], 0
        for patches, cells in cut:
            stop = start + len(patches)
            part = PatchEstimates(*(getattr(estimates, f)[start:stop] for f in _ESTIMATE_FIELDS))
            results.append(self._verdict(aggregate(part, cells, tensors[start:stop], self._unit_weight)))
            start = stop
        return results

    def _verdict(self, est: _TileEstimate) -> BlurAssessment:
        cfg = self.cfg
        label: TileLabel
        reason = ""
        if est.reliable_fraction < MIN_RELIABLE_FRACTION:
            label = "retake"
            reason = (
                "not judgeable: almost no structure above the noise (blank resin, beam off, or blurred "
                "beyond recognition)"
            )
        elif est.sigma_px <= cfg.sharp_sigma_px:
            label = "sharp"
        elif est.sigma_px <= cfg.max_restorable_sigma_px:
            label = "soft"
        else:
            label = "retake"
            r, c = est.worst_cell
            if est.best_sigma_px <= cfg.max_restorable_sigma_px:
                reason = (
                    f"partial blur: region row {r} col {c} of the {GRID}x{GRID} map has blur sigma "
                    f"~{est.sigma_px:.1f} px (restorable up to {cfg.max_restorable_sigma_px:g} px) while "
                    f"the best region has ~{est.best_sigma_px:.1f} px: tilted or non-flat section?"
                )
            else:
                reason = (
                    f"blur sigma ~{est.sigma_px:.1f} px exceeds the restorable limit "
                    f"{cfg.max_restorable_sigma_px:g} px (detector.max_restorable_sigma_px): refocus"
                )
        regions = blur_score_from_sigma(est.region_sigma)
        # An unjudgeable tile scores 1.0: it must not pass as sharp whatever its estimate says.
        score = 1.0 if reason.startswith("not judgeable") else float(blur_score_from_sigma(est.sigma_px))
        return BlurAssessment(
            blur_score=round(score, 4),
            label=label,
            sigma_px=round(est.sigma_px, 3),
            anisotropy=round(est.anisotropy, 3),
            angle_deg=round(est.angle_deg, 1),
            region_scores=[[round(float(v), 4) for v in row] for row in regions],
            reason=reason,
            model_version=self.model_version,
        )


# The learned model's weight is 1/variance of log-sigma; a patch whose log-sigma is known to +-0.3
# (about +-35 % in sigma) counts as one reliable patch.
_ONNX_UNIT_WEIGHT = 1.0 / 0.3**2
