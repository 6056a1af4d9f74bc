"""Runtime deblur: restore batches of soft-focus tiles with the learned model or classical Wiener.

Backends (`DeblurConfig.backend`):
- ``onnx``      bundled ONNX model in ONNX Runtime (CUDA provider when installed and a GPU exists, else CPU);
- ``torch``     the same weights as a `torch.export` program, fp16 + channels_last on a CUDA GPU;
- ``classical`` Wiener deconvolution with the elliptical Gaussian PSF the blur detector estimated;
- ``auto``      the fastest correct one available: torch on CUDA, else ONNX Runtime CUDA, else ONNX
                Runtime CPU, else classical (no model file). A GPU backend is kept only if it agrees
                with ONNX Runtime CPU on a probe patch.
torch is imported only when a CUDA GPU is visible or the torch backend is asked for.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.assessment import BlurAssessment
from appliance.config import DeblurConfig
from appliance.deconvolution import MIN_DECONV_SIGMA_PX, auto_nsr, gaussian_psf, wiener_deconvolve
from appliance.intensity import from_model_scale, intensity_window, to_model_scale
from appliance.tile_io import TileError, check_tile_pixels
from appliance.tiling import run_tiled

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUNDLED_MODEL = WEIGHTS_DIR / "deblur.onnx"
CLASSICAL_VERSION = "classical-wiener-1"
# fp16 GPU output may differ from fp32 CPU output by this much (model scale, max abs) and still be kept.
GPU_AGREEMENT_TOLERANCE = 0.02

BatchFn = Callable[[np.ndarray], np.ndarray]


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
        run_batch: BatchFn | None,
        model_version: str,
        backend: str,
        cfg: DeblurConfig,
        size_multiple: int = 1,
    ) -> None:
        self._run_batch = run_batch  # None = classical Wiener
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
        run_batch, backend = _choose_learned_backend(cfg.backend, model_path, card)
        return cls(run_batch, f"{card.model_version}+{backend}", backend, cfg, card.size_multiple)

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
        return [self._restore_one(p, a) for p, a in zip(tiles, assessments, strict=True)]

    def _restore_one(self, pixels: np.ndarray, assessment: BlurAssessment) -> np.ndarray:
        window = intensity_window(pixels)
        image = to_model_scale(pixels, window)
        if self._run_batch is None:
            restored = classical_restore(image, assessment)
        else:
            restored = run_tiled(
                image,
                self._run_batch,
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
    # Checked without importing torch: the driver exposes this file on any machine with an NVIDIA GPU.
    return Path("/proc/driver/nvidia/version").exists()


def _choose_learned_backend(requested: str, model_path: Path, card: ModelCard) -> tuple[BatchFn, str]:
    if requested == "torch":
        return _torch_runner(model_path, card), "torch-" + _torch_device()
    cpu = _onnx_runner(model_path, card, ["CPUExecutionProvider"])
    if requested == "auto" and _cuda_visible():
        candidates: list[tuple[str, Callable[[], BatchFn]]] = []
        if importlib.util.find_spec("torch") is not None:
            candidates.append(("torch-cuda-fp16", lambda: _torch_runner(model_path, card)))
        if _ort_has_cuda():
            candidates.append(
                ("onnx-cuda", lambda: _onnx_runner(model_path, card, ["CUDAExecutionProvider"]))
            )
        for name, build in candidates:
            try:
                runner = build()
            except Exception:  # a broken GPU stack must not stop the rig: the next backend serves
                continue
            if _agrees(runner, cpu, card.size_multiple):
                return runner, name
    if requested == "onnx" and _cuda_visible() and _ort_has_cuda():
        return _onnx_runner(model_path, card, ["CUDAExecutionProvider", "CPUExecutionProvider"]), "onnx-cuda"
    return cpu, "onnx-cpu"


def _agrees(candidate: BatchFn, reference: BatchFn, multiple: int) -> bool:
    """True when `candidate` matches the fp32 CPU reference on a fixed pseudo-random probe patch."""
    side = max(64, multiple)
    probe = np.random.default_rng(0).random((1, 1, side, side), dtype=np.float32)
    try:
        diff = np.abs(candidate(probe) - reference(probe))
    except Exception:
        return False
    return bool(np.isfinite(diff).all() and diff.max() <= GPU_AGREEMENT_TOLERANCE)


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _onnx_runner(model_path: Path, card: ModelCard, providers: list[str]) -> BatchFn:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([card.output_name], {card.input_name: batch})[0]

    return run


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_runner(model_path: Path, card: ModelCard) -> BatchFn:
    """torch.export program next to the .onnx file; fp16 + channels_last on CUDA, fp32 on CPU."""
    import torch

    program_path = model_path.with_suffix(".pt2")
    if not program_path.is_file():
        raise FileNotFoundError(
            f"{program_path}: torch backend needs the exported program; run `python -m models.deblur.export`"
        )
    device = torch.device(_torch_device())
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    module = torch.export.load(str(program_path)).module().to(device=device, dtype=dtype)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(batch).to(device=device, dtype=dtype, non_blocking=True)
        if device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return module(inputs).float().cpu().numpy()

    return run
