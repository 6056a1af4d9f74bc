"""Train DeblurNet from one config: `python -m models.deblur.train --config models/deblur/config.yaml`.

Seeded (numpy, torch) and single-process, so the same config on the same machine gives the same
weights, unless the wall-clock cap `train.max_minutes` stops it early (logged in metrics.json).
A config with `init_from` is a fine-tuning stage: it starts from its parent config's checkpoint, and
trains the parent first when that run is missing, so one command reproduces the whole chain.
Writes <out-dir>/<run_name>/{best.pt, last.pt, metrics.json, config.yaml} (out-dir defaults to
models/deblur/runs); `best.pt` is the checkpoint with the highest validation PSNR (validation = the `val`
split; `test` is never read here).

Two data sources, chosen by the config:
- `data.source: isbi` (the CPU stages 1-4): numpy pairs from ../shared/data (`models.deblur.data`);
- `data.source: packed` (gpu.yaml): sharp images from ONE packed .npz (`models.deblur.pack_data`,
  `--data`), blurred, noised and paired with detector-like PSF planes on the training device
  (`models.deblur.gpu_synth`). Needs no ../shared.
`--device cuda` adds bf16 autocast, a fused AdamW, channels_last and TF32; `--device cpu` runs the same
code (how the tests run it). The wall-clock cap counts from the start of `train` (data loading included)
and is checked after every step; the run then validates, saves and exits. With `train.schedule: time`
the cosine learning rate decays over whichever ends first, the steps or the minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml

from models.deblur.network import TILE_SIDE_PX, DeblurNet, NAFBlock, conv_gflop
from models.deblur.recipe import (
    DataConfig,
    DeblurRecipe,
    InitFrom,
    TrainConfig,
    build_model,
    effective_recipe,
    load_recipe,
)

RUNS_DIR = Path(__file__).resolve().parent / "runs"
REPO_ROOT = Path(__file__).resolve().parents[2]
# best.pt / last.pt must come back from a GPU machine whose per-file limit is 16 MiB: above this,
# the checkpoint's floating-point tensors are stored in fp16.
MAX_CHECKPOINT_BYTES = 14_500_000


def pair_kwargs(data: DataConfig, patch: int) -> dict[str, Any]:
    """`models.deblur.data.make_pair` arguments from the `data:` section, at patch side `patch`."""
    return {
        "patch": patch,
        "margin": data.margin,
        "families": list(data.families),
        "sigma_range": data.sigma_range,
        "sharp_fraction": data.sharp_fraction,
        "uint16_fraction": data.uint16_fraction,
        "noise_free_fraction": data.noise_free_fraction,
    }


def psnr_model_scale(restored: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) per patch with peak 1 on the model scale (the tile's 0.1-99.9 % intensity window)."""
    mse = (restored - sharp).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return -10.0 * torch.log10(mse)


def training_loss(restored: torch.Tensor, sharp: torch.Tensor, kind: str) -> torch.Tensor:
    """ "l1": mean absolute error; "psnr": mean of -PSNR per patch (NAFNet's loss; optimises the metric)."""
    if kind == "l1":
        return (restored - sharp).abs().mean()
    if kind == "psnr":
        return -psnr_model_scale(restored, sharp).mean()
    raise ValueError(f"train.loss must be 'l1' or 'psnr', not {kind!r}")


class LrSchedule(Protocol):
    """The schedule fields of a `train:` section (the deblur recipe's TrainConfig, the membrane recipe's)."""

    lr: float
    min_lr: float
    warmup_steps: int
    steps: int
    schedule: str
    max_minutes: float


def learning_rate(step: int, cfg: LrSchedule, minutes: float = 0.0) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr over the remaining steps.

    With `schedule: time` the decay follows whichever is further along: steps or wall-clock minutes
    (of `max_minutes`), so a time-capped run still ends at min_lr.
    """
    lr, min_lr, warmup, steps = cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if cfg.schedule == "time":
        progress = max(progress, minutes / cfg.max_minutes)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def parent_checkpoint(init_from: InitFrom) -> dict[str, Any]:
    """Checkpoint a fine-tuning stage starts from; trains the parent config first if its run is missing.
    An exported program (`init_from.program`) gives its weights as {"model": state_dict}."""
    if init_from.program is not None:
        program = torch.export.load(REPO_ROOT / init_from.program)
        return {"model": {k: v.detach().clone() for k, v in program.state_dict.items()}}
    if init_from.file is not None:
        # Tensors and plain values only (weights_only): a checkpoint file is data, never code.
        return torch.load(REPO_ROOT / init_from.file, map_location="cpu", weights_only=True)
    assert init_from.config is not None  # InitFrom validates: exactly one of the three
    parent_config = REPO_ROOT / init_from.config
    parent_run = RUNS_DIR / load_recipe(parent_config).run_name
    checkpoint = parent_run / init_from.checkpoint
    if not checkpoint.is_file():
        print(f"parent run {parent_run} missing: training {parent_config} first", flush=True)
        train(parent_config)
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def load_parent_weights(model: DeblurNet, parent_state: dict[str, torch.Tensor]) -> None:
    """Start from a parent's weights, so the fine-tuning begins exactly at the parent's output:
    - input channels the parent lacks (the noise map, PSF planes) start at zero weight;
    - NAFBlocks the parent lacks (a deeper model: more blocks per level) keep their fresh weights, whose
      zero residual scales make each new block the identity. Any other missing or extra weight is an error."""
    state = dict(parent_state)
    intro = model.intro.weight
    parent_intro = state["intro.weight"]
    if parent_intro.shape[1] < intro.shape[1]:
        padded = torch.zeros_like(intro)
        padded[:, : parent_intro.shape[1]] = parent_intro
        state["intro.weight"] = padded
    new_blocks = [
        name
        for name, module in model.named_modules()
        if isinstance(module, NAFBlock) and not any(key.startswith(f"{name}.") for key in state)
    ]
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexplained = [key for key in missing if not any(key.startswith(f"{block}.") for block in new_blocks)]
    if unexplained or unexpected:
        raise ValueError(f"parent weights do not fit: missing {unexplained}, unexpected {list(unexpected)}")


@dataclass
class DataSource:
    """Training batches and fixed validation sets on the training device.

    next_batch() -> (inputs (B, C, P, P), sharp (B, 1, P, P)); val: name -> (inputs, sharp), where
    "val" is every validation patch and other names are subsets (per source, blind planes).
    """

    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    val: dict[str, tuple[torch.Tensor, torch.Tensor]]


def val_seed(cfg: DeblurRecipe) -> int:
    """The validation draw's seed: data.val_seed, else seed + 1 (a fine-tuning stage keeps its parent's)."""
    return cfg.data.val_seed if cfg.data.val_seed is not None else cfg.seed + 1


def isbi_source(cfg: DeblurRecipe, rng: np.random.Generator) -> DataSource:
    """The CPU stages' data: numpy pairs from the isbi2012-train splits (`models.deblur.data`)."""
    from models.deblur.data import load_images, make_batch

    data = cfg.data
    train_images = load_images("train")
    # Fixed validation set, independent of the training stream.
    val_rng = np.random.default_rng(val_seed(cfg))
    # Validation keeps the benchmark's noise (no noise-free examples), so every stage is scored alike.
    val_kwargs = {**pair_kwargs(data, data.val_patch), "noise_free_fraction": 0.0}
    val_x, val_y = make_batch(load_images("val"), val_rng, data.val_patches, **val_kwargs)
    kwargs = pair_kwargs(data, data.patch)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        blurred, sharp = make_batch(train_images, rng, data.batch, **kwargs)
        return torch.from_numpy(blurred), torch.from_numpy(sharp)

    return DataSource(next_batch, {"val": (torch.from_numpy(val_x), torch.from_numpy(val_y))})


def packed_source(cfg: DeblurRecipe, data_path: Path, device: torch.device, rng: np.random.Generator) -> DataSource:
    """Sharp images from the packed .npz, degraded on `device` (`models.deblur.gpu_synth`).

    Validation: `data.val_patches` patches spread over the val-split sources (isbi 22-25 and the
    held-out em-corpus source), blurred with the same families and noise (never noise-free) and given
    detector-like PSF planes; "val_blind" is the same patches with blind planes, "val/<source>" each
    source's share. Sources in `data.exclude_sources` are in neither (a leave-one-source-out fold);
    naming a source the file lacks is an error (a typo would silently train on everything).
    """
    from models.deblur.gpu_synth import DeviceImages, SynthConfig, make_batch
    from models.deblur.pack_data import load_packed

    packed = load_packed(data_path)
    excluded = set(cfg.data.exclude_sources)
    unknown = excluded - {p.source for p in packed}
    if unknown:
        known = sorted({p.source for p in packed})
        raise ValueError(f"{data_path}: exclude_sources {sorted(unknown)} not in the packed file; it has {known}")
    packed = [p for p in packed if p.source not in excluded]
    train = DeviceImages([p.pixels for p in packed if p.split == "train"], device)
    synth = SynthConfig.from_data(cfg.data, psf_planes=cfg.model.psf_planes)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    val_synth = SynthConfig.from_data(
        cfg.data.model_copy(update={"noise_free_fraction": 0.0}), cfg.data.val_patch, cfg.model.psf_planes
    )
    val_rng = np.random.default_rng(val_seed(cfg))
    val_generator = torch.Generator(device=device).manual_seed(val_seed(cfg))
    sources = sorted({p.source for p in packed if p.split == "val"})
    if not sources:
        raise ValueError(f"{data_path}: no validation source left after exclude_sources {sorted(excluded)}")
    per_source = max(1, cfg.data.val_patches // max(1, len(sources)))
    val: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for source in sources:
        images = DeviceImages([p.pixels for p in packed if p.split == "val" and p.source == source], device)
        parts = []
        for first in range(0, per_source, synth.batch):
            chunk = SynthConfig(**{**val_synth.__dict__, "batch": min(synth.batch, per_source - first)})
            parts.append(make_batch(images, val_rng, val_generator, chunk))
        val[f"val/{source}"] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    inputs = torch.cat([x for x, _ in val.values()])
    val["val"] = (inputs, torch.cat([y for _, y in val.values()]))
    if cfg.model.psf_planes:
        blind = inputs.clone()
        blind[:, 1:] = 0.0
        val["val_blind"] = (blind, val["val"][1])
    return DataSource(lambda: make_batch(train, rng, generator, synth), val)


def backward_step(
    model: DeblurNet,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    sharp: torch.Tensor,
    train_cfg: TrainConfig,
    amp: Callable[[], contextlib.AbstractContextManager],
) -> torch.Tensor:
    """One batch's forward and backward pass, gradients clipped; the loss. The optimizer step is the caller's."""
    if inputs.is_cuda:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with amp():
        restored = model(inputs)
    loss = training_loss(restored.float(), sharp, train_cfg.loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
    return loss


def make_optimizer(model: DeblurNet, train_cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW from the `train:` section; fused (one kernel for all parameters) on CUDA."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        betas=train_cfg.betas,
        fused=fused or None,
    )


def evaluate(model: DeblurNet, inputs: torch.Tensor, sharp: torch.Tensor, chunk: int, amp: Any) -> float:
    """Mean PSNR (model scale) of the model's output over a validation set, `chunk` patches at a time."""
    model.eval()
    scores = []
    with torch.inference_mode():
        for first in range(0, len(inputs), chunk):
            with amp():
                restored = model(inputs[first : first + chunk])
            scores.append(psnr_model_scale(restored.float(), sharp[first : first + chunk]))
    model.train()
    return float(torch.cat(scores).mean())


def checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    """The serialised checkpoint; fp16 tensors when fp32 would exceed MAX_CHECKPOINT_BYTES."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    if buffer.tell() <= MAX_CHECKPOINT_BYTES:
        return buffer.getvalue()
    halved = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    buffer = io.BytesIO()
    torch.save({**checkpoint, "model": halved, "stored_dtype": "float16"}, buffer)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write then rename: a run killed mid-write never leaves a truncated checkpoint or metrics file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def device_setup(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """Backend switches for `device`; returns the autocast context factory (bf16 on CUDA, none on CPU)."""
    if device.type != "cuda":
        return contextlib.nullcontext
    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def to_device(model: DeblurNet, device: torch.device) -> DeblurNet:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def train(
    config_path: Path,
    device: str | None = None,
    data_path: Path | None = None,
    out_dir: Path | None = None,
    max_minutes: float | None = None,
    exclude_sources: tuple[str, ...] = (),
    run_name: str | None = None,
    init_checkpoint: Path | None = None,
) -> Path:
    """Run the recipe; returns the run directory. Arguments override the config (see `main`)."""
    started = time.monotonic()
    cfg = effective_recipe(config_path, data_path, max_minutes, device, exclude_sources, run_name, init_checkpoint)
    recorded = cfg.as_dict()  # every effective value, kept with the run, its checkpoints and the export
    torch_device = torch.device(cfg.device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data_cfg, train_cfg = cfg.data, cfg.train
    run_dir = Path(out_dir if out_dir is not None else RUNS_DIR) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False), encoding="utf-8")

    model = build_model(cfg.model)
    if cfg.init_from is not None:
        load_parent_weights(model, parent_checkpoint(cfg.init_from)["model"])
    size = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "gflop_per_2400_tile": round(conv_gflop(model, TILE_SIDE_PX, TILE_SIDE_PX), 1),
    }
    print(json.dumps(size), flush=True)
    model = to_device(model, torch_device)
    amp = device_setup(torch_device)

    if data_cfg.source == "packed":
        if not data_cfg.packed:
            raise ValueError("data.source: packed needs the packed file: pass --data PATH.npz (pack_data.py)")
        source = packed_source(cfg, Path(data_cfg.packed), torch_device, rng)
    else:
        source = isbi_source(cfg, rng)
    val_input_psnr = float(psnr_model_scale(source.val["val"][0][:, :1], source.val["val"][1]).mean())
    val_chunk = data_cfg.val_chunk or data_cfg.batch

    optimizer = make_optimizer(model, train_cfg, fused=torch_device.type == "cuda")
    optimizer_kind = "adamw-fused" if torch_device.type == "cuda" else "adamw"
    history: list[dict[str, float]] = []
    best_psnr, stopped_early = -math.inf, False
    steps = train_cfg.steps
    cap_minutes = train_cfg.max_minutes
    loop_started = time.monotonic()
    step = 0

    def summary() -> dict[str, Any]:
        elapsed = time.monotonic() - loop_started
        return {
            "config": recorded,
            "steps_done": step + 1,
            "stopped_by_time_cap": stopped_early,
            "val_input_psnr": val_input_psnr,
            "best_val_psnr": best_psnr,
            "history": history,
            "minutes": round((time.monotonic() - started) / 60.0, 3),
            "seconds_per_step": round(elapsed / (step + 1), 4),
            **size,
            "device": torch.cuda.get_device_name() if torch_device.type == "cuda" else "cpu",
            "optimizer": optimizer_kind,
            "torch": torch.__version__,
        }

    model.train()
    for step in range(steps):
        minutes = (time.monotonic() - started) / 60.0
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, train_cfg, minutes)
        loss = backward_step(model, optimizer, *source.next_batch(), train_cfg, amp)
        try:
            optimizer.step()
        except RuntimeError as exc:
            if step > 0 or optimizer_kind != "adamw-fused":
                raise
            # The fused kernel's layout checks have refused channels_last parameters on some torch builds;
            # a one-shot GPU run must not die of it: the first step is redone with the foreach kernel.
            print(f"fused AdamW failed ({exc}); using the foreach AdamW", flush=True)
            optimizer = make_optimizer(model, train_cfg, fused=False)
            optimizer.param_groups[0]["lr"] = learning_rate(step, train_cfg, minutes)
            optimizer.step()
            optimizer_kind = f"adamw-foreach (fused failed: {exc})"
        minutes = (time.monotonic() - started) / 60.0
        last_step = step == steps - 1 or minutes >= cap_minutes
        if (step + 1) % train_cfg.val_every == 0 or last_step:
            scores = {name: evaluate(model, x, y, val_chunk, amp) for name, (x, y) in source.val.items()}
            record = {
                "step": step + 1,
                "minutes": round(minutes, 3),
                "train_loss": float(loss.detach()),
                "val_psnr": scores["val"],
                "val_gain_db": scores["val"] - val_input_psnr,
                **{f"{name}_psnr": v for name, v in scores.items() if name != "val"},
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append(record)
            print(json.dumps(record), flush=True)
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            checkpoint = {"model": state, "config": recorded, "step": step + 1, "val_psnr": scores["val"]}
            data = checkpoint_bytes(checkpoint)
            write_atomic(run_dir / "last.pt", data)
            if scores["val"] > best_psnr:
                best_psnr = scores["val"]
                write_atomic(run_dir / "best.pt", data)
            stopped_early = last_step and step < steps - 1
            write_atomic(run_dir / "metrics.json", json.dumps(summary(), indent=2).encode())
        if last_step:
            break
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "config.yaml")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="overrides the config's device")
    parser.add_argument("--data", type=Path, default=None, help="packed .npz (models.deblur.pack_data)")
    parser.add_argument("--out-dir", type=Path, default=None, help="runs folder (default models/deblur/runs)")
    parser.add_argument("--max-minutes", type=float, default=None, help="overrides train.max_minutes")
    parser.add_argument("--exclude-source", action="append", default=[], help="packed source to leave out (repeatable)")
    parser.add_argument("--run-name", default=None, help="overrides run_name (the run's folder)")
    parser.add_argument(
        "--init-checkpoint", type=Path, default=None, help="start from this run checkpoint (overrides init_from)"
    )
    args = parser.parse_args()
    run_dir = train(
        args.config,
        args.device,
        args.data,
        args.out_dir,
        args.max_minutes,
        tuple(args.exclude_source),
        args.run_name,
        args.init_checkpoint,
    )
    print(f"run written to {run_dir}")


if __name__ == "__main__":
    main()
