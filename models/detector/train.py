"""Train BlurNet from one config file, seeded; then export it to ONNX.

    nice -n 10 python -m models.detector.train --config models/detector/config.yaml

Writes <out_dir>/best.pt (the epoch with the lowest val `select_by`) and <out_dir>/log.json, then calls
export.py, which writes
appliance/weights/blur_detector.onnx + .json, and calibrate.py, which adds the val-split sigma table.
Only the train split is trained on; val picks the epoch and calibrates sigma;
the test split is left to bench/detector_eval.py. With `init_from_onnx` in the recipe
(models/detector/corpus_finetune.yaml) training starts from that exported detector's weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from models.blur_synth import REPO_ROOT
from models.detector.data import PatchSet, cached_patch_set
from models.detector.network import LOG_OFFSET, BlurNet
from models.detector.recipe import build_blurnet, load_detector_recipe
from models.detector.warm_start import warm_start

WARM_STATS_PATCHES = 2048  # training patches that set a warm start's batch-norm statistics
WARM_CHECK_PATCHES = 64  # real val patches on which the loaded network must reproduce the ONNX


def targets(data: PatchSet) -> dict[str, torch.Tensor]:
    theta = np.radians(2.0 * data.angle_deg)
    # Angle is only defined for a visibly elongated PSF: weight by strength and elongation.
    angle_w = data.astigmatic * np.clip(data.sigma / 2.0, 0, 1) * np.clip(data.anisotropy - 1.0, 0, 1)
    return {
        "log_sigma": torch.tensor(np.log(data.sigma + LOG_OFFSET), dtype=torch.float32),
        "log_aniso": torch.tensor(np.log(data.anisotropy), dtype=torch.float32),
        "aniso_w": torch.tensor(np.clip(data.sigma / 2.0, 0, 1), dtype=torch.float32),
        "cos": torch.tensor(np.cos(theta), dtype=torch.float32),
        "sin": torch.tensor(np.sin(theta), dtype=torch.float32),
        "angle_w": torch.tensor(angle_w, dtype=torch.float32),
    }


def dihedral(x: torch.Tensor, t: dict[str, torch.Tensor], k: int, flip: bool) -> tuple[torch.Tensor, dict]:
    """Rotate patches by k*90 deg (and flip columns), with the matching change of the PSF angle.

    Angles are measured from +x towards +y (rows grow downwards). rot90 in (H, W) turns content
    counter-clockwise on screen, i.e. angle -> angle - 90 (2θ -> 2θ - 180: both signs flip).
    A column flip maps angle -> 180 - angle (2θ -> -2θ: sin flips).
    """
    x = torch.rot90(x, k, dims=(2, 3))
    t = dict(t)
    if k % 2 == 1:
        t["cos"], t["sin"] = -t["cos"], -t["sin"]
    if flip:
        x = torch.flip(x, dims=(3,))
        t["sin"] = -t["sin"]
    return x, t


def loss_fn(out: torch.Tensor, t: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    err = out[:, 0] - t["log_sigma"]
    log_var = out[:, 1]
    nll = 0.5 * (torch.exp(-log_var) * err.detach() ** 2 + log_var)  # variance head only
    fit = 0.5 * torch.exp(-log_var.detach()) * err**2 + weights["mse_weight"] * err**2
    aniso = t["aniso_w"] * (out[:, 2] - t["log_aniso"]) ** 2
    angle = t["angle_w"] * ((out[:, 3] - t["cos"]) ** 2 + (out[:, 4] - t["sin"]) ** 2)
    return (nll + fit + weights["aniso_weight"] * aniso + weights["angle_weight"] * angle).mean()


def evaluate(model: BlurNet, x: torch.Tensor, t: dict[str, torch.Tensor], weights: dict[str, float]) -> dict:
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), 1024):
            outs.append(model(x[i : i + 1024]))
    out = torch.cat(outs)
    err = (out[:, 0] - t["log_sigma"]).abs()
    astig = t["angle_w"] > 0.5
    return {
        "loss": float(loss_fn(out, t, weights)),
        "median_abs_err_log_sigma": float(err.median()),
        "mean_abs_err_log_sigma": float(err.mean()),
        "median_abs_err_log_aniso_astigmatic": float((out[astig, 2] - t["log_aniso"][astig]).abs().median()),
    }


def train(
    config_path: Path, holdout: str | None = None, out_dir: Path | None = None, max_minutes: float | None = None
) -> Path:
    """Train per the recipe, never on `holdout` (a source name); stop after max_minutes of epochs if given."""
    recipe = load_detector_recipe(config_path)
    seed, tcfg, dcfg = recipe.seed, recipe.train, recipe.data
    torch.manual_seed(seed)
    torch.set_num_threads(tcfg.threads)
    out_dir = Path(out_dir or recipe.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(recipe.out_dir).parent / "cache"

    t0 = time.time()
    train_set = cached_patch_set("train", dcfg.train_renderings, seed, dcfg, cache, holdout)
    val_set = cached_patch_set("val", dcfg.val_images, seed + 1, dcfg, cache, holdout)
    print(f"data: {len(train_set.sigma)} train / {len(val_set.sigma)} val patches in {time.time() - t0:.0f}s")
    x_train = torch.from_numpy(train_set.as_unit_float()[:, None])
    x_val = torch.from_numpy(val_set.as_unit_float()[:, None])
    t_train, t_val = targets(train_set), targets(val_set)

    model = build_blurnet(recipe.model)
    if recipe.init_from_onnx is not None:
        onnx_path = REPO_ROOT / recipe.init_from_onnx
        worst = warm_start(model, onnx_path, x_train[:WARM_STATS_PATCHES], x_val[:WARM_CHECK_PATCHES])
        print(f"warm start: {onnx_path} (torch vs ONNX on {WARM_CHECK_PATCHES} val patches: {worst:.1e})")
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    epochs, bs = tcfg.epochs, tcfg.batch_size
    steps = epochs * math.ceil(len(x_train) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tcfg.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    weights = {k: float(getattr(tcfg, k)) for k in ("mse_weight", "aniso_weight", "angle_weight")}
    log, best = [], math.inf
    t_train0 = time.time()
    for epoch in range(epochs):
        if max_minutes is not None and epoch > 0 and time.time() - t_train0 > 60 * max_minutes:
            print(f"stopping after {epoch} epochs: the {max_minutes} min cap", flush=True)
            break
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        running, t_epoch = 0.0, time.time()
        for step, i in enumerate(range(0, len(order), bs)):
            idx = order[i : i + bs]
            k, flip = int(torch.randint(4, (1,), generator=gen)), bool(torch.randint(2, (1,), generator=gen))
            x, t = dihedral(x_train[idx], {n: v[idx] for n, v in t_train.items()}, k, flip)
            loss = loss_fn(model(x), t, weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            if step % 100 == 0:
                print(f"epoch {epoch} step {step} loss {running / (step + 1):.4f}", flush=True)
        val = evaluate(model, x_val, t_val, weights)
        entry = {"epoch": epoch, "train_loss": running / (step + 1), "seconds": time.time() - t_epoch, **val}
        log.append(entry)
        print(json.dumps(entry), flush=True)
        if val[tcfg.select_by] < best:  # val never holds the held-out source
            best = val[tcfg.select_by]
            torch.save(
                {"state_dict": model.state_dict(), "config": recipe.as_dict(), "epoch": epoch, "holdout": holdout},
                out_dir / "best.pt",
            )
    (out_dir / "log.json").write_text(json.dumps(log, indent=2))
    return out_dir / "best.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("models/detector/config.yaml"))
    parser.add_argument("--no-export", action="store_true", help="train only")
    parser.add_argument("--holdout", help="leave this source out (em-corpus folder name or isbi2012-train)")
    parser.add_argument("--out-dir", type=Path, help="run folder (default: the recipe's out_dir)")
    parser.add_argument("--export-dir", type=Path, help="write the ONNX + sidecar here, not appliance/weights/")
    parser.add_argument("--max-minutes", type=float, help="stop starting epochs after this many minutes")
    args = parser.parse_args()
    if args.holdout and not args.export_dir and not args.no_export:
        parser.error("--holdout needs --export-dir: a fold's model must not replace the bundled one")
    checkpoint = train(args.config, args.holdout, args.out_dir, args.max_minutes)
    if not args.no_export:
        from appliance.weights import WEIGHTS_DIR
        from models.detector.calibrate import calibrate_all
        from models.detector.export import export

        use_corpus = load_detector_recipe(args.config).data.corpus is not None
        calibrate_all(export(checkpoint, args.export_dir or WEIGHTS_DIR), use_corpus, args.holdout)


if __name__ == "__main__":
    main()
