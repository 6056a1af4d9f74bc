"""The whole appliance measured on one machine in one run, sized to a time budget (GPU or CPU).

Examples:
  python bench/gpu_suite.py --device cuda --out bench/results/gpu          # ~3 min on one H100/H200
  python bench/gpu_suite.py --device cpu --side 512 --scale 0.1 --out /tmp/suite   # the same run on CPU
  python bench/gpu_suite.py --deblur-only --deblur-model models/deblur/loso/loso-all.onnx --out /tmp/speed

In one process and one Ray cluster, on real-EM mosaics of MultiSEM size (bench/replay.py's pool):
1. environment (GPU, driver, versions, CPUs);
2. the bare detector loop (no Ray, no ZeroMQ) at batch 1 and the replica's batch, with the replica's
   threads and, when that is more, with one;
3. the bare deblur loop on soft tiles, per backend variant (torch fp16 batch 1 and 4, bf16, fp16 with
   cuDNN's autotuner), each compared with the fp32 ONNX Runtime CPU output of the same tile in DN (the
   CPU rig's result);
4. the pipeline (ingest -> Serve detector/deblur -> sink, replicas as in the rig config): sharp tiles at
   25.4/s, sharp flat out, 1/16 soft + 1/16 retake flat out and at 25.4/s, soft tiles only flat out;
   lost/duplicated, latency send -> durable, and pipeline/bare in the same run;
5. several microscopes on the same appliance (shared detector/deblur): 2, then 4 controllers streaming
   sharp tiles at 25.4/s each at once (MULTISCOPE_ROWS), total and per-microscope throughput and latency.
   The appliance serves 4 microscopes throughout; rows 4. use the first, the others idle;
6. on a GPU, last (their compile time must not cost the rows above): fp16 with torch.compile, default
   mode and max-autotune-no-cudagraphs; the first call's time includes the compile.
--calibrated runs everything as a calibrated rig: `calibrate` on CALIBRATION_TILES of the sharp tiles (the
restoration blend measured with the rig's deblur model), `detector.calibration` set, so the detector reads
each tile's spectrum against the rig's and soft tiles are blended with the rig Wiener (docs/calibration.md).
--pipeline-only skips phases 3 and 6 (the bare deblur loop and the compile), to spend the budget on the rig.
--deblur-only runs phases 1, 3 and 6 alone (no Ray, no detector), and --deblur-model times other weights than
the bundled ones (an exported ONNX file with its .pt2 and .json beside it): how fast a candidate model runs
against the bundled one, one run per model on the same machine.
Writes `suite.json` and `suite.md` (the table) into --out; tiles go to a scratch directory that is
deleted afterwards. Each phase checks the budget and records what it skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # bench/ runs from a checkout: models/ and bench/ are importable

from appliance.config import DeblurConfig, OutputConfig, RigConfig  # noqa: E402
from appliance.messages import BlurAssessment  # noqa: E402
from appliance.restoration.restorer import TileRestorer, load_sidecar  # noqa: E402
from appliance.tools.reference_controller import MULTISEM_TILES_PER_S  # noqa: E402
from bench.replay import bench_config, multisem_tiles, with_microscopes  # noqa: E402

app = typer.Typer(add_completion=False)
GPU_CONFIG = REPO_ROOT / "bench" / "rig-gpu.yaml"
SOFT_SIGMA_PX = 1.5
MULTISCOPE_ROWS = (2, 4)  # microscopes streaming at once; the appliance serves max(MULTISCOPE_ROWS)
MULTISCOPE_TILES = 150  # per microscope (x --scale): ~6 s at 25.4/s
CALIBRATION_TILES = 5  # the fewest `calibrate` takes: what a facility would do first


class Budget:
    """Wall-clock budget of the whole run; phases ask before they start."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


def environment(device: str) -> dict[str, Any]:
    """What this run measured on: CPU count, Python, library versions, GPU name and driver."""
    import onnxruntime
    import ray

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": device,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        if device == "cuda":
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        env["torch"] = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        env["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
    return env


def rate(calls: Callable[[], int], min_calls: int, max_s: float) -> dict[str, float]:
    """Run `calls` (each returns tiles done) at least min_calls times or until max_s; tiles/s."""
    done, count, started = 0, 0, time.perf_counter()
    while count < min_calls or time.perf_counter() - started < max_s:
        done += calls()
        count += 1
        if time.perf_counter() - started >= max_s and count >= 2:
            break
    seconds = time.perf_counter() - started
    return {"tiles": done, "seconds": round(seconds, 3), "tiles_per_s": round(done / seconds, 2)}


def bare_detector(cfg: RigConfig, tiles: list[np.ndarray], max_s: float) -> dict[str, Any]:
    """The detector alone in this process with the replica's threads, at batch 1 and the replica's batch."""
    from appliance.detection.detector import BlurDetector

    detector = BlurDetector.from_config(cfg.detector)
    detector.assess(tiles[:1])  # session creation
    result: dict[str, Any] = {"model_version": detector.model_version, "threads": cfg.detector.inference_threads}
    for batch in sorted({1, cfg.detector.max_batch_size}):
        cursor = iter(range(10**9))

        def one_batch(batch: int = batch, cursor: Any = cursor) -> int:
            start = (next(cursor) * batch) % len(tiles)
            chunk = [tiles[(start + i) % len(tiles)] for i in range(batch)]
            return len(detector.assess(chunk))

        result[f"batch_{batch}"] = rate(one_batch, 3, max_s / 2)
    return result


def soft_tiles(sharp: list[np.ndarray], count: int) -> list[np.ndarray]:
    """`count` copies of sharp mosaics blurred (Gaussian 1.5 px, SEM noise), as the soft tiles of a section."""
    from models.blur_synth import BlurParams, synthesize

    rng = np.random.default_rng(1)
    return [
        synthesize(sharp[i % len(sharp)], BlurParams("gaussian", SOFT_SIGMA_PX), rng, noise=True, dtype=sharp[0].dtype)
        for i in range(count)
    ]


def dn_agreement(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Largest and typical |candidate - reference| in DN, and the share of pixels more than 1 DN apart."""
    diff = np.abs(candidate.astype(np.int64) - reference.astype(np.int64))
    return {
        "max_dn": int(diff.max()),
        "p99_9_dn": float(np.percentile(diff, 99.9)),
        "share_over_1_dn": float((diff > 1).mean()),
    }


@dataclass(frozen=True)
class Variant:
    """One way of running the deblur network: TorchDeblur keyword arguments, batch sizes to time, and
    cuDNN's autotuner (a process-wide switch, set for this variant only)."""

    name: str
    kwargs: dict[str, Any]
    batches: tuple[int, ...] = (1,)
    cudnn_benchmark: bool = False
    # Budget it needs beyond the timing loop: max-autotune compiled for 179 s on the H100 (2026-11-26) and ran
    # 87 s past that run's budget when started with less.
    compile_s: float = 0.0


def deblur_variants(device: str) -> list[Variant]:
    """Variants timed before the pipeline; the first is the appliance's path on this device.
    (The int32-transfer variant was measured against compact transfers on 2026-11-26 and is no longer timed.)"""
    import torch

    if device != "cuda":
        return [Variant("torch-cpu-float32", {"dtype": torch.float32})]
    variants = [
        Variant("torch-cuda-float16", {"dtype": torch.float16}, (1, 4)),
        Variant("torch-cuda-float16 cudnn.benchmark", {"dtype": torch.float16}, cudnn_benchmark=True),
    ]
    if torch.cuda.is_bf16_supported():
        variants.insert(1, Variant("torch-cuda-bfloat16", {"dtype": torch.bfloat16}))
    return variants


def compiled_variants() -> list[Variant]:
    """fp16 with torch.compile, timed after the pipeline rows so that compile time cannot cost them; the
    autotuned mode (longest to compile) last."""
    import torch

    fp16 = {"dtype": torch.float16, "compile_network": True}
    return [
        Variant("torch-cuda-float16 torch.compile", fp16, cudnn_benchmark=True),
        Variant(
            "torch-cuda-float16 torch.compile max-autotune-no-cudagraphs",
            {**fp16, "compile_mode": "max-autotune-no-cudagraphs"},
            cudnn_benchmark=True,
            compile_s=200,
        ),
    ]


def deblur_weights(cfg: RigConfig) -> Path:
    """The ONNX weights the bare deblur loop times: the rig config's `deblur.model_path`, else the bundled ones."""
    from appliance.weights import DEBLUR_MODEL

    return Path(cfg.deblur.model_path) if cfg.deblur.model_path is not None else DEBLUR_MODEL


def time_variant(
    variant: Variant,
    model: Path,
    tiles: list[np.ndarray],
    reference: np.ndarray,
    margin: int,
    device: str,
    max_s: float,
) -> dict[str, Any]:
    """One variant of `model` (its .pt2): first-call time (a compile included), DN agreement with `reference`
    (tile 0), tiles/s per batch."""
    import torch

    from appliance.restoration.torch_backend import TorchDeblur

    torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    try:
        engine = TorchDeblur(model.with_suffix(".pt2"), load_sidecar(model).size_multiple, device, **variant.kwargs)
        warm = time.perf_counter()
        (first,) = engine.restore_tiles(tiles[:1], margin)
        entry: dict[str, Any] = {
            "first_call_s": round(time.perf_counter() - warm, 2),
            "vs_onnx_cpu_fp32": dn_agreement(first, reference),
        }
        for batch in variant.batches:
            cursor = iter(range(10**9))

            def call(batch: int = batch, cursor: Any = cursor) -> int:
                start = next(cursor) * batch
                return len(engine.restore_tiles([tiles[(start + i) % len(tiles)] for i in range(batch)], margin))

            entry[f"batch_{batch}"] = rate(call, 2, max_s / len(variant.batches))
        return entry
    finally:
        torch.backends.cudnn.benchmark = False


def onnx_cpu_reference(tiles: list[np.ndarray], model: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Tile 0 restored by `model` in fp32 ONNX Runtime on every CPU (tiled, as a CPU rig does), and its speed."""
    reference_cfg = DeblurConfig(backend="onnx", model_path=model, num_cpus_per_replica=float(os.cpu_count() or 1))
    onnx_cpu = TileRestorer.from_config(reference_cfg)
    assessment = BlurAssessment(blur_score=0.4, label="soft", sigma_px=SOFT_SIGMA_PX)
    started = time.perf_counter()
    (reference,) = onnx_cpu.restore(tiles[:1], [assessment])
    speed = {"threads": reference_cfg.inference_threads, "tiles_per_s": round(1.0 / (time.perf_counter() - started), 3)}
    return reference, speed


def time_variants(
    cfg: RigConfig,
    tiles: list[np.ndarray],
    reference: np.ndarray,
    variants: list[Variant],
    budget: Budget,
    max_s: float,
    timed: dict[str, dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Restored tiles/s per backend variant and its agreement with `reference` in DN (or why it is missing),
    into `timed`; `save` after each (a run cut short keeps what it measured)."""
    device = "cuda" if cfg.deblur.num_gpus_per_replica > 0 else "cpu"
    model = deblur_weights(cfg)
    for variant in variants:
        if budget.left_s() < max_s + 30 + variant.compile_s:
            timed[variant.name] = {"skipped": "time budget"}
            continue
        try:
            timed[variant.name] = time_variant(
                variant, model, tiles, reference, cfg.deblur.patch_overlap, device, max_s
            )
        except Exception as exc:  # one broken variant must not cost the rest of the run
            timed[variant.name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"[{budget.left_s():.0f} s left] {variant.name}: {timed[variant.name]}", flush=True)
        save()


def pipeline_rows(
    cfg: RigConfig,
    sharp_pool: list[tuple[str, np.ndarray]],
    mix_pool: list[tuple[str, np.ndarray]],
    soft_pool: list[tuple[str, np.ndarray]],
    scale: float,
    budget: Budget,
) -> list[dict[str, Any]]:
    """One appliance, five sections: sharp at 25.4/s, sharp flat out, mix flat out, mix at 25.4/s, and soft
    tiles only flat out (the deblur replicas' rate through the whole pipeline)."""
    from appliance.tools.reference_controller import cycle_tiles, run_replay

    plan = [
        ("sharp tiles at 25.4/s", sharp_pool, 300, MULTISEM_TILES_PER_S),
        ("sharp tiles, flat out", sharp_pool, 400, None),
        ("1/16 soft + 1/16 retake, flat out", mix_pool, 400, None),
        ("1/16 soft + 1/16 retake at 25.4/s", mix_pool, 300, MULTISEM_TILES_PER_S),
        # Under ingest.implausible_blur_min_tiles (50 by default): a longer all-soft section would trip the
        # safety rule, which stops restoring, and the row would no longer measure the deblur replicas.
        ("soft tiles only, flat out", soft_pool, 48, None),
    ]
    rows: list[dict[str, Any]] = []
    appliance = started_appliance(cfg, rows)
    try:
        for index, (title, pool, tiles, rate_hz) in enumerate(plan):
            count = max(16, int(tiles * scale))
            if pool is soft_pool:
                count = min(count, cfg.ingest.implausible_blur_min_tiles - 1)
            # Flat out, 2026-11-26's H200 run left these rows out at 43 s left: 20 tiles/s was too pessimistic.
            expected_s = count / (rate_hz or 40.0) + 15
            if budget.left_s() < expected_s:
                rows.append({"row": title, "skipped": f"time budget ({budget.left_s():.0f} s left)"})
                continue
            report = run_replay(appliance, cycle_tiles(pool, count), count, rate_hz, f"suite-{index}")
            rows.append({"row": title, "rate_hz": rate_hz, **report.summary()})
        rows.append({"row": "appliance counters", **appliance.stats()})
        rows += multiscope_rows(appliance, sharp_pool, max(16, int(MULTISCOPE_TILES * scale)), budget)
    finally:
        appliance.drain_and_stop()
    return rows


def started_appliance(cfg: RigConfig, rows: list[dict[str, Any]]) -> Any:
    """The appliance of `cfg` (serving max(MULTISCOPE_ROWS) microscopes), started. If it does not start with a
    compiled deblur network, the error becomes a row and it starts uncompiled: a GPU run must not lose its
    pipeline rows to a compile."""
    from appliance.serving.pipeline import Appliance

    appliance = Appliance(with_microscopes(cfg, max(MULTISCOPE_ROWS)))
    try:
        appliance.start()
        return appliance
    except Exception as exc:
        if cfg.deblur.torch_compile == "off":
            raise
        error = f"{type(exc).__name__}: {exc}"[:500]
        rows.append({"row": f"appliance start, deblur.torch_compile {cfg.deblur.torch_compile}", "error": error})
        with contextlib.suppress(Exception):
            appliance.drain_and_stop()
    uncompiled = cfg.deblur.model_copy(update={"torch_compile": "off"})
    appliance = Appliance(with_microscopes(cfg.model_copy(update={"deblur": uncompiled}), max(MULTISCOPE_ROWS)))
    appliance.start()
    return appliance


def multiscope_rows(
    appliance: Any, pool: list[tuple[str, np.ndarray]], count: int, budget: Budget
) -> list[dict[str, Any]]:
    """MULTISCOPE_ROWS microscopes of `appliance` streaming `count` sharp tiles each at 25.4/s at once."""
    from appliance.tools.reference_controller import ReplayReport, cycle_tiles, run_replays

    rows: list[dict[str, Any]] = []
    for n in MULTISCOPE_ROWS:
        title = f"{n} microscopes, sharp tiles at 25.4/s each"
        expected_s = count / MULTISEM_TILES_PER_S + 15
        if budget.left_s() < expected_s:
            rows.append({"row": title, "skipped": f"time budget ({budget.left_s():.0f} s left)"})
            continue
        scopes = dict(list(appliance.microscopes.items())[:n])
        reports = run_replays(scopes, lambda: cycle_tiles(pool, count), count, MULTISEM_TILES_PER_S, f"multi{n}")
        total = ReplayReport.combined(reports.values())
        per_microscope = {name: report.summary() for name, report in reports.items()}
        rows.append({"row": title, "microscopes": n, **total.summary(), "per_microscope": per_microscope})
    return rows


def suite_config(config: Path | None, device: str, work_dir: Path) -> RigConfig:
    """The rig config of the run (bench/rig-gpu.yaml on cuda), writing into the scratch directory."""
    cfg = bench_config(config or (GPU_CONFIG if device == "cuda" else None))
    return cfg.model_copy(
        update={
            "output": OutputConfig(directory=work_dir, keep_originals=cfg.output.keep_originals, fsync=cfg.output.fsync)
        }
    )


def markdown(result: dict[str, Any]) -> str:
    """The suite's table, as it goes into the README (one line per measurement)."""
    env = result["environment"]
    lines = [
        f"Device: {env.get('gpu') or env['device']} ({env.get('nvidia_smi', '')}), {env['cpu_count']} CPUs, "
        f"{env['date']}; tiles {result['tile']}",
        "",
        "| what | tiles/s | detail |",
        "|---|---|---|",
    ]
    cal = result.get("calibration")
    if cal:
        lines.append(
            f"| calibrated rig: `calibrate` on {len(cal['tiles'])} sharp tiles | | baseline "
            f"{cal['baseline_sigma_px']:.2f} px, spectral reference {cal['spectral_reference']}, model share "
            f"{cal['model_share']}, {cal['seconds']:.0f} s |"
        )
    for det in (result.get("bare_detector", {}), result.get("bare_detector_1_thread", {})):
        for key in ("batch_1", "batch_4", "batch_8"):
            if key in det:
                lines.append(
                    f"| bare detector, {key.replace('_', ' ')} ({det['threads']} thread(s)) | "
                    f"{det[key]['tiles_per_s']} | {det['model_version']} |"
                )
    deb = result.get("bare_deblur", {})
    if deb:
        lines.append(
            f"| bare deblur, ONNX Runtime CPU fp32 (reference, {deb['onnx_cpu_reference']['threads']} "
            f"threads) | {deb['onnx_cpu_reference']['tiles_per_s']} | model {deb.get('model', '?')} |"
        )
        for name, entry in deb.get("variants", {}).items():
            for key in ("batch_1", "batch_4"):
                if key in entry:
                    agree = entry["vs_onnx_cpu_fp32"]
                    lines.append(
                        f"| bare deblur, {name}, {key.replace('_', ' ')} | {entry[key]['tiles_per_s']} | "
                        f"vs fp32 CPU: max {agree['max_dn']} DN, {100 * agree['share_over_1_dn']:.3f} % "
                        f"of pixels > 1 DN; first call {entry['first_call_s']} s |"
                    )
            if "batch_1" not in entry:
                lines.append(f"| bare deblur, {name} | - | {entry.get('skipped') or entry.get('error')} |")
        lines.append(f"| deblur backend chosen by `auto` | | {deb.get('auto_choice')} |")
    for row in result.get("pipeline", []):
        if "tiles_per_s" in row:
            slowest = max((one["tiles_per_s"] for one in row.get("per_microscope", {}).values()), default=None)
            each = "" if slowest is None else f"; per microscope {min_rate(row):.1f}-{slowest:.1f} tiles/s"
            lines.append(
                f"| pipeline: {row['row']} ({row['sent']} tiles) | {row['tiles_per_s']:.1f} | "
                f"p50 / p95 / p99 {row['latency_p50_s']:.2f} / {row['latency_p95_s']:.2f} / "
                f"{row['latency_p99_s']:.2f} s, lost {row['lost']}, dup {row['duplicated']}{each} |"
            )
        elif "skipped" in row:
            lines.append(f"| pipeline: {row['row']} | - | {row['skipped']} |")
        elif "error" in row:
            lines.append(f"| pipeline: {row['row']} | - | {row['error']} |")
    versions = result.get("restored_by_version")
    if versions:
        listed = ", ".join(f"{count} by {version}" for version, count in sorted(versions.items()))
        lines.append(f"| restored tiles, by deblur version (QC records) | | {listed} |")
    for name, value in result.get("ratios", {}).items():
        lines.append(f"| {name} | {value:.2f} | |")
    return "\n".join(lines) + "\n"


def min_rate(row: dict[str, Any]) -> float:
    """The slowest microscope's tiles/s in a multi-microscope row."""
    return float(min(one["tiles_per_s"] for one in row["per_microscope"].values()))


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """pipeline / bare in the same run: flat-out sharp over the bare detector at the replica's batch."""
    det = result.get("bare_detector", {})
    bare = det.get(f"batch_{result['config']['detector']['max_batch_size']}", {}).get("tiles_per_s")
    flat = next(
        (r for r in result.get("pipeline", []) if r["row"] == "sharp tiles, flat out" and "tiles_per_s" in r), None
    )
    if not bare or flat is None:
        return {}
    replicas = result["config"]["detector"]["num_replicas"]
    ratio = {"pipeline flat-out sharp / bare detector (one replica's loop)": flat["tiles_per_s"] / bare}
    if replicas > 1:
        name = f"pipeline flat-out sharp / bare detector x {replicas} replicas"
        ratio[name] = flat["tiles_per_s"] / (bare * replicas)
    return ratio


def restorations_by_version(work_dir: Path) -> dict[str, int]:
    """How many restored tiles each deblur version wrote (the QC records under work_dir): on a calibrated rig
    the rig Wiener's blend shows as `+rig-wiener-<share>`."""
    from appliance.qc_record import QC_FILENAME, QcTileRecord, read_qc_lines

    counts: dict[str, int] = {}
    for path in sorted(work_dir.rglob(QC_FILENAME)):
        for record in read_qc_lines(path):
            if isinstance(record, QcTileRecord) and record.deblur_version:
                counts[record.deblur_version] = counts.get(record.deblur_version, 0) + 1
    return counts


def calibrated_config(
    cfg: RigConfig, sharp_pool: list[tuple[str, np.ndarray]], work_dir: Path
) -> tuple[RigConfig, dict[str, Any]]:
    """`cfg` with a rig calibration made from the first CALIBRATION_TILES sharp tiles (written into work_dir),
    and what the calibration holds (baseline, the restoration blend's model share, its time)."""
    from appliance.detection.calibration import calibrate, save_calibration
    from appliance.detection.detector import BlurDetector
    from appliance.tools.offline import with_restoration_blend

    start = time.monotonic()
    names, tiles = zip(*sharp_pool[:CALIBRATION_TILES], strict=True)
    calibration = calibrate(list(tiles), list(names), BlurDetector.from_config(cfg.detector))
    calibration = with_restoration_blend(calibration, list(tiles), TileRestorer.from_config(cfg.deblur))
    path = work_dir / "calibration.json"
    save_calibration(calibration, path)
    summary = {
        "tiles": list(names),
        "baseline_sigma_px": calibration.baseline_sigma_px,
        "spectral_reference": calibration.spectral_arrays() is not None,
        "model_share": None if calibration.restoration is None else calibration.restoration.model_weight,
        "seconds": time.monotonic() - start,
    }
    return cfg.model_copy(update={"detector": cfg.detector.model_copy(update={"calibration": path})}), summary


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Folder for suite.json and suite.md (created).")],
    device: Annotated[str, typer.Option(help="cuda | cpu.")] = "cuda",
    config: Annotated[Path | None, typer.Option(help="Rig config (default: bench/rig-gpu.yaml on cuda).")] = None,
    budget_s: Annotated[float, typer.Option(min=60, help="Wall-clock budget of the whole run (s).")] = 300,
    side: Annotated[int, typer.Option(min=64, help="Tile side (px).")] = 2400,
    scale: Annotated[float, typer.Option(min=0.01, max=10, help="Scale of the pipeline rows' tile counts.")] = 1.0,
    work_dir: Annotated[Path | None, typer.Option(help="Scratch for written tiles (default: a temp dir).")] = None,
    calibrated: Annotated[bool, typer.Option(help="Run as a calibrated rig (module docstring).")] = False,
    pipeline_only: Annotated[bool, typer.Option(help="Skip the bare deblur loop and the compile.")] = False,
    deblur_only: Annotated[bool, typer.Option(help="Only the bare deblur loop and the compile (no Ray).")] = False,
    deblur_model: Annotated[
        Path | None, typer.Option(help="ONNX weights to run (.pt2 and .json beside it; default: the rig config's).")
    ] = None,
    timing_s: Annotated[
        float | None,
        typer.Option(min=0.5, help="Seconds per bare timing loop (default: detector 10, deblur 8 on cuda, 30 on cpu)."),
    ] = None,
) -> None:
    """Run every phase within the budget; print the table; write suite.json and suite.md."""
    if device not in ("cuda", "cpu"):
        raise typer.BadParameter(f"--device {device!r}: use cuda or cpu")
    if deblur_only and (pipeline_only or calibrated):
        raise typer.BadParameter("--deblur-only times the deblur network alone: drop --pipeline-only / --calibrated")
    if deblur_model is not None:
        for needed in (deblur_model, deblur_model.with_suffix(".pt2"), deblur_model.with_suffix(".json")):
            if not needed.is_file():
                raise typer.BadParameter(f"--deblur-model: {needed} does not exist (export the model first)")
    budget = Budget(budget_s)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="suite-", dir=work_dir))
    cfg = suite_config(config, device, scratch)
    if deblur_model is not None:
        cfg = cfg.model_copy(update={"deblur": cfg.deblur.model_copy(update={"model_path": deblur_model})})
    result: dict[str, Any] = {"environment": environment(device), "config": cfg.model_dump(mode="json")}

    def save() -> None:
        result["ratios"] = ratios(result)
        (out / "suite.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "suite.md").write_text(markdown(result))

    try:
        sharp_pool = multisem_tiles(16, side, "uint8", 0, 0)
        result["tile"] = f"{side}x{side} uint8 ({sharp_pool[0][1].nbytes / 1e6:.2f} MB)"
        if calibrated:
            print(f"[{budget.left_s():.0f} s left] calibrate", flush=True)
            cfg, result["calibration"] = calibrated_config(cfg, sharp_pool, scratch)
            result["config"] = cfg.model_dump(mode="json")
            save()
        if not deblur_only:
            mix_pool = multisem_tiles(16, side, "uint8", 16, 16)
            soft_pool = multisem_tiles(8, side, "uint8", 1, 0)  # every tile soft (Gaussian 1.5 px)
            print(f"[{budget.left_s():.0f} s left] bare detector", flush=True)
            detector_tiles = [p for _, p in sharp_pool + mix_pool]
            result["bare_detector"] = bare_detector(cfg, detector_tiles, max_s=timing_s or 10)
            if cfg.detector.inference_threads > 1:  # one thread beat two on the 2-core box and on the H100 box?
                one = cfg.detector.model_copy(update={"num_cpus_per_replica": 1.0})
                result["bare_detector_1_thread"] = bare_detector(
                    cfg.model_copy(update={"detector": one}), detector_tiles, timing_s or 10
                )
            save()
        soft = soft_tiles([p for _, p in sharp_pool], 8)
        deblur_s = timing_s or (8 if device == "cuda" else 30)
        if not pipeline_only:
            print(f"[{budget.left_s():.0f} s left] bare deblur", flush=True)
            model = deblur_weights(cfg)
            reference, reference_speed = onnx_cpu_reference(soft, model)
            variants: dict[str, dict[str, Any]] = {}
            result["bare_deblur"] = {
                "model": load_sidecar(model).model_version,
                "model_path": str(model),
                "onnx_cpu_reference": reference_speed,
                "variants": variants,
            }
            time_variants(cfg, soft, reference, deblur_variants(device), budget, deblur_s, variants, save)
            if not deblur_only:  # --deblur-only: after the compile, whose figure it came for (auto probes ~15 s)
                result["bare_deblur"]["auto_choice"] = TileRestorer.from_config(cfg.deblur).backend
            save()
        if not deblur_only:
            print(f"[{budget.left_s():.0f} s left] pipeline", flush=True)
            result["pipeline"] = pipeline_rows(cfg, sharp_pool, mix_pool, soft_pool, scale, budget)
            result["restored_by_version"] = restorations_by_version(scratch)
            save()
        if device == "cuda" and not pipeline_only:  # last: its compile time must not cost the pipeline rows
            print(f"[{budget.left_s():.0f} s left] torch.compile variant", flush=True)
            compile_budget = Budget(budget.left_s() - (10 if deblur_only else 60))
            time_variants(cfg, soft, reference, compiled_variants(), compile_budget, deblur_s, variants, save)
        if deblur_only:
            result["bare_deblur"]["auto_choice"] = TileRestorer.from_config(cfg.deblur).backend
    finally:
        save()
        shutil.rmtree(scratch, ignore_errors=True)
    print(markdown(result))
    lost = sum(row.get("lost", 0) + row.get("duplicated", 0) for row in result.get("pipeline", []))
    if lost:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
