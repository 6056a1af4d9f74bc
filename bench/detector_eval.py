"""Blur detector benchmark on the held-out test images: learned model vs classical baselines.

    nice -n 10 python bench/detector_eval.py            # writes bench/results/detector_eval.json
    nice -n 10 python bench/detector_eval.py --speed-only   # part 4 for the model only (and with a spectral
                                                            # calibration's reading), printed;
                                                            # --threads 2: a replica with 2 CPUs

1. Detection: per blur family and strength, AUROC (blurred vs sharp) and accuracy of the learned model,
   the runtime's classical fallback (re-blur) and the classical focus metrics (variance of Laplacian,
   Brenner, FFT ratio), side by side. Tiles: the 4 test images x 8 flips/rotations (512x512), each
   rendered with Poisson-Gaussian noise; negatives are the same tiles with noise only. Baseline
   thresholds (for accuracy) are fitted on the val split, never on test, for every method alike; the
   model's own labels (`sharp` vs not, default config thresholds) are scored separately.
2. Labels and estimates: 3-class label accuracy (sharp <= sharp_sigma_px < soft <= max_restorable <
   retake, by the true sigma) and the median sigma error of the model.
3. Content: sharp tiles dominated by blank resin, dark or bright content, or a smooth nucleus must not
   be called blurred: share called blurred per method.
4. Speed: tiles/s of 2400x2400 uint8 (5.8 MB) and 1700x1700 uint16 (5.8 MB) tiles on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # models/ is not installed

from appliance.config import DetectorConfig  # noqa: E402
from appliance.detection.detector import BLUR_DETECTOR_MODEL, BlurDetector  # noqa: E402
from appliance.spectral import SpectralReferenceArrays, reference_log_power, window_spectra  # noqa: E402
from bench.focus_metrics import BASELINES  # noqa: E402
from models.blur_synth import (  # noqa: E402
    FAMILIES,
    BlurParams,
    dihedral_tiles,
    load_image,
    load_split,
    quantize,
    sample_blur,
    synthesize,
    to_unit_float,
)

STRENGTHS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a blurred tile > score of a sharp tile), ties count half (Mann-Whitney U)."""
    scores = np.concatenate([negatives, positives])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[len(negatives) :].sum() - len(positives) * (len(positives) + 1) / 2.0
    return float(u / (len(negatives) * len(positives)))


def blur_params(family: str, sigma: float, rng: np.random.Generator) -> BlurParams:
    """Fixed strength, other parameters (anisotropy, angle) drawn as in training."""
    drawn = sample_blur(rng, family, sigma_range=(sigma, sigma))
    return BlurParams(family, sigma, drawn.anisotropy, drawn.angle_deg)  # type: ignore[arg-type]


class Methods:
    """Every method maps a batch of tiles to blur scores (higher = more blurred)."""

    def __init__(self, model: BlurDetector | None, classical: BlurDetector) -> None:
        self.model, self.classical = model, classical
        self.names = (["model"] if model else []) + ["classical_reblur", *BASELINES]

    def scores(self, tiles: list[np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.model:
            out["model"] = np.array([a.blur_score for a in self.model.assess(tiles)])
        out["classical_reblur"] = np.array([a.blur_score for a in self.classical.assess(tiles)])
        floats = [to_unit_float(t) for t in tiles]
        for name, metric in BASELINES.items():
            out[name] = -np.array([metric(f) for f in floats])  # metrics are high when sharp
        return out


def fit_thresholds(methods: Methods, rng: np.random.Generator) -> dict[str, float]:
    """Per method, the score threshold with the best balanced accuracy on the val split at sigma 1-2."""
    tiles = dihedral_tiles("val")
    sharp = methods.scores([synthesize(t, None, rng) for t in tiles])
    blurred_tiles = [synthesize(t, blur_params(f, s, rng), rng) for t in tiles for f in FAMILIES for s in (1.0, 2.0)]
    blurred = methods.scores(blurred_tiles)
    thresholds = {}
    for name in methods.names:
        candidates = np.unique(np.concatenate([sharp[name], blurred[name]]))
        best = max(
            candidates,
            key=lambda c, n=name: (sharp[n] < c).mean() + (blurred[n] >= c).mean(),
        )
        thresholds[name] = float(best)
    return thresholds


def content_tiles(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Sharp tiles whose content fools focus metrics: mostly blank, dark, bright, or a big smooth nucleus."""
    out: dict[str, list[np.ndarray]] = {"blank_75pct": [], "dark": [], "bright": [], "nucleus": []}
    for tile in dihedral_tiles("test"):
        f = to_unit_float(tile)
        blank = np.full_like(f, float(np.median(f)))
        blank[:256, :256] = f[:256, :256]  # one quadrant of neuropil, the rest empty resin
        out["blank_75pct"].append(blank)
        out["dark"].append(0.08 + 0.15 * (f - f.min()) / (np.ptp(f) + 1e-6))
        out["bright"].append(0.80 + 0.15 * (f - f.min()) / (np.ptp(f) + 1e-6))
        yy, xx = np.mgrid[:512, :512]
        inside = ((yy - 300) / 210.0) ** 2 + ((xx - 280) / 230.0) ** 2 < 1.0
        nucleus = f.copy()
        nucleus[inside] = 0.55 * float(f.mean()) + 0.05 * float(rng.random())  # flat, sharp-edged
        out["nucleus"].append(nucleus)
    return {
        k: [synthesize(quantize(v, np.uint16), None, rng, dtype=np.uint8) for v in tiles] for k, tiles in out.items()
    }


def rig_spectrum() -> SpectralReferenceArrays:
    """An in-focus spectral reference (ISBI train images 0-4), as a spectral rig calibration holds one."""
    spectra = [window_spectra(load_image(p)) for p in load_split("train")[:5]]
    return reference_log_power([s for s in spectra if s is not None])


def bench_speed(
    detector: BlurDetector, seconds: float, batch: int, reference: SpectralReferenceArrays | None = None
) -> dict[str, float]:
    """tiles/s of assess() on 2400x2400 uint8 and 1700x1700 uint16 tiles (mosaics of test images); with
    `reference`, each tile is also read against that in-focus spectrum (a calibrated rig's replica)."""
    images = [load_image(p) for p in load_split("test")]
    mosaic = np.block([[images[(r + c) % 4] for c in range(5)] for r in range(5)])
    tiles = {
        "2400x2400_uint8": np.ascontiguousarray(mosaic[:2400, :2400]),
        "1700x1700_uint16": np.ascontiguousarray(mosaic[:1700, :1700].astype(np.uint16) * 257),
    }
    result = {}
    for name, tile in tiles.items():
        references = [reference] * batch
        detector.assess([tile] * batch, spectral_references=references)  # warm-up (session, allocations)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            detector.assess([tile] * batch, spectral_references=references)
            n += batch
        result[name] = n / (time.perf_counter() - start)
        result[f"{name}_mb"] = tile.nbytes / 1e6
    return result


def spectral_cost_ms(detector: BlurDetector, reference: SpectralReferenceArrays, rounds: int = 60) -> dict[str, float]:
    """Median ms per 2400x2400 uint8 tile (batch 1) without and with the spectral reading, calls alternated so
    that the load of a shared machine hits both alike; and the median of the paired differences."""
    images = [load_image(p) for p in load_split("test")]
    tile = np.ascontiguousarray(np.block([[images[(r + c) % 4] for c in range(5)] for r in range(5)])[:2400, :2400])
    plain, read = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        detector.assess([tile])
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        detector.assess([tile], spectral_references=[reference])
        read.append(time.perf_counter() - start)
    ms = 1e3 * np.array([plain, read])
    return {
        "model_ms": float(np.median(ms[0])),
        "with_spectral_ms": float(np.median(ms[1])),
        "added_ms": float(np.median(ms[1] - ms[0])),
    }


def timed_metric(metric: Callable[[np.ndarray], float], seconds: float) -> float:
    images = [load_image(p) for p in load_split("test")]
    tile = to_unit_float(np.block([[images[(r + c) % 4] for c in range(5)] for r in range(5)])[:2400, :2400])
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        metric(tile)
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BLUR_DETECTOR_MODEL)
    parser.add_argument("--realizations", type=int, default=2, help="noise/blur draws per tile")
    parser.add_argument("--speed-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "detector_eval.json")
    parser.add_argument("--speed-only", action="store_true", help="only part 4 (model, 1 thread), printed, no file")
    parser.add_argument(
        "--threads", type=int, default=1, help="--speed-only: the replica's CPUs (detector.num_cpus_per_replica)"
    )
    args = parser.parse_args()
    if args.speed_only:
        replica = DetectorConfig(backend="onnx", model_path=args.model, num_cpus_per_replica=float(args.threads))
        speed_model = BlurDetector.from_config(replica)
        print(f"{replica.inference_threads} ONNX Runtime thread(s)", flush=True)
        spectrum = rig_spectrum()
        for batch in (1, 4):
            print(f"batch {batch}:", json.dumps(bench_speed(speed_model, args.speed_seconds, batch)), flush=True)
            spectral_speed = bench_speed(speed_model, args.speed_seconds, batch, spectrum)
            print(f"batch {batch}, spectral calibration:", json.dumps(spectral_speed), flush=True)
        print("alternating calls, batch 1:", json.dumps(spectral_cost_ms(speed_model, spectrum)), flush=True)
        return

    cfg = DetectorConfig()
    model = None
    if args.model.is_file():
        model = BlurDetector.from_config(DetectorConfig(backend="onnx", model_path=args.model))
    classical = BlurDetector.from_config(DetectorConfig(backend="classical"))
    methods = Methods(model, classical)
    rng = np.random.default_rng(12345)
    thresholds = fit_thresholds(methods, rng)

    tiles = dihedral_tiles("test")
    sharp_tiles = [synthesize(t, None, rng) for t in tiles for _ in range(args.realizations)]
    sharp = methods.scores(sharp_tiles)
    sharp_labels = [a.label for a in model.assess(sharp_tiles)] if model else []
    rows = []
    for family in FAMILIES:
        for sigma in STRENGTHS:
            draws = [(t, blur_params(family, sigma, rng)) for t in tiles for _ in range(args.realizations)]
            params = [p for _, p in draws]
            blurred_tiles = [synthesize(t, p, rng) for t, p in draws]
            blurred = methods.scores(blurred_tiles)
            row: dict = {
                "family": family,
                "sigma_px": sigma,
                "n_blurred": len(blurred_tiles),
                "n_sharp": len(sharp_tiles),
            }
            for name in methods.names:
                acc = ((sharp[name] < thresholds[name]).mean() + (blurred[name] >= thresholds[name]).mean()) / 2
                row[f"{name}_auroc"] = auroc(sharp[name], blurred[name])
                row[f"{name}_acc"] = float(acc)
            if model:
                assessed = model.assess(blurred_tiles)
                called_blurred = np.mean([a.label != "sharp" for a in assessed])
                called_sharp = np.mean([lab == "sharp" for lab in sharp_labels])
                # Balanced accuracy of its own labels (sharp vs not) at the default thresholds.
                row["model_labels_acc"] = float((called_blurred + called_sharp) / 2)
                want = (
                    "sharp"
                    if sigma <= cfg.sharp_sigma_px
                    else ("soft" if sigma <= cfg.max_restorable_sigma_px else "retake")
                )
                row["model_label_acc"] = float(np.mean([a.label == want for a in assessed]))
                est = np.array([a.sigma_px for a in assessed])
                row["model_sigma_median"] = float(np.median(est))
                row["model_sigma_mae"] = float(np.median(np.abs(est - sigma)))
                if family == "astigmatic" and sigma >= 2.0:
                    true_aniso = np.array([p.anisotropy for p in params])
                    row["model_aniso_mae"] = float(np.median(np.abs([a.anisotropy for a in assessed] - true_aniso)))
                    d = np.abs(np.array([a.angle_deg for a in assessed]) - [p.angle_deg for p in params]) % 180
                    row["model_angle_mae_deg"] = float(np.median(np.minimum(d, 180 - d)))
            rows.append(row)
            print(_row_text(row, methods.names), flush=True)

    content = {}
    for kind, ctiles in content_tiles(rng).items():
        scores = methods.scores(ctiles)
        entry = {name: float((scores[name] >= thresholds[name]).mean()) for name in methods.names}
        if model:
            entry["model"] = float(np.mean([a.label != "sharp" for a in model.assess(ctiles)]))
            entry["model_mean_score"] = float(np.mean(scores["model"]))
        content[kind] = entry

    speed = {"cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()}
    if model:
        speed["model_batch1"] = bench_speed(model, args.speed_seconds, 1)
        speed["model_batch4"] = bench_speed(model, args.speed_seconds, 4)
        speed["model_batch1_spectral"] = bench_speed(model, args.speed_seconds, 1, rig_spectrum())
        speed["model_providers"] = model.backend.providers  # type: ignore[attr-defined]
    speed["classical_reblur_batch1"] = bench_speed(classical, args.speed_seconds / 2, 1)
    for name, metric in BASELINES.items():
        speed[f"{name}_2400_uint8"] = timed_metric(metric, args.speed_seconds / 4)

    result = {
        "command": " ".join(sys.argv),
        "model_version": model.model_version if model else None,
        "thresholds_from_val": thresholds,
        "config": cfg.model_dump(mode="json"),
        "detection": rows,
        "content_false_blurred_rate": content,
        "speed_tiles_per_s": speed,
    }
    print_summary(result, methods.names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _row_text(row: dict, names: list[str]) -> str:
    cells = " ".join(f"{row[f'{n}_auroc']:.3f}/{row[f'{n}_acc']:.2f}" for n in names)
    return f"{row['family']:<11} {row['sigma_px']:>4.1f}  {cells}"


def print_summary(result: dict, names: list[str]) -> None:
    print("\nAUROC / balanced accuracy (threshold fitted on val), sharp vs blurred, held-out test images")
    print(f"{'family':<11} {'sigma':>4}  " + " ".join(f"{n:>16}" for n in names))
    for row in result["detection"]:
        print(_row_text(row, names))
    if "model_label_acc" in result["detection"][0]:
        print("\nmodel labels at default thresholds: sharp-vs-not and 3-class accuracy; sigma median (abs err)")
        for row in result["detection"]:
            extra = ""
            if "model_aniso_mae" in row:
                extra = f"  aniso err {row['model_aniso_mae']:.2f}  angle err {row['model_angle_mae_deg']:.1f} deg"
            print(
                f"{row['family']:<11} {row['sigma_px']:>4.1f}  sharp-vs-not acc {row['model_labels_acc']:.2f}  "
                f"3-class acc {row['model_label_acc']:.2f}  "
                f"sigma {row['model_sigma_median']:.2f} (err {row['model_sigma_mae']:.2f}){extra}"
            )
    print("\ncontent test: share of SHARP tiles called blurred (lower is better)")
    for kind, entry in result["content_false_blurred_rate"].items():
        print(f"{kind:<12} " + " ".join(f"{n}={entry[n]:.2f}" for n in names))
    print("\nspeed (tiles/s):", json.dumps(result["speed_tiles_per_s"], indent=1))


if __name__ == "__main__":
    main()
