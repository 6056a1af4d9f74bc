"""Rebuild the bundled torch.export program from the ONNX weights, for a torch that cannot load it.

`python -m models.deblur.rebuild_program [--weights appliance/weights/deblur.onnx]` reads the network
recipe from the sidecar (deblur.json `recipe.model`) and the parameters from the ONNX initializers (the
exporter keeps the state-dict names), checks the rebuilt network against ONNX Runtime, and rewrites
deblur.pt2 next to it. A .pt2 is only loadable by a torch as new as the one that saved it; the ONNX file
and this rebuild serve any torch (e.g. a GPU machine with an older image).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from appliance.sidecar import DeblurSidecar
from appliance.weights import DEBLUR_MODEL
from models.deblur.export import EXPORT_TOLERANCE, export_program, max_onnx_difference
from models.deblur.network import DeblurNet
from models.deblur.recipe import build_model


def network_from_onnx(onnx_path: Path) -> DeblurNet:
    """DeblurNet with the ONNX file's weights, built from the recipe in its sidecar."""
    sidecar = DeblurSidecar.for_model(onnx_path)
    if sidecar.recipe is None:
        raise SystemExit(f"{onnx_path.with_suffix('.json')}: no recipe to rebuild the network from")
    model = build_model(sidecar.recipe["model"])
    weights = {
        init.name: torch.from_numpy(np.array(numpy_helper.to_array(init)))
        for init in onnx.load(str(onnx_path)).graph.initializer
    }
    state = {name: weights[name] for name in model.state_dict()}
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEBLUR_MODEL)
    args = parser.parse_args()
    model = network_from_onnx(args.weights)
    difference = max_onnx_difference(model, args.weights)
    if difference > EXPORT_TOLERANCE:
        raise SystemExit(f"{args.weights}: rebuilt network differs from ONNX Runtime by {difference:.2e}")
    export_program(model, args.weights.with_suffix(".pt2"))
    print(f"rebuilt {args.weights.with_suffix('.pt2')} with torch {torch.__version__} (max |diff| {difference:.1e})")


if __name__ == "__main__":
    main()
