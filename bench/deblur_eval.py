"""Deblur benchmark on the held-out test images: learned model vs Wiener and Richardson–Lucy.

    nice -n 10 python bench/deblur_eval.py          # writes bench/results/deblur_eval.json + PNG figure
    nice -n 10 python bench/deblur_eval.py --model appliance/weights/deblur_gpu.onnx --estimate true

1. Quality: per blur family and strength, mean PSNR / SSIM (uint8, vs the sharp original) of the
   blurred input, Wiener and Richardson–Lucy given the TRUE PSF with their parameter (noise-to-signal
   ratio, iteration count) picked per tile by the PSNR against the truth (their best case, an oracle
   no rig has), and the learned model (TileRestorer). A blind model (the bundled CPU model) is given
   nothing but the pixels; a PSF-aware model (sidecar `psf_planes`) also gets planes built from the
   BlurAssessment passed to restore(), chosen by `--estimate`: `detector` (default: what the runtime
   would have, the bundled detector's verdict on the blurred tile, label forced to `soft` so that every
   strength is restored), `true` (the blur actually applied: sigma, anisotropy, angle; no region map,
   so `tilted` gets its largest sigma everywhere) or `blind` (no estimate: all-zero planes).
   Tiles: the 4 test images (512x512) x `--draws` renderings each, Poisson-Gaussian noise drawn as in
   training. `tilted` has no single PSF, so the classical columns are empty there.
2. Target row: Gaussian sigma 1-3 px plus noise, averaged over the strengths in that range.
3. Restored vs retake (issue 13 point 4): column `retake` is the same tile rendered in focus with the
   same noise draw, what re-imaging would give. Per family and strength: model PSNR minus retake PSNR
   (dB; also for the input and the true-PSF oracle). Restorable range, per family and over all
   families, in two readings: retake-based (model within RETAKE_MAX_DEFICIT_DB of the retake) and
   oracle-based (gain over the input and within ORACLE_MAX_DEFICIT_DB of the true-PSF oracle; this one
   sets `DetectorConfig.max_restorable_sigma_px`). Plus issue 13's done-when checks (`retake_targets`).
4. Figure: input / Wiener / model / truth crops, bench/results/deblur_examples.png.
5. Headroom (Gaussian, target range): PSNR of the truth band-limited where the blur's transfer function
   falls below a floor (what recovering every frequency above the floor exactly, and nothing below it,
   would score), and the noise-free case (blur + quantisation only) for the input, oracle Wiener and the
   model. It shows how much of the target the data allows, with no model in the way. Plus a no-blur row:
   noisy in-focus tiles sent to the model anyway (what a false `soft` label costs).
6. Speed: megapixels/s and full-size tiles/s (2400x2400 uint8, 1700x1700 uint16) per backend on this
   machine; on a CUDA machine also the GPU backends (torch fp16 channels_last, ONNX Runtime CUDA).
7. Task check (issue 13 point 5; `--no-membrane` skips it): membrane F1 (`models.membrane.score`,
   threshold 0.5) of the retake, the blurred input and the model output against the segmentation of
   the in-focus test image (segmented once per image), at tolerance 0 px (plain pixel F1, the headline:
   2 px saturates near 1) and 2 px, per family and strength up to `max_restorable_sigma_px` (3 px: what
   the appliance restores; larger strengths are skipped to bound the runtime). The membrane segmenter
   runs on torch with `--threads` threads; a 512 px tile takes ~0.8 s on 2 CPU cores, ~3.5 min in all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # models/ is not installed

from appliance.config import DeblurConfig, DetectorConfig  # noqa: E402
from appliance.detection.detector import BlurDetector  # noqa: E402
from appliance.messages import BlurAssessment  # noqa: E402
from appliance.pixels import psnr_db  # noqa: E402
from appliance.restoration.restorer import TileRestorer  # noqa: E402
from appliance.restoration.wiener import wiener_deconvolve  # noqa: E402
from appliance.weights import DEBLUR_MODEL  # noqa: E402
from bench.deconvolution import richardson_lucy  # noqa: E402
from bench.membrane_eval import SUMMARY_MAX_SIGMA, f1_by_tolerance, summary_row  # noqa: E402
from models.blur_synth import (  # noqa: E402
    FAMILIES,
    BlurParams,
    apply_blur,
    load_image,
    load_split,
    psf_kernel,
    quantize,
    sample_blur,
    synthesize,
    to_unit_float,
)
from models.deblur.metrics import ssim  # noqa: E402
from models.membrane.score import segment  # noqa: E402

STRENGTHS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)
TARGET_RANGE = (1.0, 3.0)
WIENER_NSR = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
RL_ITERATIONS = (2, 5, 10, 20, 35, 50)
METHODS = ("input", "wiener", "rl", "model", "retake")
# Two readings of "restores well" at a strength (mean over a cell's tiles), per family and on every family:
# 1. retake-equivalent (issue 13 point 4): the restored tile within RETAKE_MAX_DEFICIT_DB (PSNR vs the
#    sharp original) of a retake, the same tile acquired in focus with the same noise. The issue's
#    0.5 dB; an earlier reading used 1.5 dB, which no cell met either;
# 2. at the model's best (the value used for DetectorConfig.max_restorable_sigma_px): PSNR gain over
#    the blurred input >= MIN_GAIN_DB, and no more than ORACLE_MAX_DEFICIT_DB below the better of
#    Wiener / Richardson-Lucy given the true PSF (families with a PSF). Past it the model falls behind
#    what deconvolution with a known PSF achieves: it is outside the range it restores reliably.
RETAKE_MAX_DEFICIT_DB = 0.5
MIN_GAIN_DB = 1.0
ORACLE_MAX_DEFICIT_DB = 0.5
# Transfer-function floors of the headroom rows: 0.05 = a frequency attenuated 20x by the blur.
OTF_FLOORS = (0.1, 0.05, 0.02)
RESULTS = REPO / "bench" / "results"
ESTIMATES = ("detector", "true", "blind")
# Issue 13's done-when lines: restored >= retake (PSNR, membrane F1) at sigma <= SUMMARY_MAX_SIGMA (1.5 px),
# and membrane F1 above the blurred input everywhere the appliance restores (sigma <= MEMBRANE_MAX_SIGMA_PX).
MEMBRANE_MAX_SIGMA_PX = DetectorConfig().max_restorable_sigma_px
MEMBRANE_METHODS = ("retake", "input", "model")
MEMBRANE_SCORES = ("vs_in_focus_tol0", "vs_in_focus")  # plain pixel F1 (the headline), tolerance 2 px

# The assessment restore() is given for a blurred uint8 tile and the blur applied to it (None: no blur).
Assessor = Callable[[np.ndarray, BlurParams | None], BlurAssessment]


def make_assessor(mode: str) -> Assessor:
    """BlurAssessment per `--estimate` mode (see the module docstring); the model is PSF-aware or not."""
    if mode == "detector":
        detector = BlurDetector.from_config(DetectorConfig())

        def detected(blurred: np.ndarray, _params: BlurParams | None) -> BlurAssessment:
            verdict = detector.assess([blurred])[0]
            # Restore whatever the label: the bench measures restoration at every strength; where the
            # detector would flag a retake is bench/detector_eval.py's question.
            return verdict if verdict.label == "soft" else dataclasses.replace(verdict, label="soft")

        return detected
    if mode == "true":
        return lambda _blurred, params: (
            BlurAssessment(0.5, "soft", 0.0)
            if params is None
            else BlurAssessment(0.5, "soft", params.sigma_px, params.anisotropy, params.angle_deg)
        )
    if mode == "blind":
        return lambda _blurred, _params: BlurAssessment(0.5, "soft", math.nan)
    raise ValueError(f"--estimate {mode!r}; use one of {ESTIMATES}")


def fixed_blur(family: str, sigma: float, rng: np.random.Generator) -> BlurParams:
    """A blur of exactly `sigma`; anisotropy and angle drawn as in training."""
    drawn = sample_blur(rng, family, sigma_range=(sigma, sigma))
    return BlurParams(family, sigma, drawn.anisotropy, drawn.angle_deg)  # type: ignore[arg-type]


def best_wiener(blurred01: np.ndarray, psf: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Wiener output (truth's dtype) with the noise-to-signal ratio that is best against the truth."""
    candidates = [quantize(np.clip(wiener_deconvolve(blurred01, psf, n), 0, 1), truth.dtype) for n in WIENER_NSR]
    return max(candidates, key=lambda c: psnr_db(c, truth))


def best_rl(blurred01: np.ndarray, psf: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Richardson–Lucy output (truth's dtype) at the iteration count that is best against the truth."""
    candidates, estimate, done = [], None, 0
    for n in RL_ITERATIONS:  # each count continues from the previous one: 50 iterations in all
        estimate = richardson_lucy(blurred01, psf, n - done, initial=estimate)
        done = n
        candidates.append(quantize(np.clip(estimate, 0, 1), truth.dtype))
    return max(candidates, key=lambda c: psnr_db(c, truth))


def restore_cell(
    restorer: TileRestorer | None,
    images: list[np.ndarray],
    family: str,
    sigma: float,
    draws: int,
    seed: int,
    assess: Assessor,
    references: list[np.ndarray] | None = None,
) -> tuple[dict[str, dict[str, float]], list[dict[str, np.ndarray]]]:
    """Mean PSNR/SSIM per method for one (family, strength) cell, plus the outputs of the first tile.

    With `references` (the in-focus segmentation of each image) also mean membrane F1 of MEMBRANE_METHODS
    against it (`membrane_f1`) and the seconds that took (`membrane_seconds`).
    """
    rng = np.random.default_rng(seed)
    scores: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    f1s: dict[str, dict[str, list[float]]] = {m: {k: [] for k in MEMBRANE_SCORES} for m in MEMBRANE_METHODS}
    membrane_seconds = 0.0
    given_sigma: list[float] = []
    examples = []
    for image, reference in zip(images, references or [None] * len(images), strict=True):
        for _ in range(draws):
            params = fixed_blur(family, sigma, rng)
            noise_seed = int(rng.integers(2**31))
            blurred = synthesize(image, params, np.random.default_rng(noise_seed))
            # What a retake would give: the same noise draw (photons, read noise), no blur.
            retake = synthesize(image, None, np.random.default_rng(noise_seed))
            outputs = {"input": blurred, "retake": retake}
            if family != "tilted":
                psf = psf_kernel(params)
                outputs["wiener"] = best_wiener(to_unit_float(blurred), psf, image)
                outputs["rl"] = best_rl(to_unit_float(blurred), psf, image)
            if restorer is not None:
                assessment = assess(blurred, params)
                given_sigma.append(assessment.sigma_px)
                outputs["model"] = restorer.restore([blurred], [assessment])[0]
            for name, out in outputs.items():
                scores[name].append((psnr_db(out, image, 255.0), ssim(out, image, 255.0)))
            if reference is not None:
                started = time.perf_counter()
                for name in (m for m in MEMBRANE_METHODS if m in outputs):
                    for suffix, f1 in f1_by_tolerance(segment(outputs[name]), reference).items():
                        f1s[name][f"vs_in_focus{suffix}"].append(f1)
                membrane_seconds += time.perf_counter() - started
            examples.append({**outputs, "truth": image})
    cell = {
        m: {"psnr": float(np.mean([s[0] for s in v])), "ssim": float(np.mean([s[1] for s in v])), "n": len(v)}
        for m, v in scores.items()
        if v
    }
    if "model" in cell and "wiener" in cell:
        # Per tile, the better classical answer (an even stronger baseline than the better mean).
        better = [max(w[0], r[0]) for w, r in zip(scores["wiener"], scores["rl"], strict=True)]
        cell["best_classical_per_tile"] = {"psnr": float(np.mean(better)), "n": len(better)}
    if given_sigma:  # what the model was told (used by a PSF-aware model only); nan = no estimate
        usable = [v for v in given_sigma if math.isfinite(v)]
        cell["estimate"] = {
            "sigma_px_mean": float(np.mean(usable)) if usable else None,
            "no_estimate_fraction": 1.0 - len(usable) / len(given_sigma),
        }
    if references is not None:
        cell["membrane_f1"] = {
            m: {k: float(np.mean(v)) for k, v in by_key.items()} | {"n": len(by_key[MEMBRANE_SCORES[0]])}
            for m, by_key in f1s.items()
            if by_key[MEMBRANE_SCORES[0]]
        }
        cell["membrane_seconds"] = membrane_seconds
    return cell, examples[:1]


def target_summary(table: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Gaussian blur in TARGET_RANGE: mean PSNR per method and the model's gains (dB)."""
    cells = [
        c
        for key, c in table.items()
        if key.startswith("gaussian@") and TARGET_RANGE[0] <= float(key.split("@")[1]) <= TARGET_RANGE[1]
    ]
    mean = {m: float(np.mean([c[m]["psnr"] for c in cells])) for m in METHODS if all(m in c for c in cells)}
    summary = {f"{m}_psnr": v for m, v in mean.items()}
    if "model" in mean:
        summary["model_gain_over_input_db"] = mean["model"] - mean["input"]
        summary["model_gain_over_better_classical_db"] = mean["model"] - max(mean["wiener"], mean["rl"])
        per_tile = float(np.mean([c["best_classical_per_tile"]["psnr"] for c in cells]))
        summary["model_gain_over_per_tile_best_classical_db"] = mean["model"] - per_tile
    return summary


def sharp_cell(
    restorer: TileRestorer | None, images: list[np.ndarray], draws: int, seed: int, assess: Assessor
) -> dict[str, float]:
    """Tiles with noise but no blur, sent to the model anyway (a detector false `soft`): does it harm them?"""
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {"input": [], "model": []}
    for image in images:
        for _ in range(draws):
            noisy = synthesize(image, None, rng)
            scores["input"].append(psnr_db(noisy, image, 255.0))
            if restorer is not None:
                assessment = assess(noisy, None)
                scores["model"].append(psnr_db(restorer.restore([noisy], [assessment])[0], image, 255.0))
    return {f"{name}_psnr": float(np.mean(v)) for name, v in scores.items() if v}


def band_limited(truth: np.ndarray, sigma: float, otf_floor: float) -> np.ndarray:
    """`truth` (float64) without the frequencies a Gaussian blur of `sigma` px attenuates below `otf_floor`."""
    fy = np.fft.fftfreq(truth.shape[0])[:, None]
    fx = np.fft.fftfreq(truth.shape[1])[None, :]
    otf = np.exp(-2.0 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    return np.real(np.fft.ifft2(np.fft.fft2(truth.astype(np.float64)) * (otf >= otf_floor)))


def headroom(
    restorer: TileRestorer | None, images: list[np.ndarray], strengths: list[float], assess: Assessor
) -> dict[str, dict]:
    """Per Gaussian strength in TARGET_RANGE (and their mean): band-limit PSNRs and noise-free results."""
    rows: dict[str, dict[str, float]] = {}
    for sigma in [s for s in strengths if TARGET_RANGE[0] <= s <= TARGET_RANGE[1]]:
        params = BlurParams("gaussian", sigma)
        scores: dict[str, list[float]] = {}
        for image in images:
            for floor in OTF_FLOORS:
                scores.setdefault(f"band_limit_otf_{floor:g}", []).append(
                    psnr_db(band_limited(image, sigma, floor), image, 255.0)
                )
            blurred = quantize(apply_blur(to_unit_float(image), params))  # no noise
            outputs = {
                "noise_free_input": blurred,
                "noise_free_wiener": best_wiener(to_unit_float(blurred), psf_kernel(params), image),
            }
            if restorer is not None:
                outputs["noise_free_model"] = restorer.restore([blurred], [assess(blurred, params)])[0]
            for name, out in outputs.items():
                scores.setdefault(name, []).append(psnr_db(out, image, 255.0))
        rows[f"gaussian@{sigma:g}"] = {name: float(np.mean(v)) for name, v in scores.items()}
    if rows:
        rows["mean"] = {name: float(np.mean([r[name] for r in rows.values()])) for name in next(iter(rows.values()))}
    return rows


def _sigma(key: str) -> float:
    return float(key.split("@")[1])


def versus_retake(table: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per family and strength: PSNR minus the retake's PSNR (dB) of the model, the input and the better
    true-PSF oracle (Wiener / RL; families with a PSF). Negative = below what re-imaging would give."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for key, cell in table.items():
        family, sigma = key.split("@")
        retake = cell["retake"]["psnr"]
        row = {"input": cell["input"]["psnr"] - retake}
        if "model" in cell:
            row["model"] = cell["model"]["psnr"] - retake
        if "wiener" in cell:
            row["oracle"] = max(cell["wiener"]["psnr"], cell["rl"]["psnr"]) - retake
        rows.setdefault(family, {})[sigma] = row
    return rows


def membrane_table(table: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """The cells' membrane F1, as {family: {strength: {method: {score: mean F1}}}} (cells that have it)."""
    rows: dict[str, dict[str, dict]] = {}
    for key, cell in table.items():
        if "membrane_f1" in cell:
            family, sigma = key.split("@")
            rows.setdefault(family, {})[sigma] = cell["membrane_f1"]
    return rows


def _worst(margins: dict[str, float], strict: bool = False) -> dict[str, object]:
    """`met` when every margin is >= 0 (> 0 with `strict`), plus the smallest margin and its cell."""
    if not margins:
        return {"met": None, "worst": None, "worst_cell": None, "cells": 0}
    cell = min(margins, key=lambda k: margins[k])
    worst = margins[cell]
    return {"met": worst > 0 if strict else worst >= 0, "worst": worst, "worst_cell": cell, "cells": len(margins)}


def retake_targets(table: dict[str, dict[str, dict]]) -> dict[str, dict[str, object]]:
    """Issue 13's done-when lines for points 4 and 5, required on every cell (family x strength):
    restored PSNR >= the retake's at sigma <= SUMMARY_MAX_SIGMA; restored membrane F1 >= the retake's
    there, and > the blurred input's at every strength scored (sigma <= MEMBRANE_MAX_SIGMA_PX, the
    range the appliance restores). Margins in dB or F1, model minus the other."""
    low = {k: c for k, c in table.items() if _sigma(k) <= SUMMARY_MAX_SIGMA and "model" in c}
    targets = {
        "psnr_model_minus_retake_sigma_le_1_5": _worst(
            {k: c["model"]["psnr"] - c["retake"]["psnr"] for k, c in low.items()}
        )
    }
    f1 = {k: c["membrane_f1"] for k, c in table.items() if "model" in c.get("membrane_f1", {})}
    for score in MEMBRANE_SCORES:
        targets[f"f1_{score}_model_minus_retake_sigma_le_1_5"] = _worst(
            {k: f["model"][score] - f["retake"][score] for k, f in f1.items() if _sigma(k) <= SUMMARY_MAX_SIGMA}
        )
        targets[f"f1_{score}_model_minus_input"] = _worst(
            {k: f["model"][score] - f["input"][score] for k, f in f1.items()}, strict=True
        )
    return targets


def _retake_equivalent(cell: dict) -> bool:
    return cell["retake"]["psnr"] - cell["model"]["psnr"] <= RETAKE_MAX_DEFICIT_DB


def _at_model_best(cell: dict) -> bool:
    if cell["model"]["psnr"] - cell["input"]["psnr"] < MIN_GAIN_DB:
        return False
    if "wiener" not in cell:  # tilted: no single PSF, no oracle to compare with
        return True
    oracle = max(cell["wiener"]["psnr"], cell["rl"]["psnr"])
    return oracle - cell["model"]["psnr"] <= ORACLE_MAX_DEFICIT_DB


def restorable_sigma(
    table: dict[str, dict[str, dict]], criterion: str = "model_best", families: tuple[str, ...] = FAMILIES
) -> float | None:
    """Largest strength up to which `criterion` (model_best | retake_equivalent) holds on every one of
    `families`: it holds at that strength and every smaller one measured. None: not even the smallest."""
    check = _at_model_best if criterion == "model_best" else _retake_equivalent
    strengths = sorted({_sigma(key) for key in table})
    largest = None
    for sigma in strengths:
        cells = [table.get(f"{family}@{sigma:g}") for family in families]
        if any(c is None or "model" not in c for c in cells) or not all(check(c) for c in cells):
            break
        largest = sigma
    return largest


def restorable_by_family(table: dict[str, dict[str, dict]]) -> dict[str, dict[str, float | None]]:
    """restorable_sigma per criterion, per family and (`all`) on every family at once."""
    return {
        criterion: {family: restorable_sigma(table, criterion, (family,)) for family in FAMILIES}
        | {"all": restorable_sigma(table, criterion)}
        for criterion in ("retake_equivalent", "model_best")
    }


def write_figure(examples: dict[str, dict[str, np.ndarray]], path: Path, model_label: str, crop: int = 128) -> None:
    """Rows = blur cases, columns = input / Wiener (true PSF) / model / truth; 2x nearest zoom, labelled."""
    columns = ("input", "wiener", "model", "truth")
    rows = []
    for case, outputs in examples.items():
        cells = []
        for name in columns:
            image = outputs.get(name)
            if image is None:
                tile = np.full((crop, crop), 255, np.uint8)
                label = f"{name}: n/a (no single PSF)"
            else:
                tile = image[200 : 200 + crop, 200 : 200 + crop]
                label = {
                    "input": f"{case} input",
                    "wiener": "Wiener (true PSF, oracle)",
                    "model": model_label,
                    "truth": "sharp original",
                }[name]
            tile = cv2.resize(tile, (2 * crop, 2 * crop), interpolation=cv2.INTER_NEAREST)
            header = np.full((24, 2 * crop), 255, np.uint8)  # label above the crop, never over pixels
            cv2.putText(header, label, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1, cv2.LINE_AA)
            cells.append(np.pad(np.vstack([header, tile]), 2, constant_values=255))
        rows.append(np.hstack(cells))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.vstack(rows)):
        raise OSError(f"{path}: could not write the figure")


def full_size_tiles() -> dict[str, np.ndarray]:
    """Blurred full-size tiles (~5.8 MB): 2400x2400 uint8 and 1700x1700 uint16, mosaics of test images."""
    rng = np.random.default_rng(7)
    blurred = [synthesize(load_image(p), BlurParams("gaussian", 2.0), rng) for p in load_split("test")]
    mosaic = np.block([[blurred[(r + 2 * c) % 4] for c in range(5)] for r in range(5)])
    return {
        "2400x2400_uint8": np.ascontiguousarray(mosaic[:2400, :2400]),
        "1700x1700_uint16": np.ascontiguousarray(mosaic[:1700, :1700].astype(np.uint16) * 257),
    }


def bench_speed(restorer: TileRestorer, seconds: float, batch: int) -> dict[str, float]:
    """Megapixels/s and tiles/s of restore() on full-size tiles, after one warm-up batch."""
    result: dict[str, float] = {}
    for name, tile in full_size_tiles().items():
        tiles = [tile] * batch
        assessments = [BlurAssessment(0.5, "soft", 2.0)] * batch
        restorer.restore(tiles, assessments)  # warm-up: session, allocations, cuDNN autotuning
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < seconds:
            restorer.restore(tiles, assessments)
            n += batch
        elapsed = time.perf_counter() - start
        result[f"{name}_tiles_per_s"] = n / elapsed
        result[f"{name}_megapixels_per_s"] = n * tile.size / 1e6 / elapsed
    return result


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "gpu": Path("/proc/driver/nvidia/version").exists(),
    }


def measure_speed(model_path: Path | None, seconds: float, batch: int, threads: int) -> dict[str, dict]:
    """Throughput of every backend available here, keyed by the backend the restorer reports."""
    speed = {}
    for name, cfg in speed_backends(model_path, threads):
        restorer = TileRestorer.from_config(cfg)
        speed[restorer.backend] = bench_speed(restorer, seconds, batch)
        print(name, restorer.backend, json.dumps(speed[restorer.backend]), flush=True)
    return speed


def speed_backends(model_path: Path | None, threads: int) -> list[tuple[str, DeblurConfig]]:
    backends = [("classical", DeblurConfig(backend="classical"))]
    if model_path is not None and model_path.is_file():
        cpu = {"model_path": model_path, "num_cpus_per_replica": float(threads)}
        backends.append(("onnx", DeblurConfig(backend="onnx", **cpu)))
        if Path("/proc/driver/nvidia/version").exists():
            # GPU: big patches in big batches; `auto` picks torch fp16 or ONNX Runtime CUDA.
            gpu = {"model_path": model_path, "patch_size": 1024, "patch_batch": 16}
            backends += [("auto", DeblurConfig(backend="auto", **gpu)), ("torch", DeblurConfig(backend="torch", **gpu))]
    return backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEBLUR_MODEL, help="ONNX model (sidecar .json beside)")
    parser.add_argument("--draws", type=int, default=2, help="renderings per test image and cell")
    parser.add_argument("--strengths", type=float, nargs="*", default=list(STRENGTHS))
    parser.add_argument("--speed-seconds", type=float, default=20.0)
    parser.add_argument(
        "--speed-batch",
        type=int,
        default=8 if Path("/proc/driver/nvidia/version").exists() else 1,
        help="tiles per restore() call (default 8 on a GPU, 1 on CPU)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default bench/results/deblur_eval.json (--estimate detector), else "
        "deblur_eval_<estimate>.json; the figure is written beside it",
    )
    parser.add_argument(
        "--estimate",
        choices=ESTIMATES,
        default="detector",
        help="the BlurAssessment a PSF-aware model is given (a blind model ignores it)",
    )
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime CPU threads (num_cpus_per_replica)")
    parser.add_argument("--speed-only", action="store_true", help="only throughput, into deblur_speed.json")
    parser.add_argument(
        "--membrane",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"membrane F1 of retake / input / model at sigma <= {MEMBRANE_MAX_SIGMA_PX:g} px (torch, --threads "
        "threads; ~3.5 min on 2 CPU cores at --draws 1)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    suffix = "" if args.estimate == "detector" else f"_{args.estimate}"
    if args.out is None:
        args.out = RESULTS / f"deblur_eval{suffix}.json"
    if args.speed_only:
        model_path = args.model if args.model.is_file() else None
        speed = measure_speed(model_path, args.speed_seconds, args.speed_batch, args.threads)
        out = args.out.with_name("deblur_speed.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"speed": speed, "machine": machine()}, indent=2), encoding="utf-8")
        print(f"wrote {out}")
        return

    model_path = args.model if args.model.is_file() else None
    restorer = TileRestorer.from_config(DeblurConfig(backend="onnx", model_path=model_path)) if model_path else None
    assess = make_assessor(args.estimate)
    psf_aware = restorer is not None and restorer.psf_aware
    images = [load_image(p) for p in load_split("test")]
    references, reference_seconds = None, 0.0
    if args.membrane:
        torch.set_num_threads(args.threads)
        segment_started = time.perf_counter()
        references = [segment(image) for image in images]  # the in-focus segmentation, once per test image
        reference_seconds = time.perf_counter() - segment_started
    table: dict[str, dict] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    for f_index, family in enumerate(FAMILIES):
        for s_index, sigma in enumerate(args.strengths):
            key = f"{family}@{sigma:g}"
            seed = args.seed * 1000 + f_index * 100 + s_index
            scored = references if sigma <= MEMBRANE_MAX_SIGMA_PX else None
            table[key], first = restore_cell(restorer, images, family, float(sigma), args.draws, seed, assess, scored)
            if sigma in (2.0, 3.0) and family in ("gaussian", "astigmatic", "tilted"):
                examples[f"{family} s={sigma:g}"] = first[0]
            print(_row_text(key, table[key]), flush=True)
    figure = args.out.with_name(f"deblur_examples{suffix}.png")
    write_figure(examples, figure, f"model ({args.estimate} PSF)" if psf_aware else "model (blind)")
    headroom_rows = headroom(restorer, images, [float(s) for s in args.strengths], assess)
    sharp_row = sharp_cell(restorer, images, args.draws, args.seed * 1000 + 999, assess)
    speed = measure_speed(model_path, args.speed_seconds, args.speed_batch, args.threads)
    result = {
        "model_version": restorer.model_version if restorer else None,
        "psf_aware": psf_aware,
        "estimate": args.estimate,  # what a PSF-aware model was given; a blind model ignores it
        "table": table,
        "target_gaussian_sigma_1_3": target_summary(table),
        "headroom_gaussian": headroom_rows,
        "no_blur_noise_only": sharp_row,
        "max_restorable_sigma_px": restorable_sigma(table, "model_best"),
        "restorable_criterion": f"every family: model PSNR gain >= {MIN_GAIN_DB} dB over the input and "
        f"<= {ORACLE_MAX_DEFICIT_DB} dB below the better true-PSF Wiener/RL",
        "retake_equivalent_sigma_px": restorable_sigma(table, "retake_equivalent"),
        "retake_equivalent_criterion": f"every family: model PSNR within {RETAKE_MAX_DEFICIT_DB} dB of a "
        "retake (same tile in focus, same noise)",
        "restored_vs_retake": {
            "psnr_minus_retake_db": versus_retake(table),
            "restorable_sigma_px": restorable_by_family(table),
            "retake_equivalent_criterion": f"model PSNR >= retake PSNR - {RETAKE_MAX_DEFICIT_DB} dB",
            "model_best_criterion": f"model PSNR gain >= {MIN_GAIN_DB} dB over the input and <= "
            f"{ORACLE_MAX_DEFICIT_DB} dB below the better true-PSF Wiener/RL",
        },
        "issue13_targets": retake_targets(table),
        "speed": speed,
        "figure": str(figure.relative_to(REPO)) if figure.is_relative_to(REPO) else str(figure),
        "settings": {
            "draws": args.draws,
            "seed": args.seed,
            "estimate": args.estimate,
            "wiener_nsr_grid": WIENER_NSR,
            "rl_iterations_grid": RL_ITERATIONS,
            "test_images": [p.name for p in load_split("test")],
        },
        "machine": machine(),
    }
    if args.membrane:
        result["membrane_f1"] = {
            "reference": "segment(in-focus test image), threshold 0.5; vs_in_focus_tol0 = plain pixel F1, "
            "vs_in_focus = tolerance 2 px",
            "max_sigma_px": MEMBRANE_MAX_SIGMA_PX,
            "table": membrane_table(table),
            "summary_sigma_le_1_5": summary_row(
                membrane_table(table), tuple(m for m in MEMBRANE_METHODS if m != "model" or restorer), MEMBRANE_SCORES
            ),
            "seconds": reference_seconds + sum(c.get("membrane_seconds", 0.0) for c in table.values()),
            "torch_threads": args.threads,
        }
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print_summary(result)
    print(f"wrote {args.out} and {figure}")


def _row_text(key: str, cell: dict) -> str:
    parts = [f"{key:16s}"]
    for m in METHODS:
        parts.append(f"{m} {cell[m]['psnr']:6.2f}/{cell[m]['ssim']:.3f}" if m in cell else f"{m}    n/a     ")
    return " | ".join(parts)


def print_summary(result: dict) -> None:
    estimate = f", estimate given to the model: {result['estimate']}" if result["psf_aware"] else ", blind model"
    print(f"\nPSNR dB / SSIM (uint8, vs sharp original), mean over test tiles{estimate}")
    print(f"{'family@sigma':16s} | " + " | ".join(f"{m:>14s}" for m in METHODS))
    for key, cell in result["table"].items():
        print(_row_text(key, cell))
    print("\nTarget (Gaussian sigma 1-3 px + noise):", json.dumps(result["target_gaussian_sigma_1_3"], indent=1))
    print(
        "\nHeadroom (Gaussian, PSNR dB vs the sharp original; band_limit_otf_F = truth without the frequencies"
        " the blur attenuates below F; noise_free_* = blur + uint8 quantisation only)"
    )
    for key, row in result["headroom_gaussian"].items():
        print(f"{key:16s} " + "  ".join(f"{name} {value:6.2f}" for name, value in row.items()))
    print("No blur, noise only (a tile wrongly sent to deblur):", json.dumps(result["no_blur_noise_only"]))
    print("max_restorable_sigma_px:", result["max_restorable_sigma_px"], "-", result["restorable_criterion"])
    print("retake-equivalent up to:", result["retake_equivalent_sigma_px"], "-", result["retake_equivalent_criterion"])
    print_retake(result["restored_vs_retake"])
    if "membrane_f1" in result:
        print_membrane(result["membrane_f1"])
    print("\nIssue 13 done-when (margin = model minus the other; met = every cell >= 0, > 0 vs the input):")
    for name, check in result["issue13_targets"].items():
        print(f"  {name}: {json.dumps(check)}")
    print(f"wall time {result['seconds']} s")


def print_retake(section: dict) -> None:
    deltas = section["psnr_minus_retake_db"]
    strengths = list(next(iter(deltas.values())))
    print("\nRestored vs retake: PSNR minus the retake's PSNR (dB), model [true-PSF oracle]")
    print(f"{'family':11s} | " + " | ".join(f"{s:>14s}" for s in strengths))
    for family, by_sigma in deltas.items():
        cells = []
        for row in by_sigma.values():
            oracle = f"[{row['oracle']:+6.2f}]" if "oracle" in row else "[   n/a]"
            cells.append(f"{row.get('model', math.nan):+6.2f} {oracle}")
        print(f"{family:11s} | " + " | ".join(cells))
    for criterion, by_family in section["restorable_sigma_px"].items():
        print(f"restorable range ({criterion}): {json.dumps(by_family)} - {section[f'{criterion}_criterion']}")


def print_membrane(section: dict) -> None:
    print(
        f"\nMembrane F1 vs the in-focus segmentation (sigma <= {section['max_sigma_px']:g} px), "
        f"{' / '.join(MEMBRANE_METHODS)}: plain pixel F1 (0 px) | tolerance 2 px"
    )
    rows = [(f, s, cell) for f, by_sigma in section["table"].items() for s, cell in by_sigma.items()]
    rows.append(("all", f"<={SUMMARY_MAX_SIGMA:g}", section["summary_sigma_le_1_5"]))
    for family, sigma, cell in rows:
        methods = [m for m in MEMBRANE_METHODS if m in cell]
        print(
            f"{family:<11} {sigma:>5} | "
            + " | ".join(" ".join(f"{cell[m][key]:.3f}" for m in methods) for key in MEMBRANE_SCORES)
        )
    print(f"membrane scoring took {section['seconds']:.0f} s ({section['torch_threads']} torch threads)")


if __name__ == "__main__":
    main()
