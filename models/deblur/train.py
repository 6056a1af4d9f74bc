"""Train DeblurNet from one config: `python -m models.deblur.train --config models/deblur/config.yaml`.

Seeded (numpy, torch) and single-process, so the same config on the same machine gives the same
weights, unless the wall-clock cap `train.max_minutes` stops it early (logged in metrics.json).
A config with `init_from` is a fine-tuning stage: it starts from its parent config's checkpoint, and
trains the parent first when that run is missing, so one command reproduces the whole chain.
Writes models/deblur/runs/<run_name>/{best.pt, last.pt, metrics.json, config.yaml}; `best.pt` is the
checkpoint with the highest validation PSNR (validation = the `val` split; `test` is never read here).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.deblur.data import load_images, make_batch
from models.deblur.network import DeblurNet

RUNS_DIR = Path(__file__).resolve().parent / "runs"
REPO_ROOT = Path(__file__).resolve().parents[2]


def load_config(path: Path) -> dict[str, Any]:
    """The training recipe as a dict (see models/deblur/config.yaml for every key)."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def build_model(model_cfg: dict[str, Any]) -> DeblurNet:
    """DeblurNet from the `model:` section of the config."""
    return DeblurNet(
        width=int(model_cfg["width"]),
        enc_blocks=tuple(model_cfg["enc_blocks"]),
        middle_blocks=int(model_cfg["middle_blocks"]),
        dec_blocks=tuple(model_cfg["dec_blocks"]),
        noise_map=bool(model_cfg.get("noise_map", False)),
    )


def pair_kwargs(data_cfg: dict[str, Any], patch: int) -> dict[str, Any]:
    return {
        "patch": patch,
        "margin": int(data_cfg["margin"]),
        "families": list(data_cfg["families"]),
        "sigma_range": tuple(data_cfg["sigma_range"]),
        "sharp_fraction": float(data_cfg["sharp_fraction"]),
        "uint16_fraction": float(data_cfg["uint16_fraction"]),
        "noise_free_fraction": float(data_cfg.get("noise_free_fraction", 0.0)),
    }


def psnr_model_scale(restored: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) per patch with peak 1 on the model scale (the tile's 0.1-99.9 % intensity window)."""
    mse = (restored - sharp).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return -10.0 * torch.log10(mse)


def training_loss(restored: torch.Tensor, sharp: torch.Tensor, kind: str) -> torch.Tensor:
    """"l1": mean absolute error; "psnr": mean of -PSNR per patch (NAFNet's loss; optimises the metric)."""
    if kind == "l1":
        return (restored - sharp).abs().mean()
    if kind == "psnr":
        return -psnr_model_scale(restored, sharp).mean()
    raise ValueError(f"train.loss must be 'l1' or 'psnr', not {kind!r}")


def learning_rate(step: int, cfg: dict[str, Any]) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr over the remaining steps."""
    lr, min_lr, warmup, steps = cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def parent_checkpoint(init_from: dict[str, str]) -> dict[str, Any]:
    """Checkpoint a fine-tuning stage starts from; trains the parent config first if its run is missing.

    init_from: {"config": path relative to the repo root, "checkpoint": "best.pt" | "last.pt"}.
    """
    parent_config = REPO_ROOT / init_from["config"]
    parent_run = RUNS_DIR / load_config(parent_config)["run_name"]
    checkpoint = parent_run / init_from.get("checkpoint", "best.pt")
    if not checkpoint.is_file():
        print(f"parent run {parent_run} missing: training {parent_config} first", flush=True)
        train(parent_config)
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def load_parent_weights(model: DeblurNet, parent_state: dict[str, torch.Tensor]) -> None:
    """Start from a parent's weights; input channels the parent lacks (the noise map) start at zero weight,
    so the fine-tuning begins exactly at the parent's output."""
    state = dict(parent_state)
    intro = model.intro.weight
    parent_intro = state["intro.weight"]
    if parent_intro.shape[1] < intro.shape[1]:
        padded = torch.zeros_like(intro)
        padded[:, : parent_intro.shape[1]] = parent_intro
        state["intro.weight"] = padded
    model.load_state_dict(state)


def train(config_path: Path) -> Path:
    """Run the recipe; returns the run directory."""
    cfg = load_config(config_path)
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    data_cfg, train_cfg = cfg["data"], cfg["train"]
    run_dir = RUNS_DIR / cfg["run_name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_path, run_dir / "config.yaml")

    model = build_model(cfg["model"])
    init_from = cfg.get("init_from")
    if init_from:
        load_parent_weights(model, parent_checkpoint(init_from)["model"])

    train_images = load_images("train")
    # Fixed validation set, independent of the training stream; a fine-tuning stage keeps its parent's.
    val_rng = np.random.default_rng(int(data_cfg.get("val_seed", int(cfg["seed"]) + 1)))
    # Validation keeps the benchmark's noise (no noise-free examples), so every stage is scored alike.
    val_kwargs = {**pair_kwargs(data_cfg, int(data_cfg["val_patch"])), "noise_free_fraction": 0.0}
    val_x, val_y = make_batch(load_images("val"), val_rng, int(data_cfg["val_patches"]), **val_kwargs)
    val_x_t, val_y_t = torch.from_numpy(val_x), torch.from_numpy(val_y)
    val_input_psnr = float(psnr_model_scale(val_x_t, val_y_t).mean())

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(train_cfg["lr"]), weight_decay=float(train_cfg["weight_decay"]),
        betas=tuple(train_cfg["betas"]),
    )
    history: list[dict[str, float]] = []
    best_psnr, started, stopped_early = -math.inf, time.monotonic(), False
    kwargs = pair_kwargs(data_cfg, int(data_cfg["patch"]))
    steps = int(train_cfg["steps"])
    loss_kind = str(train_cfg.get("loss", "l1"))
    step = 0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, train_cfg)
        blurred, sharp = make_batch(train_images, rng, int(data_cfg["batch"]), **kwargs)
        model.train()
        loss = training_loss(model(torch.from_numpy(blurred)), torch.from_numpy(sharp), loss_kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(train_cfg["grad_clip"]))
        optimizer.step()
        minutes = (time.monotonic() - started) / 60.0
        last_step = step == steps - 1 or minutes >= float(train_cfg["max_minutes"])
        if (step + 1) % int(train_cfg["val_every"]) == 0 or last_step:
            model.eval()
            with torch.inference_mode():
                val_psnr = float(psnr_model_scale(model(val_x_t), val_y_t).mean())
            record = {"step": step + 1, "minutes": round(minutes, 2), "train_loss": float(loss.detach()),
                      "val_psnr": val_psnr, "val_gain_db": val_psnr - val_input_psnr}
            history.append(record)
            print(json.dumps(record), flush=True)
            checkpoint = {"model": model.state_dict(), "config": cfg, "step": step + 1, "val_psnr": val_psnr}
            torch.save(checkpoint, run_dir / "last.pt")
            if val_psnr > best_psnr:
                best_psnr = val_psnr
                torch.save(checkpoint, run_dir / "best.pt")
        if last_step:
            stopped_early = step < steps - 1
            break
    summary = {
        "config": cfg, "steps_done": step + 1, "stopped_by_time_cap": stopped_early,
        "val_input_psnr": val_input_psnr, "best_val_psnr": best_psnr, "history": history,
        "minutes": round((time.monotonic() - started) / 60.0, 2),
        "torch": torch.__version__,
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "config.yaml")
    args = parser.parse_args()
    print(f"run written to {train(args.config)}")


if __name__ == "__main__":
    main()
