"""Leave-one-source-out folds of the blur detector: one model per source, trained without it.

    nice -n 10 python -m models.detector.loso --config models/detector/corpus.yaml [--max-minutes 8]

For every source `bench/detector_sources.py` tests (each em-corpus folder and the isbi2012-train
volume), trains the recipe without that source into <runs>/<source>/ and exports the fold's ONNX +
sidecar to <runs>/<source>/weights/ (its sigma table and PSF constant measured on the fold's own
training sources). `python bench/detector_sources.py --loso <runs>` then tests each source with the
model that never saw it. A fold whose weights already exist is skipped (resume after an interruption).

A warm-started recipe (`init_from_onnx`, models/detector/corpus_finetune.yaml) is a clean fold only
for sources the initial model never saw: blurnet-v1 saw isbi2012-train (not its test slices), so that
fold is trained but marked (`init_saw_holdout` in its fold.json, and printed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from appliance.weights import BLUR_DETECTOR_MODEL
from models.blur_synth import REPO_ROOT
from models.detector.calibrate import calibrate_all
from models.detector.corpus import CORPUS_DIR, ISBI_SOURCE, same_source
from models.detector.export import export
from models.detector.recipe import load_detector_recipe
from models.detector.train import train
from models.detector.warm_start import sources_seen

DEFAULT_RUNS = Path("models/detector/runs/loso")


def fold_names(corpus: Path = CORPUS_DIR) -> list[str]:
    """The sources a fold is made for, named as bench/detector_sources.py names them."""
    return [p.name for p in sorted(corpus.iterdir()) if p.is_dir()] + [f"{ISBI_SOURCE}_test"]


def fold_model(runs: Path, source: str) -> Path:
    """Where fold `source`'s exported model lives."""
    return runs / source / "weights" / BLUR_DETECTOR_MODEL.name


def init_saw_holdout(config: Path, source: str) -> bool:
    """True when the recipe warm-starts (`init_from_onnx`) from a detector that was trained on `source`."""
    init = load_detector_recipe(config).init_from_onnx
    return init is not None and any(same_source(source, seen) for seen in sources_seen(REPO_ROOT / init))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("models/detector/corpus.yaml"))
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--max-minutes", type=float, help="per fold: stop starting epochs after this long")
    parser.add_argument("--only", nargs="*", help="train only these folds")
    args = parser.parse_args()
    for source in args.only or fold_names():
        model = fold_model(args.runs, source)
        if model.is_file():
            print(f"{source}: {model} exists, skipped", flush=True)
            continue
        t0 = time.time()
        init_saw_it = init_saw_holdout(args.config, source)
        if init_saw_it:
            print(f"{source}: the recipe's init_from_onnx model was trained on it: not a held-out fold", flush=True)
        checkpoint = train(args.config, holdout=source, out_dir=args.runs / source, max_minutes=args.max_minutes)
        calibrate_all(export(checkpoint, model.parent), use_corpus=True, holdout=source)
        entry = {"source": source, "minutes": round((time.time() - t0) / 60, 1), "init_saw_holdout": init_saw_it}
        (args.runs / source / "fold.json").write_text(json.dumps(entry))
        print(json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
