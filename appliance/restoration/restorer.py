"""Runtime deblur: restore batches of soft-focus tiles with the learned model or classical Wiener.

Backends (`DeblurConfig.backend`):
- ``onnx``      bundled ONNX model in ONNX Runtime (CUDA provider when installed and a GPU exists, else CPU);
- ``torch``     the same weights as a `torch.export` program; on a CUDA GPU fp16 (or bf16) + channels_last,
                whole tiles restored on the device (`appliance.restoration.torch_backend`);
- ``classical`` Wiener deconvolution with the elliptical Gaussian PSF the blur detector estimated;
- ``auto``      the fastest correct one available: on a GPU, of torch fp16/bf16 and ONNX Runtime CUDA the
                one that runs a 1024 x 1024 probe fastest among those that agree with ONNX Runtime
                CPU (fp32) on a probe patch (within 10 %, the earlier in that order, so that every replica
                picks the same); else ONNX Runtime CPU, else classical (no model file).
torch is imported only when a CUDA GPU is visible or the torch backend is asked for.

Which weights (`DeblurConfig.model_path`; None = bundled, `bundled_model`):
- ``appliance/weights/deblur_gpu.onnx`` (+ .pt2, .json): the PSF-aware GPU model (models/deblur/gpu.yaml,
  exported with `--name deblur_gpu`), chosen only by ``auto`` on a machine where a CUDA GPU is visible
  and only when it was exported there; if no GPU backend runs it correctly (none builds, or none agrees
  with ONNX Runtime CPU), the CPU default below serves instead: the GPU model is too heavy for a CPU;
- ``appliance/weights/deblur.onnx`` (+ .pt2, .json): the blind CPU model, the default everywhere else
  (every CPU rig, and ``onnx`` / ``torch`` with no model_path).
An explicit model_path is used as given, with any backend.

PSF-aware models: the sidecar (`appliance.sidecar.DeblurSidecar`) lists the planes the model was trained
with; each tile's planes are built from its BlurAssessment (`appliance.restoration.psf_planes`:
estimate_from_assessment, psf_planes; all-zero blind planes when the assessment carries no usable
estimate) and fed beside the pixels, cut with them by the tiled path and built on the device by the
whole-tile torch path. A blind model (no `psf_planes` in its sidecar, like the bundled deblur.json) gets
the pixels only.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from appliance.config import DeblurConfig
from appliance.messages import BlurAssessment
from appliance.onnx_session import CPU, CUDA, open_session, ort_has_cuda
from appliance.restoration.intensity import from_model_scale, intensity_window, to_model_scale
from appliance.restoration.psf_planes import (
    PLANE_NAMES,
    PLANE_VERSION,
    PsfEstimate,
    estimate_from_assessment,
    psf_planes,
)
from appliance.restoration.rig_wiener import RigRestoration, blend, rig_wiener
from appliance.restoration.tiling import run_tiled
from appliance.restoration.wiener import MIN_DECONV_SIGMA_PX, auto_nsr, gaussian_psf, wiener_deconvolve
from appliance.sidecar import DeblurSidecar, SidecarError
from appliance.tile_io import TileError, check_tile_pixels
from appliance.weights import DEBLUR_GPU_MODEL, DEBLUR_MODEL

CLASSICAL_VERSION = "classical-wiener-1"
# fp16 GPU output may differ from fp32 CPU output by this much (model scale, max abs) and still be kept.
GPU_AGREEMENT_TOLERANCE = 0.02
# `auto`'s candidates closer than this in speed count as a tie (the earlier one is chosen): timing noise
# between two replicas' probes must not give them different precisions.
SPEED_TIE_MARGIN = 0.1

log = logging.getLogger(__name__)

BatchFn = Callable[[np.ndarray], np.ndarray]
# Whole same-shape tiles in, restored tiles out; then the reflect margin (px) and, for a PSF-aware model,
# each tile's PSF estimate (None = blind planes).
WholeTilesFn = Callable[[Sequence[np.ndarray], int, Sequence[PsfEstimate | None] | None], list[np.ndarray]]


def load_sidecar(model_path: Path) -> DeblurSidecar:
    """The deblur model's sidecar, checked against the planes this runtime builds; SidecarError naming it."""
    path = model_path.with_suffix(".json")
    sidecar = DeblurSidecar.load(path)
    check_planes(sidecar, path)
    return sidecar


def check_planes(sidecar: DeblurSidecar, path: Path) -> None:
    """SidecarError naming `path` unless this runtime builds exactly the planes the model expects."""
    if not sidecar.psf_aware:
        if sidecar.input_channels != 1:
            raise SidecarError(
                f"{path}: input_channels {sidecar.input_channels} but no psf_planes listed; this "
                "runtime feeds a model either the pixels alone or the pixels and named PSF planes"
            )
        return
    if sidecar.psf_planes != PLANE_NAMES or sidecar.psf_plane_version != PLANE_VERSION:
        raise SidecarError(
            f"{path}: the model was trained on PSF planes {list(sidecar.psf_planes)} version "
            f"{sidecar.psf_plane_version}, but this runtime builds {list(PLANE_NAMES)} version "
            f"{PLANE_VERSION} (appliance/restoration/psf_planes.py); retrain and export the model with this "
            "appliance's models/deblur, or run the appliance version it was trained with"
        )
    if sidecar.input_channels != 1 + len(sidecar.psf_planes):
        raise SidecarError(
            f"{path}: input_channels {sidecar.input_channels} does not match 1 pixel channel + "
            f"{len(sidecar.psf_planes)} PSF planes; re-run `python -m models.deblur.export`"
        )


class TileRestorer:
    """Restores soft-focus tiles; one instance per Serve replica (loads the model once)."""

    model_version: str
    backend: str

    def __init__(
        self,
        run_patches: BatchFn | None,
        model_version: str,
        backend: str,
        cfg: DeblurConfig,
        size_multiple: int = 1,
        restore_whole: WholeTilesFn | None = None,
        psf_aware: bool = False,
        weights_version: str | None = None,
    ) -> None:
        self._run_patches = run_patches  # None = classical Wiener
        self._restore_whole = restore_whole  # device-resident whole-tile path (torch on CUDA)
        self.model_version = model_version
        # The weights alone (the sidecar's version, no engine): what a rig calibration's blend was measured with.
        self.weights_version = weights_version if weights_version is not None else model_version
        self._warned_rig_models: set[str] = set()
        self.backend = backend
        self._cfg = cfg
        self._size_multiple = size_multiple
        self.psf_aware = psf_aware  # the model takes PSF planes built from each tile's assessment
        # The rig Wiener of a batch's tiles runs on the replica's CPU threads while its model runs (OpenCV's DFT
        # releases the GIL): on a GPU rig it is the soft tiles' bound (~0.15 s per 2400 px tile per core).
        self._wiener_pool = ThreadPoolExecutor(max_workers=cfg.inference_threads, thread_name_prefix="rig-wiener")

    @classmethod
    def from_config(cls, cfg: DeblurConfig) -> TileRestorer:
        """Build the backend `cfg.backend` asks for (see the module docstring for `auto` and the weights)."""
        if cfg.backend == "classical":
            return cls(None, CLASSICAL_VERSION, "classical", cfg)
        if cfg.model_path is None and bundled_model(cfg.backend, _cuda_visible()) == DEBLUR_GPU_MODEL:
            card = load_sidecar(DEBLUR_GPU_MODEL)
            engine = _fastest_gpu_engine(DEBLUR_GPU_MODEL, card, cfg.inference_threads)
            if engine is not None:
                return cls._learned(cfg, card, _with_compile(cfg, DEBLUR_GPU_MODEL, card, engine))
            log.warning(
                "%s: no GPU backend builds it and agrees with ONNX Runtime CPU on this machine; serving the "
                "CPU default %s instead",
                DEBLUR_GPU_MODEL,
                DEBLUR_MODEL.name,
            )
        model_path = Path(cfg.model_path) if cfg.model_path is not None else DEBLUR_MODEL
        if not model_path.is_file():
            if cfg.backend == "auto":
                return cls(None, CLASSICAL_VERSION, "classical", cfg)
            raise FileNotFoundError(
                f"deblur.model_path: {model_path} does not exist; export the model "
                "(`python -m models.deblur.export`) or set deblur.backend: classical"
            )
        card = load_sidecar(model_path)
        engine = _with_compile(cfg, model_path, card, _choose_learned_backend(cfg, model_path, card))
        return cls._learned(cfg, card, engine)

    @classmethod
    def _learned(cls, cfg: DeblurConfig, card: DeblurSidecar, engine: _Engine) -> TileRestorer:
        return cls(
            engine.run_patches,
            f"{card.model_version}+{engine.name}",
            engine.name,
            cfg,
            card.size_multiple,
            engine.restore_whole,
            card.psf_aware,
            card.model_version,
        )

    def warm_up(self, shape: tuple[int, int]) -> float:
        """Restore one synthetic uint8 tile of `shape` (height, width) and discard it, so that model set-up and a
        torch.compile for this shape happen now, not on a section's first soft tile; the seconds it took."""
        started = time.perf_counter()
        ramp = (np.add.outer(np.arange(shape[0]), np.arange(shape[1])) % 256).astype(np.uint8)
        self.restore([ramp], [BlurAssessment(blur_score=0.5, label="soft", sigma_px=1.5)], ["warm-up tile"])
        return time.perf_counter() - started

    def restore(
        self,
        tiles: Sequence[np.ndarray],
        assessments: Sequence[BlurAssessment],
        names: Sequence[str] | None = None,
        rigs: Sequence[RigRestoration | None] | None = None,
    ) -> list[np.ndarray]:
        """Restore each 2-D uint8/uint16 tile; same shape, dtype and intensity scale out as in (`restore_versioned`)."""
        return self.restore_versioned(tiles, assessments, names, rigs)[0]

    def restore_versioned(
        self,
        tiles: Sequence[np.ndarray],
        assessments: Sequence[BlurAssessment],
        names: Sequence[str] | None = None,
        rigs: Sequence[RigRestoration | None] | None = None,
    ) -> tuple[list[np.ndarray], list[str]]:
        """Restore each 2-D uint8/uint16 tile; the restored tiles and, per tile, what restored it (its QC
        record's deblur version: the model version, plus `+rig-wiener-<share>` where the rig Wiener was blended).

        rigs: per tile, its rig calibration's restoration (None: the model alone): the model's output is
        blended with the rig Wiener's (appliance.restoration.rig_wiener) by the calibration's weight, when
        that weight was measured with these weights (`uses_rig`).
        Input arrays may be read-only (Ray zero-copy): they are never modified. Raises TileError naming
        the tile for pixels that are not a usable tile or an assessment labelled `retake` (beyond
        what the model restores well: restoring it would invent structure).
        """
        if len(tiles) != len(assessments):
            raise ValueError(f"restore: {len(tiles)} tiles but {len(assessments)} assessments")
        if rigs is not None and len(rigs) != len(tiles):
            raise ValueError(f"restore: {len(tiles)} tiles but {len(rigs)} rig restorations")
        if names is None:
            names = [f"tile {i} of batch" for i in range(len(tiles))]
        for pixels, assessment, name in zip(tiles, assessments, names, strict=True):
            check_tile_pixels(pixels, name)
            if assessment.label == "retake":
                raise TileError(
                    f"{name}: labelled retake (estimated blur sigma {assessment.sigma_px:.2f} px); "
                    "not restored: flag it for retake instead of sending it to deblur"
                )
            if assessment.label == "empty":
                raise TileError(f"{name}: labelled empty (no tissue); there is nothing to restore")
        wieners: dict[int, tuple[RigRestoration, Future[np.ndarray | None]]] = {
            i: (rig, self._wiener_pool.submit(rig_wiener, tiles[i], rig.reference, rig.own_noise_power))
            for i, rig in enumerate(rigs or ())
            if rig is not None and rig.model_weight < 1.0 and self.uses_rig(rig)
        }
        if self._restore_whole is not None:
            restored = self._restore_whole_batches(tiles, assessments)
        else:
            restored = [self._restore_one(p, a) for p, a in zip(tiles, assessments, strict=True)]
        versions = [self.model_version] * len(tiles)
        for i, (rig, pending) in wieners.items():
            wiener = pending.result()
            if wiener is not None:  # no spectral reading (a tile < 128 px): the model's output alone
                restored[i] = blend(restored[i], wiener, rig.model_weight)
                versions[i] = f"{self.model_version}+rig-wiener-{1.0 - rig.model_weight:.2f}"
        return restored, versions

    def uses_rig(self, rig: RigRestoration) -> bool:
        """Whether `rig`'s blend applies: it was measured with these weights. Another model's weight says
        nothing about this one: the model serves alone, and the mismatch is logged once per model."""
        if rig.deblur_model == self.weights_version:
            return True
        if rig.deblur_model not in self._warned_rig_models:
            self._warned_rig_models.add(rig.deblur_model)
            log.warning(
                "the rig calibration's restoration blend was measured with deblur model %s, this replica serves "
                "%s: restoring with the model alone; recalibrate (python -m appliance calibrate) to measure it",
                rig.deblur_model,
                self.weights_version,
            )
        return False

    def _restore_whole_batches(
        self, tiles: Sequence[np.ndarray], assessments: Sequence[BlurAssessment]
    ) -> list[np.ndarray]:
        assert self._restore_whole is not None
        restored: list[np.ndarray | None] = [None] * len(tiles)
        groups: dict[tuple[tuple[int, ...], np.dtype], list[int]] = {}
        for index, pixels in enumerate(tiles):
            groups.setdefault((pixels.shape, pixels.dtype), []).append(index)
        for indices in groups.values():  # one device call per shape and dtype
            # Only the estimates travel: a PSF-aware model's planes are built on the device.
            estimates = [estimate_from_assessment(assessments[i]) for i in indices] if self.psf_aware else None
            outputs = self._restore_whole([tiles[i] for i in indices], self._cfg.patch_overlap, estimates)
            for index, out in zip(indices, outputs, strict=True):
                restored[index] = out
        return [r for r in restored if r is not None]

    def _restore_one(self, pixels: np.ndarray, assessment: BlurAssessment) -> np.ndarray:
        window = intensity_window(pixels)
        image = to_model_scale(pixels, window)
        if self._run_patches is None:
            restored = classical_restore(image, assessment)
        else:
            height, width = image.shape
            planes = psf_planes(height, width, estimate_from_assessment(assessment)) if self.psf_aware else None
            restored = run_tiled(
                image,
                self._run_patches,
                patch=self._cfg.patch_size,
                overlap=self._cfg.patch_overlap,
                batch_size=self._cfg.patch_batch,
                multiple=self._size_multiple,
                planes=planes,
            )
        return from_model_scale(restored, window, pixels.dtype)


def classical_restore(image: np.ndarray, assessment: BlurAssessment) -> np.ndarray:
    """Wiener deconvolution of a float32 (H, W) image with the PSF the detector estimated."""
    if assessment.sigma_px < MIN_DECONV_SIGMA_PX:
        return image.copy()
    psf = gaussian_psf(assessment.sigma_px, max(1.0, assessment.anisotropy), assessment.angle_deg)
    return wiener_deconvolve(image, psf, auto_nsr(image))


def bundled_model(backend: str, cuda_visible: bool) -> Path:
    """The weights `DeblurConfig.model_path: None` starts from: DEBLUR_GPU_MODEL for `auto` where a CUDA GPU is
    visible and deblur_gpu.onnx + .json were exported, else DEBLUR_MODEL (every CPU rig)."""
    if (
        backend == "auto"
        and cuda_visible
        and DEBLUR_GPU_MODEL.is_file()
        and DEBLUR_GPU_MODEL.with_suffix(".json").is_file()
    ):
        return DEBLUR_GPU_MODEL
    return DEBLUR_MODEL


def _cuda_visible() -> bool:
    # Checked without importing torch: the driver exposes these on any machine with an NVIDIA GPU
    # (a VM or container may show only the device nodes).
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


@dataclass(frozen=True)
class _Engine:
    name: str
    run_patches: BatchFn
    restore_whole: WholeTilesFn | None = None
    torch_dtype: object | None = None  # a torch engine's dtype (it can be rebuilt compiled); None otherwise


def _with_compile(cfg: DeblurConfig, model_path: Path, card: DeblurSidecar, engine: _Engine) -> _Engine:
    """`engine` rebuilt with its network fused by torch.compile when `cfg.torch_compile` asks and it is a torch
    engine. Only the chosen engine is compiled (`auto` times the candidates uncompiled: compiling each would
    cost a compile per candidate and probe shape); its output was measured within 1 DN of the uncompiled
    one (bench/gpu_suite.py)."""
    if cfg.torch_compile == "off" or engine.torch_dtype is None:
        return engine
    return _torch_engine(model_path, card, engine.torch_dtype, cfg.torch_compile)


def _choose_learned_backend(cfg: DeblurConfig, model_path: Path, card: DeblurSidecar) -> _Engine:
    if cfg.backend == "torch":
        return _torch_engine(model_path, card, None)
    threads = cfg.inference_threads
    cpu = _Engine("onnx-cpu", _onnx_runner(model_path, card, [CPU], threads))
    if cfg.backend == "onnx":
        if _cuda_visible() and ort_has_cuda():
            providers = [CUDA, CPU]
            return _Engine("onnx-cuda", _onnx_runner(model_path, card, providers, threads))
        return cpu
    gpu = _fastest_gpu_engine(model_path, card, threads, cpu.run_patches) if _cuda_visible() else None
    return gpu if gpu is not None else cpu


def _fastest_gpu_engine(
    model_path: Path, card: DeblurSidecar, threads: int, reference: BatchFn | None = None
) -> _Engine | None:
    """`auto` on a GPU: the fastest GPU backend that agrees with fp32 ONNX Runtime CPU (`reference`,
    opened here when not given; near ties go to the earlier candidate, `preferred_by_speed`); None when none
    builds and agrees."""
    correct: list[tuple[float, _Engine]] = []
    for build in _gpu_candidates(model_path, card, threads):
        try:
            engine = build()
        except Exception:  # a broken GPU stack must not stop the rig: the next backend serves
            continue
        if reference is None:
            reference = _onnx_runner(model_path, card, [CPU], threads)
        if _agrees(engine.run_patches, reference, card):
            correct.append((_seconds_per_call(engine.run_patches, card), engine))
    if not correct:
        return None
    return correct[preferred_by_speed([seconds for seconds, _ in correct])][1]


def preferred_by_speed(seconds: Sequence[float], margin: float = SPEED_TIE_MARGIN) -> int:
    """Index of the earliest candidate within `margin` (a fraction) of the fastest one's time.

    Each replica times the candidates itself: on an H200, fp16 and bf16 ran within 1 % of each other, and the
    two replicas of one run chose differently (QC records of one section named both; 2026-11-27,
    bench/gpu-results/2026-11-27-h200-suite-cal-run4.md). A tie within timing noise now goes to the earlier
    candidate (fp16 first), so every replica on a box restores with the same precision."""
    fastest = min(seconds)
    return next(i for i, s in enumerate(seconds) if s <= fastest * (1.0 + margin))


def _gpu_candidates(model_path: Path, card: DeblurSidecar, threads: int) -> list[Callable[[], _Engine]]:
    candidates: list[Callable[[], _Engine]] = []
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            from appliance.restoration.torch_backend import cuda_dtypes

            candidates += [partial(_torch_engine, model_path, card, dtype) for dtype in cuda_dtypes()]
    if ort_has_cuda():
        providers = [CUDA]
        candidates.append(lambda: _Engine("onnx-cuda", _onnx_runner(model_path, card, providers, threads)))
    return candidates


def _probe(side: int, card: DeblurSidecar, seed: int) -> np.ndarray:
    """float32 (1, card.input_channels, side, side): pseudo-random pixels, then (PSF-aware model) the
    planes of a typical astigmatic blur."""
    pixels = np.random.default_rng(seed).random((1, 1, side, side), dtype=np.float32)
    if not card.psf_aware:
        return pixels
    planes = psf_planes(side, side, PsfEstimate(sigma_px=2.0, anisotropy=1.5, angle_deg=30.0))
    return np.concatenate([pixels, planes[None]], axis=1)


def _agrees(candidate: BatchFn, reference: BatchFn, card: DeblurSidecar) -> bool:
    """True when `candidate` matches the fp32 CPU reference on a fixed pseudo-random probe patch."""
    probe = _probe(max(64, card.size_multiple), card, seed=0)
    try:
        diff = np.abs(candidate(probe) - reference(probe))
    except Exception:
        return False
    return bool(np.isfinite(diff).all() and diff.max() <= GPU_AGREEMENT_TOLERANCE)


def _seconds_per_call(run: BatchFn, card: DeblurSidecar, side: int = 1024, calls: int = 3) -> float:
    """Best wall time of `calls` runs on one (1, C, side, side) patch, after a warm-up call."""
    probe = _probe(side, card, seed=1)
    run(probe)
    best = math.inf
    for _ in range(calls):
        started = time.perf_counter()
        run(probe)  # returns host numpy: the device work is finished when it returns
        best = min(best, time.perf_counter() - started)
    return best


def _onnx_runner(model_path: Path, card: DeblurSidecar, providers: list[str], threads: int) -> BatchFn:
    session = open_session(model_path, threads, providers)

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([card.output_name], {card.input_name: batch})[0]

    return run


def _torch_engine(model_path: Path, card: DeblurSidecar, dtype: object | None, compile_mode: str = "off") -> _Engine:
    """torch.export program next to the .onnx file: on CUDA in `dtype` (default fp16), else fp32 CPU;
    compile_mode: DeblurConfig.torch_compile."""
    import torch

    from appliance.restoration.torch_backend import TorchDeblur

    on_cuda = torch.cuda.is_available()
    dtype = (dtype if dtype is not None else torch.float16) if on_cuda else torch.float32
    deblur = TorchDeblur(
        model_path.with_suffix(".pt2"),
        card.size_multiple,
        "cuda" if on_cuda else "cpu",
        dtype,
        psf_planes=card.psf_aware,
        compile_network=compile_mode != "off",
        compile_mode=None if compile_mode in ("off", "default") else compile_mode,
    )
    name = ("torch-cuda-" + str(dtype).removeprefix("torch.") if on_cuda else "torch-cpu") + (
        "" if compile_mode == "off" else "-compiled"
    )
    return _Engine(name, deblur.run_patches, deblur.restore_tiles if on_cuda else None, dtype)
