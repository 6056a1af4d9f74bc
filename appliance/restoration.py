"""Runtime deblur: restore batches of soft-focus tiles with the learned model or classical Wiener.

Backends (`DeblurConfig.backend`):
- ``onnx``      bundled ONNX model in ONNX Runtime (CUDA provider when installed and a GPU exists, else CPU);
- ``torch``     the same weights as a `torch.export` program; on a CUDA GPU fp16 (or bf16) + channels_last,
                whole tiles restored on the device (`appliance.torch_backend`);
- ``classical`` Wiener deconvolution with the elliptical Gaussian PSF the blur detector estimated;
- ``auto``      the fastest correct one available: on a GPU, of torch fp16/bf16 and ONNX Runtime CUDA the
                one that runs a 1024 x 1024 probe fastest among those that agree with ONNX Runtime
                CPU (fp32) on a probe patch; else ONNX Runtime CPU, else classical (no model file).
torch is imported only when a CUDA GPU is visible or the torch backend is asked for.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from appliance.assessment import BlurAssessment
from appliance.config import DeblurConfig
from appliance.deconvolution import MIN_DECONV_SIGMA_PX, auto_nsr, gaussian_psf, wiener_deconvolve
from appliance.intensity import from_model_scale, intensity_window, to_model_scale
from appliance.onnx_session import CPU, CUDA, open_session, ort_has_cuda
from appliance.tile_io import TileError, check_tile_pixels
from appliance.tiling import run_tiled

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUNDLED_MODEL = WEIGHTS_DIR / "deblur.onnx"
CLASSICAL_VERSION = "classical-wiener-1"
# fp16 GPU output may differ from fp32 CPU output by this much (model scale, max abs) and still be kept.
GPU_AGREEMENT_TOLERANCE = 0.02

BatchFn = Callable[[np.ndarray], np.ndarray]
# Whole same-shape tiles in, restored tiles out; second argument: reflect margin (px).
WholeTilesFn = Callable[[Sequence[np.ndarray], int], list[np.ndarray]]


@dataclass(frozen=True)
class ModelCard:
    """What the runtime needs to know about exported weights (the JSON sidecar of the .onnx file)."""

    model_version: str
    size_multiple: int  # H and W of a network input must be multiples of this (2^levels)
    input_name: str = "blurred"
    output_name: str = "restored"

    @classmethod
    def load(cls, model_path: Path) -> ModelCard:
        sidecar = model_path.with_suffix(".json")
        try:
            raw = json.loads(sidecar.read_text(encoding="utf-8"))
            return cls(
                model_version=str(raw["model_version"]),
                size_multiple=int(raw["size_multiple"]),
                input_name=str(raw.get("input_name", "blurred")),
                output_name=str(raw.get("output_name", "restored")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(
                f"{sidecar}: cannot read the deblur model's sidecar ({exc}); re-run "
                "`python -m models.deblur.export` to write it next to the .onnx file"
            ) from exc


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
    ) -> None:
        self._run_patches = run_patches  # None = classical Wiener
        self._restore_whole = restore_whole  # device-resident whole-tile path (torch on CUDA)
        self.model_version = model_version
        self.backend = backend
        self._cfg = cfg
        self._size_multiple = size_multiple

    @classmethod
    def from_config(cls, cfg: DeblurConfig) -> TileRestorer:
        """Build the backend `cfg.backend` asks for (see the module docstring for `auto`)."""
        model_path = Path(cfg.model_path) if cfg.model_path is not None else BUNDLED_MODEL
        if cfg.backend == "classical":
            return cls(None, CLASSICAL_VERSION, "classical", cfg)
        if not model_path.is_file():
            if cfg.backend == "auto":
                return cls(None, CLASSICAL_VERSION, "classical", cfg)
            raise FileNotFoundError(
                f"deblur.model_path: {model_path} does not exist; export the model "
                "(`python -m models.deblur.export`) or set deblur.backend: classical"
            )
        card = ModelCard.load(model_path)
        engine = _choose_learned_backend(cfg, model_path, card)
        return cls(
            engine.run_patches, f"{card.model_version}+{engine.name}", engine.name, cfg,
            card.size_multiple, engine.restore_whole,
        )

    def restore(
        self,
        tiles: Sequence[np.ndarray],
        assessments: Sequence[BlurAssessment],
        names: Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Restore each 2-D uint8/uint16 tile; same shape, dtype and intensity scale out as in.

        Input arrays may be read-only (Ray zero-copy): they are never modified. Raises TileError naming
        the tile for pixels that are not a usable tile or an assessment labelled `retake` (beyond
        what the model restores well: restoring it would invent structure).
        """
        if len(tiles) != len(assessments):
            raise ValueError(f"restore: {len(tiles)} tiles but {len(assessments)} assessments")
        if names is None:
            names = [f"tile {i} of batch" for i in range(len(tiles))]
        for pixels, assessment, name in zip(tiles, assessments, names, strict=True):
            check_tile_pixels(pixels, name)
            if assessment.label == "retake":
                raise TileError(
                    f"{name}: labelled retake (estimated blur sigma {assessment.sigma_px:.2f} px); "
                    "not restored: flag it for retake instead of sending it to deblur"
                )
        if self._restore_whole is not None:
            return self._restore_whole_batches(tiles)
        return [self._restore_one(p, a) for p, a in zip(tiles, assessments, strict=True)]

    def _restore_whole_batches(self, tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
        assert self._restore_whole is not None
        restored: list[np.ndarray | None] = [None] * len(tiles)
        groups: dict[tuple[tuple[int, ...], np.dtype], list[int]] = {}
        for index, pixels in enumerate(tiles):
            groups.setdefault((pixels.shape, pixels.dtype), []).append(index)
        for indices in groups.values():  # one device call per shape and dtype
            outputs = self._restore_whole([tiles[i] for i in indices], self._cfg.patch_overlap)
            for index, out in zip(indices, outputs, strict=True):
                restored[index] = out
        return [r for r in restored if r is not None]

    def _restore_one(self, pixels: np.ndarray, assessment: BlurAssessment) -> np.ndarray:
        window = intensity_window(pixels)
        image = to_model_scale(pixels, window)
        if self._run_patches is None:
            restored = classical_restore(image, assessment)
        else:
            restored = run_tiled(
                image,
                self._run_patches,
                patch=self._cfg.patch_size,
                overlap=self._cfg.patch_overlap,
                batch_size=self._cfg.patch_batch,
                multiple=self._size_multiple,
            )
        return from_model_scale(restored, window, pixels.dtype)


def classical_restore(image: np.ndarray, assessment: BlurAssessment) -> np.ndarray:
    """Wiener deconvolution of a float32 (H, W) image with the PSF the detector estimated."""
    if assessment.sigma_px < MIN_DECONV_SIGMA_PX:
        return image.copy()
    psf = gaussian_psf(assessment.sigma_px, max(1.0, assessment.anisotropy), assessment.angle_deg)
    return wiener_deconvolve(image, psf, auto_nsr(image))


def _cuda_visible() -> bool:
    # Checked without importing torch: the driver exposes these on any machine with an NVIDIA GPU
    # (a VM or container may show only the device nodes).
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


@dataclass(frozen=True)
class _Engine:
    name: str
    run_patches: BatchFn
    restore_whole: WholeTilesFn | None = None


def _choose_learned_backend(cfg: DeblurConfig, model_path: Path, card: ModelCard) -> _Engine:
    if cfg.backend == "torch":
        return _torch_engine(model_path, card, None)
    threads = cfg.inference_threads
    cpu = _Engine("onnx-cpu", _onnx_runner(model_path, card, [CPU], threads))
    if cfg.backend == "onnx":
        if _cuda_visible() and ort_has_cuda():
            providers = [CUDA, CPU]
            return _Engine("onnx-cuda", _onnx_runner(model_path, card, providers, threads))
        return cpu
    if _cuda_visible():  # auto: the fastest GPU backend that agrees with fp32 on the CPU
        correct: list[tuple[float, _Engine]] = []
        for build in _gpu_candidates(model_path, card, threads):
            try:
                engine = build()
            except Exception:  # a broken GPU stack must not stop the rig: the next backend serves
                continue
            if _agrees(engine.run_patches, cpu.run_patches, card.size_multiple):
                correct.append((_seconds_per_call(engine.run_patches), engine))
        if correct:
            return min(correct, key=lambda timed: timed[0])[1]
    return cpu


def _gpu_candidates(model_path: Path, card: ModelCard, threads: int) -> list[Callable[[], _Engine]]:
    candidates: list[Callable[[], _Engine]] = []
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            from appliance.torch_backend import cuda_dtypes

            candidates += [partial(_torch_engine, model_path, card, dtype) for dtype in cuda_dtypes()]
    if ort_has_cuda():
        providers = [CUDA]
        candidates.append(lambda: _Engine("onnx-cuda", _onnx_runner(model_path, card, providers, threads)))
    return candidates


def _agrees(candidate: BatchFn, reference: BatchFn, multiple: int) -> bool:
    """True when `candidate` matches the fp32 CPU reference on a fixed pseudo-random probe patch."""
    side = max(64, multiple)
    probe = np.random.default_rng(0).random((1, 1, side, side), dtype=np.float32)
    try:
        diff = np.abs(candidate(probe) - reference(probe))
    except Exception:
        return False
    return bool(np.isfinite(diff).all() and diff.max() <= GPU_AGREEMENT_TOLERANCE)


def _seconds_per_call(run: BatchFn, side: int = 1024, calls: int = 3) -> float:
    """Best wall time of `calls` runs on one (1, 1, side, side) patch, after a warm-up call."""
    probe = np.random.default_rng(1).random((1, 1, side, side), dtype=np.float32)
    run(probe)
    best = math.inf
    for _ in range(calls):
        started = time.perf_counter()
        run(probe)  # returns host numpy: the device work is finished when it returns
        best = min(best, time.perf_counter() - started)
    return best


def _onnx_runner(model_path: Path, card: ModelCard, providers: list[str], threads: int) -> BatchFn:
    session = open_session(model_path, threads, providers)

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([card.output_name], {card.input_name: batch})[0]

    return run


def _torch_engine(model_path: Path, card: ModelCard, dtype: object | None) -> _Engine:
    """torch.export program next to the .onnx file: on CUDA in `dtype` (default fp16), else fp32 CPU."""
    import torch

    from appliance.torch_backend import TorchDeblur

    if torch.cuda.is_available():
        dtype = dtype if dtype is not None else torch.float16
        deblur = TorchDeblur(model_path.with_suffix(".pt2"), card.size_multiple, "cuda", dtype)
        name = "torch-cuda-" + str(dtype).removeprefix("torch.")
        return _Engine(name, deblur.run_patches, deblur.restore_tiles)
    deblur = TorchDeblur(model_path.with_suffix(".pt2"), card.size_multiple, "cpu", torch.float32)
    return _Engine("torch-cpu", deblur.run_patches)
