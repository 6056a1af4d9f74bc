"""Export a trained run to the runtime's weights: ONNX (CPU / ONNX Runtime CUDA) + torch.export (GPU).

`python -m models.deblur.export --run models/deblur/runs/nafnet-w16-v1` writes, atomically,
appliance/weights/deblur.onnx, deblur.pt2 and deblur.json (the sidecar `appliance.sidecar.DeblurSidecar`),
after checking that ONNX Runtime reproduces the torch model. `--name deblur_gpu` writes
deblur_gpu.{onnx,pt2,json} instead (the PSF-aware GPU model beside the CPU default, never over it).
Runs on a CPU; a checkpoint trained on a GPU (fp32 or fp16 tensors) loads the same way.

Sidecar fields for a PSF-aware model (`model.psf_planes: true`): `input_channels` (1 + planes),
`psf_planes` (plane names in channel order after the pixels, `appliance.restoration.psf_planes.PLANE_NAMES`) and
`psf_plane_version`; a blind model has input_channels 1 and psf_planes []. The one input `blurred` is
float32 (N, input_channels, H, W): channel 0 the pixels on the model scale, then the planes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appliance.restoration.psf_planes import PLANE_NAMES, PLANE_VERSION
from appliance.sidecar import DeblurSidecar
from appliance.weights import WEIGHTS_DIR
from models.deblur.network import TILE_SIDE_PX, DeblurNet, conv_gflop
from models.deblur.recipe import build_model

ONNX_OPSET = 17
# Largest |torch - ONNX Runtime| accepted on the model scale (fp32 both; differences are summation order).
EXPORT_TOLERANCE = 1e-4


def load_run(run_dir: Path, checkpoint: str = "best.pt") -> tuple[DeblurNet, dict[str, Any]]:
    """Model in eval mode and the checkpoint dict (config, step, val_psnr) of a training run."""
    state = torch.load(run_dir / checkpoint, map_location="cpu", weights_only=False)
    model = build_model(state["config"]["model"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def export_onnx(model: DeblurNet, path: Path) -> None:
    """ONNX with dynamic batch, height and width (multiples of model.size_multiple)."""
    dummy = torch.zeros(1, model.input_channels, 4 * model.size_multiple, 4 * model.size_multiple)
    axes = {0: "batch", 2: "height", 3: "width"}
    # The TorchScript exporter: no onnxscript dependency, and the graph is plain convolutions.
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=["blurred"],
        output_names=["restored"],
        dynamic_axes={"blurred": axes, "restored": axes},
    )


def export_program(model: DeblurNet, path: Path) -> None:
    """torch.export program (no Python class needed to load it) with dynamic batch, height, width."""
    multiple = model.size_multiple
    dummy = torch.zeros(2, model.input_channels, 8 * multiple, 8 * multiple)
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = {
        "x": {
            0: batch,
            2: multiple * torch.export.Dim("h", min=1, max=1024),
            3: multiple * torch.export.Dim("w", min=1, max=1024),
        }
    }
    program = torch.export.export(model, (dummy,), dynamic_shapes=dynamic)
    torch.export.save(program, str(path))


def max_onnx_difference(model: DeblurNet, onnx_path: Path, seed: int = 0) -> float:
    """Largest |torch - ONNX Runtime CPU| on a random non-square batch (model scale, random planes)."""
    import onnxruntime as ort

    m = model.size_multiple
    probe = np.random.default_rng(seed).random((2, model.input_channels, 12 * m, 20 * m), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(probe)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["restored"], {"blurred": probe})[0]
    return float(np.abs(expected - got).max())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_run(
    run_dir: Path, out_dir: Path = WEIGHTS_DIR, checkpoint: str = "best.pt", name: str = "deblur"
) -> DeblurSidecar:
    """Export `run_dir/checkpoint` into `out_dir` as <name>.onnx, <name>.pt2, <name>.json; returns the sidecar."""
    model, state = load_run(run_dir, checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [f"{name}.onnx", f"{name}.pt2", f"{name}.json"]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        staging = Path(tmp)
        export_onnx(model, staging / files[0])
        difference = max_onnx_difference(model, staging / files[0])
        if difference > EXPORT_TOLERANCE:
            raise RuntimeError(f"ONNX export disagrees with torch by {difference:.2e} > {EXPORT_TOLERANCE}")
        export_program(model, staging / files[1])
        cfg = state["config"]
        sidecar = DeblurSidecar(
            model_version=f"deblur-{cfg['run_name']}-step{state['step']}",
            size_multiple=model.size_multiple,
            input_name="blurred",
            output_name="restored",
            input_channels=model.input_channels,
            psf_planes=PLANE_NAMES if model.plane_count else (),
            psf_plane_version=PLANE_VERSION,
            parameters=sum(p.numel() for p in model.parameters()),
            gflop_per_2400_tile=round(conv_gflop(model, TILE_SIDE_PX, TILE_SIDE_PX), 1),
            val_psnr_model_scale=state["val_psnr"],
            onnx_max_abs_diff_vs_torch=difference,
            onnx_sha256=_sha256(staging / files[0]),
            recipe=cfg,
            torch=torch.__version__,
        )
        sidecar.write(staging / files[2])
        # Rename each file into place only after all three were written and checked.
        for file in files:
            os.replace(staging / file, out_dir / file)
    return sidecar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="models/deblur/runs/<run_name>")
    parser.add_argument("--checkpoint", default="best.pt")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--name", default="deblur", help="file stem: deblur (CPU default) or deblur_gpu")
    args = parser.parse_args()
    sidecar = export_run(args.run, args.out, args.checkpoint, args.name)
    keys = {"model_version", "parameters", "gflop_per_2400_tile", "input_channels", "onnx_max_abs_diff_vs_torch"}
    print(sidecar.model_dump_json(include=keys))


if __name__ == "__main__":
    main()
