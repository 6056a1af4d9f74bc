"""Start BlurNet from an exported detector (ONNX): the recipe's `init_from_onnx`, for fine-tuning.

The bundled blurnet-v1 exists only as ONNX (no torch checkpoint). Export folded each batch norm into
its convolution, so the ONNX holds one fused weight W and bias b per conv. Loaded here as conv weight
W and a batch norm that computes `(Wx - m) / sqrt(v + eps) * sqrt(v + eps) + (b + m) = Wx + b`, with
(m, v) the per-channel mean and variance of Wx on real training patches: then the network equals the
ONNX in eval mode exactly, and in train mode (batch statistics ~ m, v) nearly, so fine-tuning starts
from v1's function instead of a re-normalised one. `check_matches_onnx` proves the eval-mode equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from appliance.sidecar import DetectorSidecar
from models.detector.corpus import CORPUS_DIR, ISBI_SOURCE
from models.detector.export import check_matches_onnx
from models.detector.network import BlurNet

HEAD_LINEARS = ("head.0", "head.2")  # BlurNet's head: Linear, ReLU, Linear (names as torch exports them)


def onnx_weights(onnx_path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """(fused (W, b) of each Conv in graph order, the head's initializers by name) of an exported BlurNet."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs = [(init[n.input[1]], init[n.input[2]]) for n in graph.node if n.op_type == "Conv"]
    head = {name: init[name] for name in init if name.startswith("head.")}
    return convs, head


def load_onnx_into(model: BlurNet, onnx_path: Path) -> BlurNet:
    """Copy the ONNX's weights into `model` (same widths), batch norms as identity until matched to data."""
    convs, head = onnx_weights(onnx_path)
    blocks = list(model.features)
    if len(convs) != len(blocks):
        raise ValueError(f"{onnx_path}: {len(convs)} convolutions, the recipe's BlurNet has {len(blocks)}")
    with torch.no_grad():
        for block, (weight, bias) in zip(blocks, convs, strict=True):
            conv, norm = block[0], block[1]
            if tuple(conv.weight.shape) != weight.shape:
                raise ValueError(f"{onnx_path}: conv weight {weight.shape}, the recipe's {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.tensor(weight))
            _set_norm(norm, torch.tensor(bias), torch.zeros_like(norm.running_mean), torch.ones_like(norm.running_var))
        for name in HEAD_LINEARS:
            linear = model.get_submodule(name)
            for field in ("weight", "bias"):
                value = head[f"{name}.{field}"]
                if tuple(getattr(linear, field).shape) != value.shape:
                    raise ValueError(f"{onnx_path}: {name}.{field} {value.shape}, the recipe's BlurNet differs")
                getattr(linear, field).copy_(torch.tensor(value))
    return model


def _set_norm(norm: nn.BatchNorm2d, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Batch norm that maps Wx to Wx + bias when its input has per-channel `mean` and `var`."""
    norm.running_mean.copy_(mean)
    norm.running_var.copy_(var)
    norm.weight.copy_(torch.sqrt(var + norm.eps))
    norm.bias.copy_(bias + mean)


def fold_batch_norms(model: BlurNet) -> BlurNet:
    """Fold each batch norm's eval-mode scale into its conv, leaving it as `+ bias`; function unchanged.

    Makes the fused bias readable whatever the norm's state (a train-mode forward moves its running stats).
    """
    with torch.no_grad():
        for block in model.features:
            conv, norm = block[0], block[1]
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
            conv.weight.mul_(scale[:, None, None, None])
            _set_norm(norm, shift, torch.zeros_like(shift), torch.ones_like(shift))
    return model


def match_batch_norms(model: BlurNet, patches: torch.Tensor) -> BlurNet:
    """Set each batch norm's statistics to its conv's output on `patches` (N, 1, 64, 64); function unchanged."""
    fold_batch_norms(model)
    blocks = list(model.features)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        block[0].register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out))
        for k, block in enumerate(blocks)
    ]
    model.eval()
    try:
        with torch.no_grad():
            model(patches)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for k, block in enumerate(blocks):
            norm, out = block[1], seen[k]
            _set_norm(norm, norm.bias.clone(), out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3)))  # bias: folded
    return model


def warm_start(model: BlurNet, onnx_path: Path, train_patches: torch.Tensor, check_patches: torch.Tensor) -> float:
    """Load the ONNX into `model`, match its batch norms to `train_patches`, prove it on `check_patches`.

    Patches float32 (N, 1, 64, 64) in [0, 1]; returns the largest output difference to the ONNX.
    """
    load_onnx_into(model, onnx_path)
    match_batch_norms(model, train_patches)
    return check_matches_onnx(model, onnx_path, check_patches)


def sources_seen(onnx_path: Path) -> set[str]:
    """The sources an exported detector was trained on, from its sidecar's recipe (corpus: every folder)."""
    recipe = DetectorSidecar.load(onnx_path.with_suffix(".json")).train_config or {}
    seen = {ISBI_SOURCE}
    if recipe.get("data", {}).get("corpus") is not None:
        seen |= {p.name for p in CORPUS_DIR.iterdir() if p.is_dir()}  # its holdout is not in the sidecar
    return seen
