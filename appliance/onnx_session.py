"""ONNX Runtime sessions for the detector and the deblur model: one place for providers and threads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def ort_has_cuda() -> bool:
    """True when the installed onnxruntime offers CUDA (the onnxruntime-gpu build)."""
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


def open_session(model_path: Path, threads: int, providers: Sequence[str] | None = None) -> Any:
    """InferenceSession with `threads` intra-op threads; providers None = CUDA when offered, else CPU."""
    import onnxruntime as ort  # imported here so classical backends work without it

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if providers is None:
        providers = [CUDA, CPU] if ort_has_cuda() else [CPU]
    return ort.InferenceSession(str(model_path), sess_options=options, providers=list(providers))
