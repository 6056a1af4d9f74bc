"""Export a trained BlurNet checkpoint to ONNX (+ a JSON sidecar) for the appliance runtime.

    python -m models.detector.export models/detector/runs/v1/best.pt

Writes appliance/weights/blur_detector.onnx and blur_detector.json (model_version, patch size, output
layout, training config), then checks ONNX Runtime agrees with torch on random patches.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch

from appliance.detection.patches import PATCH
from appliance.onnx_session import CPU, open_session
from appliance.sidecar import DetectorSidecar
from appliance.weights import BLUR_DETECTOR_MODEL, WEIGHTS_DIR
from models.detector.network import LOG_OFFSET, OUTPUTS, BlurNet
from models.detector.recipe import build_blurnet


def load_checkpoint(checkpoint: Path) -> BlurNet:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = build_blurnet(state["config"]["model"])
    model.load_state_dict(state["state_dict"])
    return model.eval()


def export(checkpoint: Path, out_dir: Path = WEIGHTS_DIR) -> Path:
    """Checkpoint -> out_dir/blur_detector.onnx (dynamic batch) + .json; returns the ONNX path."""
    model = load_checkpoint(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / BLUR_DETECTOR_MODEL.name
    example = torch.rand(4, 1, PATCH, PATCH)
    torch.onnx.export(
        model,
        (example,),
        str(onnx_path),
        input_names=["patches"],
        output_names=["estimates"],
        dynamic_axes={"patches": {0: "n"}, "estimates": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:8]
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    sidecar = DetectorSidecar(
        model_version=f"blurnet-{'v2' if state['config'].get('data', {}).get('corpus') else 'v1'}-{digest}",
        patch=PATCH,
        input=f"patches float32 (N, 1, {PATCH}, {PATCH}) in [0, 1] (pixel / dtype max)",
        outputs=list(OUTPUTS),
        log_offset=LOG_OFFSET,
        epoch=state["epoch"],
        train_config=state["config"],
        intrinsic_c2=_previous_c2(onnx_path.with_suffix(".json")),
    )  # sigma_calibration (and a refitted intrinsic_c2): written by calibrate.py
    sidecar.write(onnx_path.with_suffix(".json"))
    # The runtime trusts this file: prove it computes what the torch model computes.
    check_matches_onnx(
        model,
        onnx_path,
        torch.from_numpy(np.random.default_rng(0).random((16, 1, PATCH, PATCH), dtype=np.float32)),
        tol=1e-3,
    )
    print(f"exported {onnx_path} ({onnx_path.stat().st_size} bytes), {sidecar.model_version}")
    return onnx_path


def check_matches_onnx(model: BlurNet, onnx_path: Path, patches: torch.Tensor, tol: float = 1e-4) -> float:
    """Largest |torch - ONNX Runtime| over `patches` in eval mode; ValueError above `tol`."""
    x = patches.numpy().astype(np.float32)
    want = open_session(onnx_path, threads=1, providers=[CPU]).run(None, {"patches": x})[0]
    model.eval()
    with torch.no_grad():
        got = model(patches).numpy()
    worst = float(np.abs(got - want).max())
    if worst > tol:
        raise ValueError(f"{onnx_path}: ONNX Runtime and the torch BlurNet differ by {worst:.2e} (> {tol:.0e})")
    return worst


def _previous_c2(sidecar_path: Path) -> float | None:
    """The PSF-shape constant of the sidecar being replaced (calibrate.py refits it); None for a first export."""
    return DetectorSidecar.load(sidecar_path).intrinsic_c2 if sidecar_path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    export(parser.parse_args().checkpoint)


if __name__ == "__main__":
    main()
