"""Deblur per EM source: the model vs the blurred input and the true-PSF oracle, on other instruments.

    nice -n 10 python bench/deblur_sources.py      # writes bench/results/deblur_sources.{json,md}
    python bench/deblur_sources.py --loso models/deblur/loso   # -> deblur_sources_loso.{json,md}

`--loso DIR`: leave-one-source-out (issue 14): each source is restored by DIR/loso-<source>.onnx, the fold
that `models.deblur.loso` trained without it (exported with `models.deblur.export --name loso-<source>`).
The seed and the order of sources fix the blur and noise draws, so every model sees the same inputs.

`--calibrated`: each tile is restored as a calibrated rig restores it (appliance.restoration.rig_wiener): the
rig calibration is made by the appliance's own `calibrate` on the first 5 other tiles of the tile's source
(the issue's 5 known-good tiles; the tile itself is never among them), its restoration blend measured on
them with the same model (appliance.tools.offline.with_restoration_blend), and the model's output blended
with the Wiener filter against that rig's spectrum. A source whose calibration is refused is restored by
the model alone, and the refusal is recorded.

`--adapt-steps N`: the rig protocol. Each source's first 5 tiles are its rig's known-good tiles and up to
`--tiles` of the others are tested, so no tested tile was seen in any way. With N > 0 the model (the fold
with `--loso`) is first adapted to the rig on those 5 tiles (`models.deblur.adapt`, N steps); with
`--calibrated` the rig is calibrated once on them, its blend measured with the model it restores with.
`--adapt-steps 0` is the same protocol without the adaptation: the baseline to compare with. An adaptation
that does not improve on the rig's own tiles writes nothing (adapt.py), and the base model restores.
`--share-from-base` measures the blend's share with the model before adaptation (it never saw the known-good
tiles) and applies it to the adapted one; `calibrate` measures it with the model it is given, the adapted one.

Sources (bench/detector_sources.load_sources): every folder of ../shared/data/em-corpus (its `soft/`
tiles are soft at the source, never sharp targets, and are not used) plus the isbi2012-train test split
(images 26-29: the training instrument, held-out slices). The bundled CPU model was trained on the
isbi2012-train train split only, so every em-corpus source is unseen by it: each row is a held-out-source
measurement (stricter than leave-one-source-out). A model trained on the corpus (`--model
appliance/weights/deblur_gpu.onnx`, v3) has seen every source: its corpus rows are in-sample.

Per source, up to TILES_PER_SOURCE sharp tiles (evenly spaced over the source's tiles or crops), each
centre-cropped to <= TILE_SIDE px to bound the runtime, and per tile:
1. Blurred copies: gaussian, disk, astigmatic and tilted at sigma 1, 1.5, 2, 3 px, plus Gaussian noise at
   the tile's own Immerkaer level, re-quantised to its dtype (detector_sources.render_with_rig_noise).
2. PSNR (dB, peak = the dtype's full range, 255 or 65535) against the sharp tile as acquired of: the
   blurred input; Wiener and Richardson-Lucy given the TRUE PSF with their parameter picked per tile
   against the truth (deblur_eval.best_wiener / best_rl: an oracle no rig has); the model
   (appliance.restoration.TileRestorer, given a blind assessment by default: `--estimate`). Tilted blur
   has no single PSF: model vs input only there.
3. In focus, sent to the model anyway (a false `soft`), read as deblur_eval's no-blur row: the sharp tile
   plus the rig noise once more, input and model output scored against the sharp tile. The sharp tile
   already carries its instrument's noise, and every PSNR here is against it, noise included: a model
   that also removes some of the tile's own noise is scored as if it had changed the specimen. Also the
   PSNR of the model's output on the tile as acquired against itself (`model_on_acquired`): how much it
   changes a real in-focus tile (no quality judgement: there is no clean reference).

Per source: mean gain of the model over the input and over the better oracle (the better mean of Wiener
and RL per cell, as deblur_eval) per family over sigma 1-3 px, the worst cell, and the verdict of issue
14's done-when line: in every cell the model gains over the input (> 0 dB) and is no more than
ORACLE_MAX_DEFICIT_DB (0.5 dB) below the oracle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # models/ is not installed

from appliance.config import DeblurConfig, DetectorConfig  # noqa: E402
from appliance.detection.calibration import CalibrationError, calibrate  # noqa: E402
from appliance.detection.detector import BlurDetector  # noqa: E402
from appliance.pixels import centre_crop, psnr_db  # noqa: E402
from appliance.restoration.restorer import TileRestorer  # noqa: E402
from appliance.restoration.rig_wiener import RigRestoration  # noqa: E402
from appliance.tools.offline import with_restoration_blend  # noqa: E402
from appliance.weights import DEBLUR_MODEL  # noqa: E402
from bench.deblur_eval import (  # noqa: E402
    ESTIMATES,
    ORACLE_MAX_DEFICIT_DB,
    Assessor,
    best_rl,
    best_wiener,
    make_assessor,
)
from bench.detector_eval import blur_params  # noqa: E402
from bench.detector_sources import (  # noqa: E402
    CORPUS,
    SIGMAS,
    Source,
    add_pixel_size_option,
    calibration_pixel_sizes,
    load_sources,
    print_table,
    render_with_rig_noise,
    stated_pixel_size_nm,
    tile_pixel_size_nm,
    use_pixel_sizes,
)
from models.blur_synth import FAMILIES, psf_kernel, to_unit_float  # noqa: E402
from models.deblur.pack_data import ISBI_SOURCE  # noqa: E402

TILE_SIDE = 256
TILES_PER_SOURCE = 6
CALIBRATION_TILES = 5
METHODS = ("input", "wiener", "rl", "model")
RESULTS = REPO / "bench" / "results"


def packed_source_name(bench_source: str) -> str:
    """The packed training file's name for a bench source (models.deblur.pack_data): the ISBI test split's
    instrument is `isbi2012` there; the em-corpus folders keep their names."""
    return ISBI_SOURCE if bench_source.startswith(ISBI_SOURCE) else bench_source


def pick_tiles(tiles: list[tuple[str, np.ndarray]], count: int, side: int) -> list[tuple[str, np.ndarray]]:
    """Up to `count` of the sharp tiles, evenly spaced over them, centre-cropped to <= side px."""
    n = len(tiles)
    indices = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(count, n))})
    return [(tiles[i][0], centre_crop(tiles[i][1], side)) for i in indices]


def rig_split(
    source: Source, count: int, side: int
) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """The rig protocol (`--adapt-steps`): the source's first CALIBRATION_TILES tiles, its rig's known-good
    tiles, and up to `count` of the others, evenly spaced, centre-cropped to <= side px: the tested tiles."""
    return source.tiles[:CALIBRATION_TILES], pick_tiles(source.tiles[CALIBRATION_TILES:], count, side)


def rig_for_tile(
    source: Source, name: str, restorer: TileRestorer, detector: BlurDetector, calibrate_at_nm: float | None = None
) -> tuple[RigRestoration | None, str]:
    """The restoration a rig calibrated on the first CALIBRATION_TILES other tiles of `source` gives tile `name`
    (module docstring, `--calibrated`), and what happened: "model share W" or why there is none. Where the
    source states its tiles' pixel sizes (detector_sources.PIXEL_SIZE_NM), calibrate gets them and the tile is
    restored against the rig's spectrum at its own, as the ingest does with the tile header's.
    calibrate_at_nm: only other tiles stated at that pixel size are calibration tiles (a rig calibrated at
    one pixel size, restoring tiles of every size)."""
    others = [
        (n, t)
        for n, t in source.tiles
        if n != name and (calibrate_at_nm is None or stated_pixel_size_nm(source.name, n) == calibrate_at_nm)
    ][:CALIBRATION_TILES]
    return rigs_calibrated_on(source, others, [name], restorer, detector)[0]


def rigs_calibrated_on(
    source: Source,
    known_good: list[tuple[str, np.ndarray]],
    names: list[str],
    restorer: TileRestorer,
    detector: BlurDetector,
    share_restorer: TileRestorer | None = None,
) -> list[tuple[RigRestoration | None, str]]:
    """Per tile of `names`, the restoration of the rig calibrated once on `known_good` (its blend measured
    with `restorer`'s model, or with `share_restorer`'s and applied to `restorer`'s: `--share-from-base`), and
    what happened (`rig_for_tile`)."""
    sizes = calibration_pixel_sizes(source.name, [n for n, _ in known_good])
    try:
        calibration = calibrate([t for _, t in known_good], [n for n, _ in known_good], detector, sizes)
    except CalibrationError as exc:
        return [(None, f"calibration refused: {exc}")] * len(names)
    measured_with = share_restorer if share_restorer is not None else restorer
    calibration = with_restoration_blend(calibration, [t for _, t in known_good], measured_with, sizes)
    rigs = []
    for name in names:
        inputs = calibration.restoration_inputs(tile_pixel_size_nm(source.name, name))
        rig = None if inputs is None else RigRestoration(*inputs)
        if rig is not None and share_restorer is not None:
            rig = dataclasses.replace(rig, deblur_model=restorer.weights_version)
        what = "no restoration blend (no spectral reference)" if rig is None else f"model share {rig.model_weight:g}"
        rigs.append((rig, what))
    return rigs


def adapted_model(
    source: Source,
    known_good: list[tuple[str, np.ndarray]],
    base: Path,
    steps: int,
    out_dir: Path,
    device: str,
    threads: int,
) -> tuple[Path, dict[str, Any]]:
    """The model the rig restores with after adapting `base` on its known-good tiles (models.deblur.adapt),
    or `base` when the adaptation is refused; and the record of what happened."""
    from models.deblur.adapt import AdaptError, adapt

    out = out_dir / f"{packed_source_name(source.name)}-rig.onnx"
    try:
        done = adapt([t for _, t in known_good], [n for n, _ in known_good], out, base, steps, device, threads)
    except AdaptError as exc:
        return base, {"refused": str(exc)}
    return out, {
        "model_version": done.sidecar.model_version,
        "steps": done.steps,
        "seconds": round(done.seconds, 1),
        "val_psnr_db_before": round(done.base_psnr_db, 3),
        "val_psnr_db_after": round(done.adapted_psnr_db, 3),
    }


def score_tile(
    restorer: TileRestorer,
    tile: np.ndarray,
    rng: np.random.Generator,
    assess: Assessor,
    sigmas: tuple[float, ...],
    rig: RigRestoration | None = None,
) -> dict[str, dict[str, float]]:
    """PSNR (dB on the tile's dtype range, vs the tile as acquired) per cell `family@sigma` and method, for
    one sharp uint8/uint16 tile (H, W); plus the `in_focus` row (module docstring, point 3). rig: restore as
    that calibrated rig does (`--calibrated`), None: the model alone."""
    scores: dict[str, dict[str, float]] = {}
    blurred, assessments = [], []
    for family in FAMILIES:
        for sigma in sigmas:
            params = blur_params(family, sigma, rng)
            image = render_with_rig_noise(tile, params, rng)
            row = {"input": psnr_db(image, tile)}
            if family != "tilted":
                psf = psf_kernel(params)
                row["wiener"] = psnr_db(best_wiener(to_unit_float(image), psf, tile), tile)
                row["rl"] = psnr_db(best_rl(to_unit_float(image), psf, tile), tile)
            scores[f"{family}@{sigma:g}"] = row
            blurred.append(image)
            assessments.append(assess(image, params))
    noisy = render_with_rig_noise(tile, None, rng)
    inputs = [*blurred, noisy, tile]
    restored = restorer.restore(
        inputs, [*assessments, assess(noisy, None), assess(tile, None)], rigs=[rig] * len(inputs)
    )
    for key, output in zip(scores, restored[: len(blurred)], strict=True):
        scores[key]["model"] = psnr_db(output, tile)
    scores["in_focus"] = {
        "input": psnr_db(noisy, tile),
        "model": psnr_db(restored[-2], tile),
        "model_on_acquired": psnr_db(restored[-1], tile),
    }
    return scores


def cell_margins(cells: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per blurred cell: the model's gain over the input and over the better oracle mean (dB)."""
    margins = {}
    for key, cell in cells.items():
        if key == "in_focus":
            continue
        row = {"over_input_db": cell["model"] - cell["input"]}
        if "wiener" in cell:
            row["over_oracle_db"] = cell["model"] - max(cell["wiener"], cell["rl"])
        margins[key] = row
    return margins


def summarise(cells: dict[str, dict[str, float]]) -> dict:
    """Per family mean gains over sigma (dB), the worst cells and the done-when verdict of one source."""
    margins = cell_margins(cells)
    by_family = {}
    for family in FAMILIES:
        rows = [m for k, m in margins.items() if k.startswith(f"{family}@")]
        by_family[family] = {
            name: float(np.mean([r[name] for r in rows]))
            for name in ("over_input_db", "over_oracle_db")
            if name in rows[0]
        }
    worst_input = min(margins, key=lambda k: margins[k]["over_input_db"])
    with_oracle = [k for k in margins if "over_oracle_db" in margins[k]]
    worst_oracle = min(with_oracle, key=lambda k: margins[k]["over_oracle_db"])
    gains_everywhere = all(m["over_input_db"] > 0 for m in margins.values())
    near_oracle = all(margins[k]["over_oracle_db"] >= -ORACLE_MAX_DEFICIT_DB for k in with_oracle)
    in_focus = cells["in_focus"]
    return {
        "by_family": by_family,
        "worst_over_input": {"cell": worst_input, "db": margins[worst_input]["over_input_db"]},
        "worst_over_oracle": {"cell": worst_oracle, "db": margins[worst_oracle]["over_oracle_db"]},
        "gain_over_input_every_cell": gains_everywhere,
        "within_oracle_every_cell": near_oracle,
        "meets_done_when": gains_everywhere and near_oracle,
        "in_focus_gain_db": in_focus["model"] - in_focus["input"],
        "margins": margins,
    }


def score_source(
    restorer: TileRestorer,
    tiles: list[tuple[str, np.ndarray]],
    rng: np.random.Generator,
    assess: Assessor,
    sigmas: tuple[float, ...] = SIGMAS,
    rigs: list[tuple[RigRestoration | None, str]] | None = None,
) -> dict:
    """Mean PSNR per cell and method over the tiles of one source, and its summary (`summarise`). rigs: per
    tile, its calibrated rig's restoration and what happened (`rig_for_tile`); None: the model alone."""
    per_rig = rigs if rigs is not None else [(None, "")] * len(tiles)
    per_tile = [
        score_tile(restorer, tile, rng, assess, sigmas, rig) for (_, tile), (rig, _) in zip(tiles, per_rig, strict=True)
    ]
    cells = {key: {m: float(np.mean([t[key][m] for t in per_tile])) for m in per_tile[0][key]} for key in per_tile[0]}
    entry = {
        "tiles": [name for name, _ in tiles],
        "tile_shapes": [list(tile.shape) for _, tile in tiles],
        "dtype": str(tiles[0][1].dtype),
        "cells": cells,
        "summary": summarise(cells),
    }
    if rigs is not None:
        entry["calibration"] = [what for _, what in rigs]
    return entry


# ---------------------------------------------------------------------------------------------------
# Report


def _db(value: float) -> str:
    return f"{value:+.2f}"


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    oracle_families = [f for f in FAMILIES if f != "tilted"]
    for name, entry in result["sources"].items():
        s = entry["summary"]
        f = s["by_family"]
        shape = "x".join(str(v) for v in entry["tile_shapes"][0])
        rows.append(
            [
                name,
                f"{len(entry['tiles'])} x {shape} {entry['dtype']}",
                " / ".join(_db(f[fam]["over_input_db"]) for fam in FAMILIES),
                " / ".join(_db(f[fam]["over_oracle_db"]) for fam in oracle_families),
                f"{s['worst_over_input']['cell']} {_db(s['worst_over_input']['db'])}",
                f"{s['worst_over_oracle']['cell']} {_db(s['worst_over_oracle']['db'])}",
                f"{entry['cells']['in_focus']['input']:.2f} -> {entry['cells']['in_focus']['model']:.2f}",
                "yes" if s["meets_done_when"] else "no",
            ]
        )
    return rows


HEADER = [
    "source",
    "tiles",
    "gain over input, dB (gauss / disk / astig / tilted)",
    "vs oracle, dB (gauss / disk / astig)",
    "worst cell vs input",
    "worst cell vs oracle",
    "in focus + rig noise: input -> model, dB",
    "meets done-when",
]


def markdown(result: dict) -> str:
    lines = [
        "# Deblur per source: model vs blurred input and true-PSF oracle",
        "",
        f"Command: `{result['command']}`; model `{result['model_version']}` ({result['held_out']}); "
        f"{result['date']}; runtime {result['runtime_s']:.0f} s on {result['machine']}.",
        f"Per source up to {result['tiles_per_source']} sharp tiles, centre crops <= {result['tile_side']} px; "
        f"sigma {', '.join(f'{s:g}' for s in result['sigmas_px'])} px; rig noise at each tile's own level. "
        "Gains are means over sigma of model PSNR minus input PSNR, and minus the better of oracle Wiener / RL "
        "(true PSF, best parameter per tile). Done-when: every cell gains over the input and is no more than "
        f"{ORACLE_MAX_DEFICIT_DB} dB below the oracle.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    lines += [
        "",
        "Per cell, mean PSNR dB (input / Wiener / RL / model):",
        "",
        "| source | cell | input | Wiener | RL | model |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in result["sources"].items():
        for key, cell in entry["cells"].items():
            if key == "in_focus":
                continue
            values = [f"{cell[m]:.2f}" if m in cell else "-" for m in METHODS]
            lines.append(f"| {name} | {key} | " + " | ".join(values) + " |")
    lines += ["", "In focus, model output on the tile as acquired vs itself (how much it changes it), dB:", ""]
    lines += [f"- {n}: {e['cells']['in_focus']['model_on_acquired']:.2f}" for n, e in result["sources"].items()]
    if result.get("adapt_steps") is not None:
        lines += [
            "",
            f"Rig protocol: each source's first {CALIBRATION_TILES} tiles are its rig's known-good tiles "
            f"(calibration{', adaptation' if result['adapt_steps'] else ''}); the tiles above are the others. "
            f"Adaptation: {result['adapt_steps']} steps per source.",
            "",
        ]
        lines += [f"- {n}: {json.dumps(e['adaptation'])}" for n, e in result["sources"].items() if "adaptation" in e]
    if result.get("calibrated"):
        where = "its source's first 5 tiles" if result.get("adapt_steps") is not None else "5 other tiles of its source"
        lines += ["", f"Rig calibration per tile ({where}; restoration blend measured on them):", ""]
        lines += [f"- {n}: {'; '.join(e['calibration'])}" for n, e in result["sources"].items()]
    lines += ["", "How each source was cut:", ""]
    lines += [f"- {n}: {e['note']}; tiles used: {', '.join(e['tiles'])}" for n, e in result["sources"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--model", type=Path, default=DEBLUR_MODEL, help="ONNX model (sidecar .json beside)")
    parser.add_argument("--estimate", choices=ESTIMATES, default="blind", help="what a PSF-aware model is given")
    parser.add_argument("--tiles", type=int, default=TILES_PER_SOURCE, help="sharp tiles per source")
    parser.add_argument("--side", type=int, default=TILE_SIDE, help="centre crop of each tile (px)")
    parser.add_argument("--sources", nargs="*", help="only these sources (default all)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime CPU threads")
    parser.add_argument(
        "--loso",
        type=Path,
        default=None,
        help="leave-one-source-out: a folder of loso-<source>.onnx (models.deblur.loso, exported); each "
        "source is restored by the model trained without it (overrides --model)",
    )
    parser.add_argument(
        "--calibrated",
        action="store_true",
        help="restore as a rig calibrated on 5 other tiles of the source does: the model blended with the rig "
        "Wiener by the share calibrate measures (module docstring)",
    )
    parser.add_argument(
        "--calibrate-at-nm",
        type=float,
        default=None,
        help="with --calibrated: calibrate only on other tiles stated at this pixel size (PIXEL_SIZE_NM; the rat "
        "SEM has 100, 130 and 180 nm), as a rig calibrated at one pixel size restores tiles of every size",
    )
    parser.add_argument(
        "--adapt-steps",
        type=int,
        default=None,
        help="the rig protocol: each source's first 5 tiles are known-good, the others tested; N > 0 adapts the "
        "model to the rig on those 5 first (models.deblur.adapt, N steps); 0: the same protocol, not adapted",
    )
    parser.add_argument("--adapt-device", choices=("cpu", "cuda"), default="cpu", help="where adaptation trains")
    parser.add_argument("--adapted-dir", type=Path, default=None, help="keep the adapted models here")
    parser.add_argument(
        "--share-from-base",
        action="store_true",
        help="with --adapt-steps N > 0 and --calibrated: the blend's share is measured with the model before "
        "adaptation (which never saw the known-good tiles) and applied to the adapted one",
    )
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument(
        "--out", type=Path, default=None, help="default bench/results/deblur_sources.json (_loso with --loso)"
    )
    add_pixel_size_option(parser)
    args = parser.parse_args()
    if args.adapt_steps is not None and args.adapt_steps < 0:
        parser.error(f"--adapt-steps {args.adapt_steps}: 0 (the rig protocol, not adapted) or more")
    if args.share_from_base and not (args.calibrated and args.adapt_steps):
        parser.error("--share-from-base needs --calibrated and --adapt-steps N > 0")
    if args.adapt_steps is not None and args.calibrate_at_nm is not None:
        parser.error("--calibrate-at-nm picks calibration tiles per tested tile; --adapt-steps takes the first 5")
    use_pixel_sizes(not args.ignore_pixel_sizes)
    if args.out is None:
        loso, calibrated = "_loso" if args.loso is not None else "", "_calibrated" if args.calibrated else ""
        adapted = "" if args.adapt_steps is None else f"_rig{args.adapt_steps}"
        adapted += "_base_share" if args.share_from_base else ""
        stem = f"deblur_sources{loso}{calibrated}{adapted}"
        args.out = RESULTS / f"{stem}.json"
    detector = BlurDetector.from_config(DetectorConfig()) if args.calibrated else None
    start = time.monotonic()
    assess = make_assessor(args.estimate)
    # One seed, sources in a fixed order: the blur and noise draws (and so the input and oracle columns)
    # are the same whichever model runs, so two runs' model columns compare cell by cell.
    rng = np.random.default_rng(args.seed)
    bundled = args.loso is None and args.model.resolve() == DEBLUR_MODEL.resolve()
    restorers: dict[Path, TileRestorer] = {}

    def restorer_for(model_path: Path) -> TileRestorer:
        if model_path not in restorers:
            if not model_path.is_file():
                raise SystemExit(f"{model_path}: no such model (export the fold: python -m models.deblur.export)")
            cfg = DeblurConfig(backend="onnx", model_path=model_path, num_cpus_per_replica=float(args.threads))
            restorers[model_path] = TileRestorer.from_config(cfg)
        return restorers[model_path]

    scratch = tempfile.TemporaryDirectory(prefix="deblur-sources-")
    adapted_dir = args.adapted_dir if args.adapted_dir is not None else Path(scratch.name)
    sources = {}
    for source in load_sources(args.corpus):
        if args.sources and source.name not in args.sources:
            continue
        t0 = time.monotonic()
        model_path = args.model if args.loso is None else args.loso / f"loso-{packed_source_name(source.name)}.onnx"
        adaptation = None
        if args.adapt_steps is None:
            tiles = pick_tiles(source.tiles, args.tiles, args.side)
            restorer = restorer_for(model_path)
            rigs = (
                None
                if detector is None
                else [rig_for_tile(source, name, restorer, detector, args.calibrate_at_nm) for name, _ in tiles]
            )
        else:
            known_good, tiles = rig_split(source, args.tiles, args.side)
            base_path = model_path
            if args.adapt_steps > 0:
                model_path, adaptation = adapted_model(
                    source, known_good, model_path, args.adapt_steps, adapted_dir, args.adapt_device, args.threads
                )
            restorer = restorer_for(model_path)
            names = [name for name, _ in tiles]
            share_restorer = restorer_for(base_path) if args.share_from_base and model_path != base_path else None
            rigs = (
                None
                if detector is None
                else rigs_calibrated_on(source, known_good, names, restorer, detector, share_restorer)
            )
        entry = score_source(restorer, tiles, rng, assess, rigs=rigs)
        sources[source.name] = {"note": source.note, "model_version": restorer.model_version, **entry}
        if adaptation is not None:
            sources[source.name]["adaptation"] = adaptation
        print(f"{source.name}: {len(entry['tiles'])} tiles, {time.monotonic() - t0:.0f} s", flush=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "pixel_sizes": "ignored" if args.ignore_pixel_sizes else "as PIXEL_SIZE_NM states (rat SEM)",
        "calibrate_at_nm": args.calibrate_at_nm,
        "model_version": f"per source, leave-one-source-out ({args.loso})"
        if args.loso is not None
        else restorer_for(args.model).model_version,
        "held_out": "trained on isbi2012-train train only: every em-corpus source held out"
        if bundled
        else "leave-one-source-out: each source restored by the fold trained without it"
        if args.loso is not None
        else "not the bundled model: check its training data (deblur_gpu v3 saw every em-corpus source)",
        "estimate": args.estimate,
        "calibrated": args.calibrated,
        "adapt_steps": args.adapt_steps,
        "adapt_device": args.adapt_device if args.adapt_steps else None,
        "share_from_base": args.share_from_base,
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared, load {os.getloadavg()[0]:.1f}, "
        f"{args.threads} ONNX Runtime thread(s)",
        "tiles_per_source": args.tiles,
        "tile_side": args.side,
        "sigmas_px": list(SIGMAS),
        "families": list(FAMILIES),
        "oracle_max_deficit_db": ORACLE_MAX_DEFICIT_DB,
        "sources": sources,
        "runtime_s": time.monotonic() - start,
    }
    print()
    print_table(HEADER, table_rows(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    scratch.cleanup()
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')} ({result['runtime_s']:.0f} s)")


if __name__ == "__main__":
    main()
