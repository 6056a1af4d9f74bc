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
3. Restorable range: the largest strength at which the model still restores well on every family, in
   two readings (see RETAKE_MAX_DEFICIT_DB and ORACLE_MAX_DEFICIT_DB below; column `retake` is the same
   tile rendered in focus with the same noise draw); the second sets
   `DetectorConfig.max_restorable_sigma_px`.
4. Figure: input / Wiener / model / truth crops, bench/results/deblur_examples.png.
5. Headroom (Gaussian, target range): PSNR of the truth band-limited where the blur's transfer function
   falls below a floor (what recovering every frequency above the floor exactly, and nothing below it,
   would score), and the noise-free case (blur + quantisation only) for the input, oracle Wiener and the
   model. It shows how much of the target the data allows, with no model in the way. Plus a no-blur row:
   noisy in-focus tiles sent to the model anyway (what a false `soft` label costs).
6. Speed: megapixels/s and full-size tiles/s (2400x2400 uint8, 1700x1700 uint16) per backend on this
   machine; on a CUDA machine also the GPU backends (torch fp16 channels_last, ONNX Runtime CUDA).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # models/ is not installed

from appliance.config import DeblurConfig, DetectorConfig  # noqa: E402
from appliance.detection.detector import BlurDetector  # noqa: E402
from appliance.messages import BlurAssessment  # noqa: E402
from appliance.restoration.restorer import TileRestorer  # noqa: E402
from appliance.restoration.wiener import wiener_deconvolve  # noqa: E402
from appliance.weights import DEBLUR_MODEL  # noqa: E402
from bench.deconvolution import richardson_lucy  # noqa: E402
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
from models.deblur.metrics import psnr, ssim  # noqa: E402

STRENGTHS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)
TARGET_RANGE = (1.0, 3.0)
WIENER_NSR = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
RL_ITERATIONS = (2, 5, 10, 20, 35, 50)
METHODS = ("input", "wiener", "rl", "model", "retake")
# Two readings of "restores well" at a strength, each required on every blur family (mean over tiles):
# 1. retake-equivalent: the restored tile within RETAKE_MAX_DEFICIT_DB (PSNR vs the sharp original) of
#    a retake, the same tile acquired in focus with the same noise (fixed before any model was measured);
# 2. at the model's best (the value used for DetectorConfig.max_restorable_sigma_px): PSNR gain over
#    the blurred input >= MIN_GAIN_DB, and no more than ORACLE_MAX_DEFICIT_DB below the better of
#    Wiener / Richardson-Lucy given the true PSF (families with a PSF). Past it the model falls behind
#    what deconvolution with a known PSF achieves: it is outside the range it restores reliably.
RETAKE_MAX_DEFICIT_DB = 1.5
MIN_GAIN_DB = 1.0
ORACLE_MAX_DEFICIT_DB = 0.5
# Transfer-function floors of the headroom rows: 0.05 = a frequency attenuated 20x by the blur.
OTF_FLOORS = (0.1, 0.05, 0.02)
RESULTS = REPO / "bench" / "results"
ESTIMATES = ("detector", "true", "blind")

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
    """Wiener output (uint8) with the noise-to-signal ratio that is best against the truth."""
    candidates = [quantize(np.clip(wiener_deconvolve(blurred01, psf, n), 0, 1)) for n in WIENER_NSR]
    return max(candidates, key=lambda c: psnr(c, truth, 255.0))


def best_rl(blurred01: np.ndarray, psf: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Richardson–Lucy output (uint8) at the iteration count that is best against the truth."""
    candidates, estimate, done = [], None, 0
    for n in RL_ITERATIONS:  # each count continues from the previous one: 50 iterations in all
        estimate = richardson_lucy(blurred01, psf, n - done, initial=estimate)
        done = n
        candidates.append(quantize(np.clip(estimate, 0, 1)))
    return max(candidates, key=lambda c: psnr(c, truth, 255.0))


def restore_cell(
    restorer: TileRestorer | None,
    images: list[np.ndarray],
    family: str,
    sigma: float,
    draws: int,
    seed: int,
    assess: Assessor,
) -> tuple[dict[str, dict[str, float]], list[dict[str, np.ndarray]]]:
    """Mean PSNR/SSIM per method for one (family, strength) cell, plus the outputs of the first tile."""
    rng = np.random.default_rng(seed)
    scores: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    given_sigma: list[float] = []
    examples = []
    for image in images:
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
                scores[name].append((psnr(out, image, 255.0), ssim(out, image, 255.0)))
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
            scores["input"].append(psnr(noisy, image, 255.0))
            if restorer is not None:
                assessment = assess(noisy, None)
                scores["model"].append(psnr(restorer.restore([noisy], [assessment])[0], image, 255.0))
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
                    psnr(band_limited(image, sigma, floor), image, 255.0)
                )
            blurred = quantize(apply_blur(to_unit_float(image), params))  # no noise
            outputs = {
                "noise_free_input": blurred,
                "noise_free_wiener": best_wiener(to_unit_float(blurred), psf_kernel(params), image),
            }
            if restorer is not None:
                outputs["noise_free_model"] = restorer.restore([blurred], [assess(blurred, params)])[0]
            for name, out in outputs.items():
                scores.setdefault(name, []).append(psnr(out, image, 255.0))
        rows[f"gaussian@{sigma:g}"] = {name: float(np.mean(v)) for name, v in scores.items()}
    if rows:
        rows["mean"] = {name: float(np.mean([r[name] for r in rows.values()])) for name in next(iter(rows.values()))}
    return rows


def _retake_equivalent(cell: dict) -> bool:
    return cell["retake"]["psnr"] - cell["model"]["psnr"] <= RETAKE_MAX_DEFICIT_DB


def _at_model_best(cell: dict) -> bool:
    if cell["model"]["psnr"] - cell["input"]["psnr"] < MIN_GAIN_DB:
        return False
    if "wiener" not in cell:  # tilted: no single PSF, no oracle to compare with
        return True
    oracle = max(cell["wiener"]["psnr"], cell["rl"]["psnr"])
    return oracle - cell["model"]["psnr"] <= ORACLE_MAX_DEFICIT_DB


def restorable_sigma(table: dict[str, dict[str, dict]], criterion: str = "model_best") -> float | None:
    """Largest strength up to which `criterion` (model_best | retake_equivalent) holds on every family."""
    check = _at_model_best if criterion == "model_best" else _retake_equivalent
    strengths = sorted({float(key.split("@")[1]) for key in table})
    largest = None
    for sigma in strengths:
        cells = [table.get(f"{family}@{sigma:g}") for family in FAMILIES]
        if any(c is None or "model" not in c for c in cells) or not all(check(c) for c in cells):
            break
        largest = sigma
    return largest


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
    args = parser.parse_args()
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
    table: dict[str, dict] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    for f_index, family in enumerate(FAMILIES):
        for s_index, sigma in enumerate(args.strengths):
            key = f"{family}@{sigma:g}"
            seed = args.seed * 1000 + f_index * 100 + s_index
            table[key], first = restore_cell(restorer, images, family, float(sigma), args.draws, seed, assess)
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


if __name__ == "__main__":
    main()
