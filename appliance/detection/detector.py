"""Runtime blur detector: per tile a blur score, a label, a PSF estimate and a coarse region map.

A tile is judged from patches sampled at native resolution (never downscaled: focus lives in the finest
detail): PATCH x PATCH patches on a sheared lattice (patches.py, detector.patch_rows x patches_per_row),
each belonging to one cell of a GRID x GRID grid. A backend estimates, for every patch, the blur sigma
(px) and a reliability weight (blank resin or noise-only patches say little about focus). The same
aggregation then turns patch estimates into the tile's verdict, so backends are interchangeable:

- region map: reliability-weighted mean of log-sigma per cell, smoothed over 3x3 cells;
- PSF shape: anisotropy and major-axis angle from the blurred patches' structure tensors (psf_shape.py);
- tile sigma (major axis): the worst of the whole-tile mean, the worst reliable region (catches a tilted
  section) and the blurriest 2x2 block of cells, times sqrt(anisotropy) (backends read an elliptical
  PSF's geometric-mean sigma);
- localized blur: the blurriest small window (detector.local_blur_window_share of the tile: square, 1:4
  band or strip, anywhere), read from the patches inside it (local_blur.py), sets the sigma when it is
  beyond repair;
- label: fewer than tissue.MIN_TISSUE_CELLS cells holding tissue (tissue.py) -> empty; else, judged on its
  tissue cells only, sigma <= sharp_sigma_px -> sharp; <= max_restorable_sigma_px -> soft; else retake
  (with reason); too little reliable structure -> retake ("not judgeable").

Backends (`backends.py`): `onnx` (learned CNN, `appliance/weights/blur_detector.onnx`, ONNX Runtime, CUDA
provider when available) and `classical` (re-blur gradient ratio, Zhuo & Sim 2011, calibrated on the
training split); patch sampling: `patches.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from appliance.config import DetectorConfig
from appliance.detection.backends import ClassicalBackend, OnnxBackend, PatchBackend, PatchEstimates
from appliance.detection.local_blur import worst_window
from appliance.detection.patches import GRID, extract_patches
from appliance.detection.psf_shape import psf_shape, structure_tensors
from appliance.detection.tissue import MIN_TISSUE_CELLS, patch_tissue, tissue_cells
from appliance.messages import BlurAssessment, TileLabel, blur_score_from_sigma
from appliance.noise import patch_noise_sigma
from appliance.sidecar import DetectorSidecar, SidecarError
from appliance.spectral import (
    SpectralReferenceArrays,
    WindowSpectra,
    estimate_added_blur,
    read_added_blur,
    read_around,
    window_spectra,
)
from appliance.tile_io import check_tile_pixels
from appliance.weights import BLUR_DETECTOR_MODEL, CLASSICAL_DETECTOR_SIDECAR

# Below this share of reliable patches (in patch-equivalents) a tile cannot be judged.
MIN_RELIABLE_FRACTION = 0.05
LOG_SIGMA_OFFSET_PX = 0.5  # sigma is averaged as log(sigma + offset) so 0 px is finite
SHAPE_MIN_SIGMA_PX = 1.0  # only patches blurrier than this show the PSF's shape (sharper: the content's)


def label_for_sigma(sigma_px: float, cfg: DetectorConfig) -> TileLabel:
    """sharp <= cfg.sharp_sigma_px < soft <= cfg.max_restorable_sigma_px < retake."""
    if sigma_px <= cfg.sharp_sigma_px:
        return "sharp"
    return "soft" if sigma_px <= cfg.max_restorable_sigma_px else "retake"


# ---------------------------------------------------------------------------------------------------
# Aggregation: patch estimates -> region map -> tile verdict


def _box2(grid: np.ndarray) -> np.ndarray:
    """Sums over every 2x2 window of cells: (GRID - 1, GRID - 1)."""
    return grid[:-1, :-1] + grid[1:, :-1] + grid[:-1, 1:] + grid[1:, 1:]


def _worst_2x2(cell_w: np.ndarray, cell_wl: np.ndarray, min_weight: float) -> tuple[float, tuple[int, int]] | None:
    """Blurriest trusted 2x2 block of cells (1/16 of the tile): its sigma and its blurriest cell.

    The 3x3-smoothed region map dilutes a blurred spot of 1/16 of the tile with 5 sharp cells of 9; a
    2x2 window holds such a spot whole wherever it sits on the cell grid.
    """
    win_w, win_wl = _box2(cell_w), _box2(cell_wl)
    trusted = win_w >= 3.0 * min_weight
    if not trusted.any():
        return None
    log_mean = np.where(trusted, win_wl / np.maximum(win_w, 1e-300), -np.inf)
    r, c = np.unravel_index(int(np.argmax(log_mean)), log_mean.shape)
    own = np.where(cell_w > 0, cell_wl / np.maximum(cell_w, 1e-300), -np.inf)[r : r + 2, c : c + 2]
    dr, dc = np.unravel_index(int(np.argmax(own)), own.shape)
    sigma = max(math.exp(float(log_mean[r, c])) - LOG_SIGMA_OFFSET_PX, 0.0)
    return sigma, (int(r + dr), int(c + dc))


def _box3(grid: np.ndarray) -> np.ndarray:
    padded = np.pad(grid, 1)
    total = np.zeros_like(grid)
    for i in range(3):
        for j in range(3):
            total = total + padded[i : i + GRID, j : j + GRID]
    return total


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
    tissue_cells: int = GRID * GRID
    local_shape: str = ""  # the shape of the local-blur window that set sigma_px ("" = none did)


@dataclass(frozen=True)
class LocalBlurRule:
    """What the local-blur scan needs besides the patch estimates (local_blur.py); from DetectorConfig."""

    tile_shape: tuple[int, int]
    lattice: tuple[int, int]  # (patch_rows, patches_per_row)
    share: float
    window_share: float
    min_patches: float
    min_contrast: float  # window (sigma + LOG_SIGMA_OFFSET_PX) over the whole tile's: a local spot stands out
    window_scale: float  # the backend sidecar's local_window_scale: patch-mean reading -> the label's scale
    beyond_sigma_px: float  # only a window blurrier than this (max_restorable_sigma_px) may raise the verdict


def aggregate(
    est: PatchEstimates,
    cells: np.ndarray,
    tensors: np.ndarray,
    min_weight: float,
    c2: float,
    tissue: np.ndarray | None = None,
    local: LocalBlurRule | None = None,
) -> _TileEstimate:
    """Combine one tile's patch estimates into region map, sigma and PSF shape.

    cells: each patch's cell index (N,); tensors: psf_shape.structure_tensors of the patches (N, 3), needed
    only where est.sigma_px > SHAPE_MIN_SIGMA_PX (rows of the others are ignored);
    c2: the PSF-shape constant of the backend's sidecar (px^2); tissue: (GRID, GRID) bool, cells holding
    tissue (tissue.py; None = all): only those are judged, bare resin beside tissue says nothing of focus.
    local: the local-blur scan (None = off): the blurriest window of local.share of the tile, from the
    patches inside it, raises the verdict when it is beyond repair (only then: it never makes sharp soft).
    Backends read an elliptical PSF as its geometric-mean sigma; the reported sigma is the major axis.
    """
    logs = np.log(est.sigma_px + LOG_SIGMA_OFFSET_PX)
    w = est.weight if tissue is None else est.weight * tissue.reshape(-1)[cells]
    cell_w = np.bincount(cells, weights=w, minlength=GRID * GRID).reshape(GRID, GRID)
    cell_wl = np.bincount(cells, weights=w * logs, minlength=GRID * GRID).reshape(GRID, GRID)
    total_w = float(w.sum())
    global_log = float((w * logs).sum() / total_w) if total_w > 0 else math.log(LOG_SIGMA_OFFSET_PX)
    smooth_w, smooth_wl = _box3(cell_w), _box3(cell_wl)
    region_log = np.where(smooth_w > 0, smooth_wl / np.maximum(smooth_w, 1e-300), global_log)
    region_sigma = np.maximum(np.exp(region_log) - LOG_SIGMA_OFFSET_PX, 0.0)
    # Only regions backed by enough reliable patches may raise the tile's verdict.
    trusted = smooth_w >= 3.0 * min_weight
    global_sigma = max(math.exp(global_log) - LOG_SIGMA_OFFSET_PX, 0.0)
    if trusted.any():
        masked = np.where(trusted, region_sigma, -1.0)
        row, col = np.unravel_index(int(np.argmax(masked)), masked.shape)
        worst = (int(row), int(col))
        worst_sigma = float(masked[worst])
        best_sigma = float(np.where(trusted, region_sigma, np.inf).min())
    else:
        worst, worst_sigma, best_sigma = (0, 0), global_sigma, global_sigma
    spot = _worst_2x2(cell_w, cell_wl, min_weight)
    if spot is not None and spot[0] > worst_sigma:
        worst_sigma, worst = spot
    local_shape = ""
    if local is not None:
        window = worst_window(
            logs,
            w,
            cells,
            local.tile_shape,
            local.lattice,
            local.share,
            local.window_share,
            local.min_patches * min_weight,
            LOG_SIGMA_OFFSET_PX,
        )
        if window is not None:
            read = window.sigma_px + LOG_SIGMA_OFFSET_PX
            stands_out = read >= local.min_contrast * math.exp(global_log)
            scaled = read * local.window_scale - LOG_SIGMA_OFFSET_PX
            if stands_out and scaled > max(worst_sigma, local.beyond_sigma_px):
                worst_sigma, worst, local_shape = scaled, window.cell, window.shape
    # Shape only from clearly blurred patches: a sharp patch's gradients show content, not the PSF.
    blurred = w * (est.sigma_px > SHAPE_MIN_SIGMA_PX) * (np.abs(tensors).sum(axis=1) > 0)
    # 3 patch-equivalents per GRID * GRID patches, the density the rule was set at: a denser lattice must
    # not let a few oriented edges (a fold's band) read as an elongated PSF.
    if blurred.sum() >= 3.0 * min_weight * len(w) / (GRID * GRID):
        anisotropy, angle = psf_shape(tensors, blurred, global_sigma, c2)
    else:  # too few blurred patches with structure to read a PSF shape from
        anisotropy, angle = 1.0, 0.0
    return _TileEstimate(
        sigma_px=max(global_sigma, worst_sigma) * math.sqrt(anisotropy),
        global_sigma_px=global_sigma,
        region_sigma=region_sigma,
        worst_cell=worst,
        best_sigma_px=best_sigma,
        reliable_fraction=float(cell_w.sum() / max(len(w), 1) / max(min_weight, 1e-12)),
        anisotropy=anisotropy,
        angle_deg=angle,
        tissue_cells=GRID * GRID if tissue is None else int(tissue.sum()),
        local_shape=local_shape,
    )


class BlurDetector:
    """Judges tiles: blur score, label (sharp / soft / retake), PSF estimate and region map."""

    def __init__(self, backend: PatchBackend, cfg: DetectorConfig) -> None:
        self.backend = backend
        self.cfg = cfg
        self.model_version: str = backend.model_version
        # A patch with this weight counts as one fully reliable patch-equivalent.
        self._unit_weight = 1.0 if isinstance(backend, ClassicalBackend) else _ONNX_UNIT_WEIGHT
        if backend.intrinsic_c2 is None:
            raise SidecarError(
                f"detector backend {backend.model_version}: its sidecar has no intrinsic_c2; "
                f"{DetectorSidecar.rewrite_hint}"
            )
        self._c2 = backend.intrinsic_c2

    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> BlurDetector:
        """Build the backend named by cfg.backend (`auto`: bundled learned model if present)."""
        model_path = _learned_model_path(cfg)
        if model_path is None:
            return cls(ClassicalBackend(), cfg)
        return cls(OnnxBackend(model_path, intra_op_threads=cfg.inference_threads), cfg)

    @staticmethod
    def configured_model_version(cfg: DetectorConfig) -> str:
        """The model_version from_config(cfg) would run, read from its sidecar without loading the model."""
        model_path = _learned_model_path(cfg)
        sidecar = CLASSICAL_DETECTOR_SIDECAR if model_path is None else model_path.with_suffix(".json")
        return DetectorSidecar.load(sidecar).model_version

    def assess(
        self,
        tiles: Sequence[np.ndarray],
        names: Sequence[str] | None = None,
        spectral_references: Sequence[SpectralReferenceArrays | None] | None = None,
    ) -> list[BlurAssessment]:
        """Judge a batch of 2-D uint8/uint16 tiles (any size >= 32 px); raises TileError on bad input.

        spectral_references: per tile, its rig's in-focus spectrum (RigCalibration.spectral.arrays()) or None;
        a judged tile with one also gets spectral_sigma_px, the blur added to that spectrum.
        """
        names = list(names) if names is not None else [f"tile[{i}]" for i in range(len(tiles))]
        references = list(spectral_references) if spectral_references is not None else [None] * len(tiles)
        if not len(names) == len(references) == len(tiles):
            raise ValueError(f"assess: {len(tiles)} tiles but {len(names)} names, {len(references)} references")
        for tile, name in zip(tiles, names, strict=True):
            check_tile_pixels(tile, name)
        if not tiles:
            return []
        lattice = (self.cfg.patch_rows, self.cfg.patches_per_row)
        cut = [extract_patches(np.asarray(t), *lattice) for t in tiles]
        all_patches = np.concatenate([p for p, _ in cut])
        estimates = self.backend.estimate(all_patches)
        noise = patch_noise_sigma(all_patches)
        # Structure tensors only where aggregate() reads a PSF shape: sharp patches (most of them) skip it.
        tensors = np.zeros((len(all_patches), 3))
        shaped = estimates.sigma_px > SHAPE_MIN_SIGMA_PX
        if shaped.any():
            tensors[shaped] = structure_tensors(all_patches[shaped], noise[shaped])
        has_tissue = patch_tissue(all_patches, noise)
        results, start = [], 0
        for tile, (patches, cells), reference in zip(tiles, cut, references, strict=True):
            stop = start + len(patches)
            part = PatchEstimates(*(getattr(estimates, f)[start:stop] for f in PatchEstimates.__dataclass_fields__))
            tissue = tissue_cells(np.asarray(tile), float(np.median(noise[start:stop])), has_tissue[start:stop], cells)
            local = LocalBlurRule(
                tile_shape=np.shape(tile),
                lattice=lattice,
                share=self.cfg.local_blur_share,
                window_share=self.cfg.local_blur_window_share,
                min_patches=self.cfg.local_blur_min_patches,
                min_contrast=self.cfg.local_blur_min_contrast,
                window_scale=self.backend.local_window_scale,
                beyond_sigma_px=self.cfg.max_restorable_sigma_px,
            )
            estimate = aggregate(part, cells, tensors[start:stop], self._unit_weight, self._c2, tissue, local)
            verdict = self._verdict(estimate)
            if reference is not None and is_judged(verdict):
                verdict = verdict_with_reading(verdict, window_spectra(np.asarray(tile)), reference)
                if verdict.label == "retake" and verdict.reason.startswith(PARTIAL_BLUR):
                    verdict = replace(
                        verdict, spectral_spot_sigma_px=_spot_reading(np.asarray(tile), estimate.worst_cell, reference)
                    )
            results.append(verdict)
            start = stop
        return results

    def _verdict(self, est: _TileEstimate) -> BlurAssessment:
        cfg = self.cfg
        label: TileLabel
        reason = ""
        if est.tissue_cells < MIN_TISSUE_CELLS:
            return self._empty_verdict(est)
        if est.reliable_fraction < MIN_RELIABLE_FRACTION:
            label = "retake"
            reason = (
                "not judgeable: almost no structure above the noise (blank resin, beam off, or blurred "
                "beyond recognition)"
            )
        elif (label := label_for_sigma(est.sigma_px, cfg)) == "retake":
            r, c = est.worst_cell
            where = (
                f" (blurred {est.local_shape}, read in {cfg.local_blur_window_share:.3g} of the tile)"
                if est.local_shape
                else ""
            )
            if est.best_sigma_px <= cfg.max_restorable_sigma_px:
                reason = (
                    f"{PARTIAL_BLUR}: region row {r} col {c} of the {GRID}x{GRID} map{where} has blur sigma "
                    f"~{est.sigma_px:.1f} px (restorable up to {cfg.max_restorable_sigma_px:g} px) while "
                    f"the best region has ~{est.best_sigma_px:.1f} px: tilted or non-flat section?"
                )
            else:
                reason = (
                    f"blur sigma ~{est.sigma_px:.1f} px exceeds the restorable limit "
                    f"{cfg.max_restorable_sigma_px:g} px (detector.max_restorable_sigma_px): refocus"
                )
        regions = np.asarray(blur_score_from_sigma(est.region_sigma))
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

    def _empty_verdict(self, est: _TileEstimate) -> BlurAssessment:
        """No tissue to judge: written as acquired, never restored, never flagged; scores say "nothing seen"."""
        return BlurAssessment(
            blur_score=0.0,
            label="empty",
            sigma_px=0.0,
            region_scores=[[0.0] * GRID for _ in range(GRID)],
            reason=(
                f"no tissue: {est.tissue_cells} of {GRID * GRID} regions show structure above the noise "
                "(bare resin, beyond the section edge, or a blank field)"
            ),
            model_version=self.model_version,
        )


def is_judged(verdict: BlurAssessment) -> bool:
    """Whether a verdict carries a focus reading (not `empty`, not "not judgeable")."""
    return verdict.label != "empty" and not verdict.reason.startswith("not judgeable")


def _spot_reading(tile: np.ndarray, cell: tuple[int, int], reference: SpectralReferenceArrays) -> float | None:
    """The largest spectral reading within a cell of the named region cell (row, col) of the GRID x GRID map."""
    h, w = tile.shape
    centre = ((cell[0] + 0.5) * h / GRID, (cell[1] + 0.5) * w / GRID)
    reading = read_around(tile, centre, 1.5 * max(h, w) / GRID, reference)
    return None if reading is None else round(reading, 3)


def verdict_with_reading(
    verdict: BlurAssessment, spectra: WindowSpectra | None, reference: SpectralReferenceArrays
) -> BlurAssessment:
    """The verdict with spectral_sigma_px and spectral_estimate_px read from the tile's window spectra (unchanged
    when unreadable)."""
    reading = None if spectra is None else read_added_blur(spectra, *reference)
    estimate = None if spectra is None or reading is None else estimate_added_blur(spectra, *reference)
    if reading is None or estimate is None:
        return verdict
    return replace(verdict, spectral_sigma_px=round(reading.sigma_px, 3), spectral_estimate_px=round(estimate, 3))


def _learned_model_path(cfg: DetectorConfig) -> Path | None:
    """The ONNX model cfg.backend asks for, or None for the classical backend (`auto` without a model)."""
    model_path = Path(cfg.model_path) if cfg.model_path is not None else BLUR_DETECTOR_MODEL
    # auto falls back only when no model was asked for: a missing configured model is an error.
    fallback = cfg.model_path is None and not model_path.is_file()
    if cfg.backend == "classical" or (cfg.backend == "auto" and fallback):
        return None
    if not model_path.is_file():
        raise FileNotFoundError(
            f"detector.model_path: {model_path} does not exist; point it at an ONNX file or use "
            "detector.backend: classical"
        )
    return model_path


# How a retake for blur beyond repair in part of the tile (a region or a local window) starts its reason.
PARTIAL_BLUR = "partial blur"

# The learned model's weight is 1/variance of log-sigma; a patch whose log-sigma is known to +-0.3
# (about +-35 % in sigma) counts as one reliable patch.
_ONNX_UNIT_WEIGHT = 1.0 / 0.3**2
