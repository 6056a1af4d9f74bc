"""Adapt a deblur model to one rig: fine-tune it on the rig's own known-good tiles (issue 14).

    python -m models.deblur.adapt TILES... --out /etc/em-appliance/deblur-rig.onnx \
        [--base appliance/weights/deblur.onnx] [--steps 200] [--device cpu|cuda]

A blind model trained on other instruments restores a new instrument's tiles 1-2 dB short of what a
deconvolution that knows the PSF gets; most of that is the specimen's look, not capacity
(models/deblur/MODEL_CARD.md). The rig's calibration tiles carry that look. This command blurs and noises
them as training did (`models/deblur/adapt.yaml`: every PSF family, sigma 0.4-3.5 px, the rig's bit
depth), fine-tunes the base model on them and exports the result beside nothing else: `--out` names the
.onnx; the .pt2 and the sidecar .json land beside it. Point `deblur.model_path` at it, then run
`python -m appliance calibrate` with that rig config, so the restoration blend is measured with the
adapted model (docs/calibration.md).

Safety: the base and the adapted model are both scored on one fixed draw of blurred patches of the same
tiles; unless the adapted model restores them better, nothing is written and the command fails. The
sidecar's `recipe.adaptation` records the base model, the tiles (names and SHA-256 of their pixels), the
steps and both scores. Use the same known-good tiles as for `calibrate` (5-20 in-focus tiles of one rig):
what is learned is what they look like sharp.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appliance.detection.calibration import MIN_TILES
from appliance.sidecar import DeblurSidecar, SidecarError
from appliance.tile_io import TileError, check_tile_pixels, read_tile
from appliance.weights import WEIGHTS_DIR
from models.deblur.export import export_run
from models.deblur.gpu_synth import DeviceImages, SynthConfig, make_batch
from models.deblur.recipe import DeblurRecipe, InitFrom, ModelConfig, build_model, load_recipe
from models.deblur.train import (
    backward_step,
    device_setup,
    evaluate,
    learning_rate,
    load_parent_weights,
    make_optimizer,
    parent_checkpoint,
    to_device,
)

ADAPT_RECIPE = Path(__file__).resolve().parent / "adapt.yaml"
BASE_MODEL = WEIGHTS_DIR / "deblur.onnx"
MIN_PATCH = 64  # training patches smaller than this see too little context for sigma 3.5 px blur


class AdaptError(ValueError):
    """The model cannot be adapted; the message names the tile or the problem. Nothing was written."""


@dataclass(frozen=True)
class Adapted:
    """What an adaptation did: the exported sidecar, and the validation PSNR (dB, model scale) before/after."""

    sidecar: DeblurSidecar
    base_psnr_db: float
    adapted_psnr_db: float
    steps: int
    seconds: float


def tiles_digest(tiles: Sequence[np.ndarray]) -> str:
    """SHA-256 over the tiles' pixels, shapes and dtypes, in order: which tiles a model was adapted on."""
    digest = hashlib.sha256()
    for tile in tiles:
        digest.update(f"{tile.dtype.str}{tile.shape}".encode())
        digest.update(np.ascontiguousarray(tile).tobytes())
    return digest.hexdigest()


def check_tiles(tiles: Sequence[np.ndarray], names: Sequence[str], margin: int, patch: int) -> int:
    """The training patch side for these tiles; AdaptError naming the tile or the problem if they cannot serve."""
    if len(tiles) < MIN_TILES:
        raise AdaptError(f"adapting needs at least {MIN_TILES} known-good tiles of one rig; got {len(tiles)}")
    for tile, name in zip(tiles, names, strict=True):
        try:
            check_tile_pixels(tile, name)
        except TileError as exc:
            raise AdaptError(str(exc)) from exc
    dtypes = {tile.dtype for tile in tiles}
    if len(dtypes) > 1:
        first: dict[np.dtype, str] = {}
        for tile, name in zip(tiles, names, strict=True):
            first.setdefault(tile.dtype, name)
        listed = ", ".join(f"{name} is {dtype}" for dtype, name in first.items())
        raise AdaptError(f"tiles of one rig share one bit depth: {listed}")
    smallest = min(range(len(tiles)), key=lambda i: min(tiles[i].shape))
    side = min(patch, (min(tiles[smallest].shape) - 2 * margin) // 8 * 8)
    if side < MIN_PATCH:
        raise AdaptError(
            f"{names[smallest]}: {tiles[smallest].shape} is too small to adapt on; every tile needs "
            f">= {MIN_PATCH + 2 * margin} px on a side"
        )
    return side


def base_model(base: Path) -> tuple[DeblurSidecar, dict[str, torch.Tensor]]:
    """The base model's sidecar and weights (its .pt2 beside the .onnx); AdaptError if either is missing."""
    try:
        sidecar = DeblurSidecar.for_model(base)
    except SidecarError as exc:
        raise AdaptError(str(exc)) from exc
    if sidecar.psf_aware:
        raise AdaptError(f"{base}: a PSF-aware model; only blind models are adapted (adapt.py)")
    if sidecar.recipe is None or "model" not in sidecar.recipe:
        raise AdaptError(f"{base.with_suffix('.json')}: no recipe.model in the sidecar; re-export the model")
    program_path = base.with_suffix(".pt2").resolve()
    try:
        state = parent_checkpoint(InitFrom(program=str(program_path)))["model"]
    except (OSError, RuntimeError, ValueError) as exc:
        raise AdaptError(f"{program_path}: cannot load the base model's weights: {exc}") from exc
    return sidecar, state


def adaptation_recipe(
    recipe: DeblurRecipe,
    base: DeblurSidecar,
    patch: int,
    uint16: bool,
    steps: int | None = None,
    lr: float | None = None,
) -> DeblurRecipe:
    """`recipe` (adapt.yaml) with the base model's architecture, this run's patch side and bit depth, and the
    steps and learning rate when given."""
    assert base.recipe is not None  # base_model refuses a sidecar without recipe.model
    data = recipe.data.model_copy(update={"patch": patch, "val_patch": patch, "uint16_fraction": float(uint16)})
    changes = {"steps": steps, "lr": lr}
    train = recipe.train.model_copy(update={k: v for k, v in changes.items() if v is not None})
    model = ModelConfig.model_validate(base.recipe["model"])
    return recipe.model_copy(update={"model": model, "data": data, "train": train})


def adapt(
    tiles: Sequence[np.ndarray],
    names: Sequence[str],
    out: Path,
    base: Path = BASE_MODEL,
    steps: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = False,
    lr: float | None = None,
) -> Adapted:
    """Fine-tune the blind model `base` (.onnx, with .pt2 and .json beside it) on `tiles` and export it as
    `out` (.onnx, .pt2, .json), atomically; AdaptError (nothing written) if the tiles cannot serve or the
    adapted model is not better on them (module docstring)."""
    started = time.monotonic()
    if out.suffix != ".onnx":
        raise AdaptError(f"{out}: --out names the adapted model's .onnx file")
    if out.resolve() == Path(base).resolve():
        raise AdaptError(f"{out}: the adapted model never replaces its base; choose another --out")
    if steps is not None and steps < 1:
        raise AdaptError(f"--steps {steps}: adapting takes at least 1 step")
    if lr is not None and not lr > 0:
        raise AdaptError(f"--lr {lr}: the learning rate must be > 0")
    defaults = load_recipe(ADAPT_RECIPE)
    patch = check_tiles(tiles, names, defaults.data.margin, defaults.data.patch)
    base_sidecar, base_state = base_model(Path(base))
    recipe = adaptation_recipe(defaults, base_sidecar, patch, tiles[0].dtype == np.uint16, steps, lr)
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise AdaptError("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)

    model = build_model(recipe.model)
    load_parent_weights(model, base_state)
    model = to_device(model, torch_device)
    amp = device_setup(torch_device)
    images = DeviceImages(list(tiles), torch_device)
    synth = SynthConfig.from_data(recipe.data, psf_planes=False)
    val_synth = SynthConfig.from_data(
        recipe.data.model_copy(update={"noise_free_fraction": 0.0, "batch": recipe.data.val_patches}), psf_planes=False
    )
    assert recipe.data.val_seed is not None  # adapt.yaml sets it: the same draw before and after
    val_x, val_y = make_batch(
        images,
        np.random.default_rng(recipe.data.val_seed),
        torch.Generator(device=torch_device).manual_seed(recipe.data.val_seed),
        val_synth,
    )
    chunk = recipe.data.batch
    base_psnr = evaluate(model, val_x, val_y, chunk, amp)

    rng = np.random.default_rng(recipe.seed)
    generator = torch.Generator(device=torch_device).manual_seed(recipe.seed)
    optimizer = make_optimizer(model, recipe.train, fused=torch_device.type == "cuda")
    steps_done = 0
    model.train()
    with _progress(progress, recipe.train.steps) as advance:
        for step in range(recipe.train.steps):
            minutes = (time.monotonic() - started) / 60.0
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, recipe.train, minutes)
            backward_step(model, optimizer, *make_batch(images, rng, generator, synth), recipe.train, amp)
            optimizer.step()
            steps_done = step + 1
            advance()
            if minutes >= recipe.train.max_minutes:
                break
    adapted_psnr = evaluate(model, val_x, val_y, chunk, amp)
    if not adapted_psnr > base_psnr:
        raise AdaptError(
            f"the adapted model restores the rig's own tiles no better than {base}: {base_psnr:.2f} -> "
            f"{adapted_psnr:.2f} dB (model scale); nothing written, keep the base model"
        )
    digest = tiles_digest(tiles)
    record: dict[str, Any] = {
        **recipe.as_dict(),
        "run_name": f"{_run_name(base_sidecar)}-rig{digest[:8]}",
        "adaptation": {
            "base_model": base_sidecar.model_version,
            "base_onnx_sha256": base_sidecar.onnx_sha256,
            "tiles": list(names),
            "tiles_sha256": digest,
            "steps": steps_done,
            "device": device,
            "val_psnr_db_before": round(base_psnr, 3),
            "val_psnr_db_after": round(adapted_psnr, 3),
        },
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="deblur-adapt-") as tmp:
        checkpoint = {"model": state, "config": record, "step": steps_done, "val_psnr": adapted_psnr}
        torch.save(checkpoint, Path(tmp) / "best.pt")
        out.parent.mkdir(parents=True, exist_ok=True)
        sidecar = export_run(Path(tmp), out.parent, name=out.stem)
    return Adapted(sidecar, base_psnr, adapted_psnr, steps_done, time.monotonic() - started)


def _run_name(sidecar: DeblurSidecar) -> str:
    """The base's run name (its recipe's), or its version: the adapted model's version starts with it."""
    name = (sidecar.recipe or {}).get("run_name")
    return str(name) if name else sidecar.model_version


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over the steps when asked; yields the function that advances it one step."""
    if not show:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("adapting", total=total)
        yield lambda: bar.advance(task)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiles", nargs="+", type=Path, help="known-good in-focus tiles of the rig (PNG/TIFF)")
    parser.add_argument("--out", type=Path, required=True, help="the adapted model's .onnx (.pt2, .json beside)")
    parser.add_argument("--base", type=Path, default=BASE_MODEL, help="the blind model to adapt (.onnx)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: adapt.yaml's)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: adapt.yaml's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    try:
        tiles = [read_tile(path) for path in args.tiles]
        names = [str(p) for p in args.tiles]
        result = adapt(tiles, names, args.out, args.base, args.steps, args.device, args.threads, True, args.lr)
    except (AdaptError, TileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out} ({result.sidecar.model_version}): {result.steps} steps in {result.seconds:.0f} s; "
        f"the rig's tiles, blurred, restore at {result.base_psnr_db:.2f} -> {result.adapted_psnr_db:.2f} dB "
        "(model scale)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
