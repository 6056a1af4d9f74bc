"""Leave-one-source-out deblur training (issue 14): one run per source of the packed file, left out, in
one wall-clock budget, on one device.

    python -m models.deblur.loso --config models/deblur/loso.yaml --device cuda --data .gpu/em_train.npz \
        --out-dir $OUT/loso --budget-s 390 --workers 3

Folds: for every source of the packed file (`models.deblur.pack_data`), a run of `--config` without it
(`models.deblur.train --exclude-source`), named `loso-<source>`; plus `loso-all`, the same recipe on
every source (the candidate to ship). A source the recipe's parent weights have already seen (the
bundled model was trained on isbi2012) is trained from `--scratch-config` instead, when given, so its
fold never saw it at all. `--init-dir` continues each fold from an earlier round's weights instead
(each fold from its own, so a fold still never sees its source). Runs go round-robin to `--workers`
processes on the device; each worker's runs share its budget equally (each run's `--max-minutes` covers
its own start-up).

Writes OUT/<run>/{best.pt,metrics.json,config.yaml} (train.py's layout) and, because at most 8 files come
back from a GPU machine, OUT/loso-weights-<worker>.tar (best.pt of each of its runs, as <run>.pt) and
OUT/loso.json: per run the fold, exit code, steps, seconds per step and best validation PSNR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Seconds a run may outlast its own cap (final validation, saving, interpreter exit) before it is killed.
KILL_GRACE_S = 60
ALL_SOURCES = "all"


@dataclass(frozen=True)
class Fold:
    """One training run: its name, the source it leaves out (None: none) and its recipe."""

    run_name: str
    held_out: str | None
    config: Path


@dataclass
class FoldResult:
    run_name: str
    held_out: str | None
    config: str
    worker: int
    exit_code: int | None
    seconds: float
    steps_done: int | None = None
    seconds_per_step: float | None = None
    best_val_psnr: float | None = None
    val_input_psnr: float | None = None


def folds(sources: list[str], config: Path, scratch_config: Path | None, seen_by_parent: tuple[str, ...]) -> list[Fold]:
    """One fold per source (sorted), then `loso-all`."""
    out = []
    for source in sorted(sources):
        recipe = scratch_config if scratch_config is not None and source in seen_by_parent else config
        out.append(Fold(f"loso-{source}", source, recipe))
    out.append(Fold(f"loso-{ALL_SOURCES}", None, config))
    return out


def packed_sources(data: Path) -> list[str]:
    from models.deblur.pack_data import load_packed

    return sorted({image.source for image in load_packed(data)})


def run_fold(fold: Fold, worker: int, args: argparse.Namespace, minutes: float) -> FoldResult:
    """Train one fold in a subprocess (its log: OUT/<run>.log); read its metrics.json."""
    command = [
        sys.executable,
        "-m",
        "models.deblur.train",
        "--config",
        str(fold.config),
        "--device",
        args.device,
        "--data",
        str(args.data),
        "--out-dir",
        str(args.out_dir),
        "--max-minutes",
        f"{minutes:.3f}",
        "--run-name",
        fold.run_name,
    ]
    if fold.held_out is not None:
        command += ["--exclude-source", fold.held_out]
    if args.init_dir is not None:
        command += ["--init-checkpoint", str((args.init_dir / f"{fold.run_name}.pt").resolve())]
    started = time.monotonic()
    with open(args.out_dir / f"{fold.run_name}.log", "w", encoding="utf-8") as log:
        try:
            code: int | None = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, timeout=minutes * 60 + KILL_GRACE_S, cwd=REPO_ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    result = FoldResult(
        fold.run_name, fold.held_out, str(fold.config), worker, code, round(time.monotonic() - started, 1)
    )
    metrics_path = args.out_dir / fold.run_name / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        result.steps_done = metrics.get("steps_done")
        result.seconds_per_step = metrics.get("seconds_per_step")
        result.best_val_psnr = metrics.get("best_val_psnr")
        result.val_input_psnr = metrics.get("val_input_psnr")
    print(json.dumps(asdict(result)), flush=True)
    return result


def run_worker(worker: int, assigned: list[Fold], args: argparse.Namespace, budget_s: float) -> list[FoldResult]:
    """The worker's folds one after another, each capped at an equal share of the worker's budget."""
    minutes = budget_s / max(1, len(assigned)) / 60.0
    results = [run_fold(fold, worker, args, minutes) for fold in assigned]
    weights = [r for r in results if (args.out_dir / r.run_name / "best.pt").is_file()]
    if weights:
        partial = args.out_dir / f"loso-weights-{worker}.tar.partial"
        with tarfile.open(partial, "w") as tar:
            for r in weights:
                tar.add(args.out_dir / r.run_name / "best.pt", arcname=f"{r.run_name}.pt")
                tar.add(args.out_dir / r.run_name / "metrics.json", arcname=f"{r.run_name}.metrics.json")
        os.replace(partial, args.out_dir / f"loso-weights-{worker}.tar")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("models/deblur/loso.yaml"))
    parser.add_argument("--scratch-config", type=Path, default=Path("models/deblur/loso_scratch.yaml"))
    parser.add_argument(
        "--seen-by-parent",
        nargs="*",
        default=["isbi2012"],
        help="sources the recipe's parent weights were trained on (their folds use --scratch-config)",
    )
    parser.add_argument("--data", type=Path, required=True, help="packed .npz (models.deblur.pack_data)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, required=True, help="wall-clock for all the training")
    parser.add_argument("--workers", type=int, default=3, help="training processes at once on the device")
    parser.add_argument("--only", nargs="*", default=None, help="run only these folds (run names)")
    parser.add_argument(
        "--init-dir",
        type=Path,
        default=None,
        help="continue each fold from <init-dir>/<run>.pt (an earlier round's weights, e.g. into a deeper "
        "model); every fold's file must be there",
    )
    args = parser.parse_args()
    if args.workers < 1 or args.budget_s <= 0:
        parser.error("--workers must be >= 1 and --budget-s > 0")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file (python -m models.deblur.pack_data --out {args.data})")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plan = folds(packed_sources(args.data), args.config, args.scratch_config, tuple(args.seen_by_parent))
    if args.only is not None:
        plan = [fold for fold in plan if fold.run_name in set(args.only)]
        if not plan:
            parser.error(f"--only {args.only}: no such fold")
    if args.init_dir is not None:
        absent = [f.run_name for f in plan if not (args.init_dir / f"{f.run_name}.pt").is_file()]
        if absent:
            parser.error(f"--init-dir {args.init_dir}: no checkpoint for {absent}")
    assigned = [plan[w :: args.workers] for w in range(min(args.workers, len(plan)))]
    print(json.dumps({"folds": [asdict(f) | {"config": str(f.config)} for f in plan], "workers": len(assigned)}))
    with ThreadPoolExecutor(len(assigned)) as pool:
        futures = [pool.submit(run_worker, w, folds_w, args, args.budget_s) for w, folds_w in enumerate(assigned)]
        results = [r for future in futures for r in future.result()]
    summary = {
        "budget_s": args.budget_s,
        "workers": len(assigned),
        "device": args.device,
        "runs": [asdict(r) for r in results],
    }
    (args.out_dir / "loso.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    failed = [r.run_name for r in results if r.exit_code != 0]
    if failed:
        print(f"folds that failed: {failed}", flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
