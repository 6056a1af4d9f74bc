"""Throughput of a freshly trained deblur network on whole MultiSEM tiles, on the machine it trained on.

    python bench/gpu_deblur_speed.py --run RUN_DIR --device cuda --out speed.json

For the GPU training run of bench/gpu_run.sh: the checkpoint is exported with this machine's torch
(`torch.export`, as the runtime loads it) and timed on real-EM 2400 x 2400 tiles blurred by 1.5 px, with
the PSF planes of a constant estimate (the runtime builds them from the detector's verdict), in fp32,
fp16 and bf16, batch 1 and 4. The network alone is timed (host <-> device transfers of the same tile
size are in bench/gpu_suite.py's deblur rows); fp16/bf16 are compared with fp32 in DN after the
intensity map back to uint8.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from appliance.restoration.intensity import from_model_scale, intensity_window, to_model_scale  # noqa: E402
from appliance.restoration.psf_planes import PsfEstimate, psf_planes  # noqa: E402
from bench.gpu_suite import dn_agreement, soft_tiles  # noqa: E402
from bench.replay import multisem_tiles  # noqa: E402
from models.deblur.export import export_program, load_run  # noqa: E402

MARGIN = 32  # reflect context around a whole tile, as DeblurConfig.patch_overlap


def network_input(tile: np.ndarray, planes: bool, multiple: int) -> tuple[np.ndarray, tuple[float, float]]:
    """float32 (1, C, H', W'): the tile on the model scale (+ planes), reflect-padded to a multiple."""
    window = intensity_window(tile)
    image = to_model_scale(tile, window)
    channels = [image[None]]
    if planes:
        channels.append(psf_planes(*image.shape, PsfEstimate(sigma_px=1.5)))
    stacked = np.concatenate(channels)
    height, width = image.shape
    pad_bottom = -(height + 2 * MARGIN) % multiple
    pad_right = -(width + 2 * MARGIN) % multiple
    pad = ((0, 0), (MARGIN, MARGIN + pad_bottom), (MARGIN, MARGIN + pad_right))
    return np.pad(stacked, pad, mode="reflect")[None], window


def _wait_for_device(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:  # kernels run asynchronously: wait before reading the host clock
        torch.cuda.synchronize()


def timed(module: Any, batch: torch.Tensor, seconds: float) -> dict[str, float]:
    """Tiles/s of module(batch) with device synchronisation, after a warm-up call."""
    module(batch)
    _wait_for_device(batch)
    calls, started = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - started < seconds:
        module(batch)
        calls += 1
    _wait_for_device(batch)
    elapsed = time.perf_counter() - started
    return {"tiles_per_s": round(calls * batch.shape[0] / elapsed, 2), "calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="training run directory (best.pt)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--side", type=int, default=2400)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per variant")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model, state = load_run(args.run)
    sharp = [p for _, p in multisem_tiles(2, args.side, "uint8", 0, 0)]
    tile = soft_tiles(sharp, 1)[0]
    planes = bool(state["config"]["model"].get("psf_planes", False))
    array, window = network_input(tile, planes, model.size_multiple)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tile": f"{args.side}x{args.side} uint8",
        "step": state.get("step"),
        "val_psnr": state.get("val_psnr"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "variants": {},
    }
    reference = None
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    with tempfile.TemporaryDirectory() as tmp:  # the runtime's loading path: an exported program
        export_program(model, Path(tmp) / "net.pt2")
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            # fp32 is the reference: true fp32 convolutions, not TF32.
            torch.backends.cudnn.allow_tf32 = dtype != torch.float32
            module = torch.export.load(str(Path(tmp) / "net.pt2")).module().to(device=device, dtype=dtype)
            layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
            module = module.to(memory_format=layout)
            entry: dict[str, Any] = {}
            with torch.inference_mode():
                one = torch.from_numpy(array).to(device, dtype).contiguous(memory_format=layout)
                out = module(one).float()[0, 0, MARGIN : MARGIN + args.side, MARGIN : MARGIN + args.side]
                restored = from_model_scale(out.cpu().numpy(), window, np.dtype(np.uint8))
                if reference is None:
                    reference = restored
                entry["vs_fp32_same_device"] = dn_agreement(restored, reference)
                for batch in (1, 4) if device.type == "cuda" else (1,):
                    stack = one.repeat(batch, 1, 1, 1).contiguous(memory_format=layout)
                    entry[f"batch_{batch}"] = timed(module, stack, args.seconds)
            result["variants"][name] = entry
            print(name, json.dumps(entry), flush=True)
            del module
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
