"""Where a calibrated rig's soft tile spends its time in one process, stage by stage (no Ray, no ZeroMQ).

    python bench/calibrated_deblur_stages.py [--device cuda] [--side 2400] [--repeats 3] [--out stages.json]

The pipeline's "soft tiles only, flat out" row (bench/gpu_suite.py --calibrated) gives one number for the
whole path; this splits it. With the rig config of the GPU run (bench/rig-gpu.yaml on cuda, the bench
default on cpu), on the suite's tiles (bench/replay.py multisem_tiles: ISBI mosaics, Gaussian 1.5 px + noise):
- the detector on a soft tile, batch 1, with the detector replica's threads, without and with the rig's
  spectrum (a calibrated rig's detector replica reads each tile's spectrum against it);
- one deblur replica's batch (deblur.max_batch_size tiles): the model alone; the rig Wiener on one tile,
  and on the batch on the replica's threads; `blend` alone; and TileRestorer.restore_versioned with the rig
  blend, as a replica runs it.
Each stage runs with OpenCV's thread pool as a Ray worker finds it (cv2's default: every core of the box) and
bounded to the replica's CPUs (`--cv2-threads` lists the settings; 0 = cv2's default).
The calibration is `calibrate` on 5 sharp tiles; the blend's model share is set to 0.5 (what the GPU suite's
calibrations measured) instead of measured, as the share changes no stage's cost. The soft tiles are those the
detector labels `soft` without the calibration.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import cv2
import typer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # bench/ runs from a checkout: models/ and bench/ are importable

from appliance.detection.calibration import calibrate  # noqa: E402
from appliance.detection.detector import BlurDetector  # noqa: E402
from appliance.restoration.restorer import TileRestorer  # noqa: E402
from appliance.restoration.rig_wiener import RigRestoration, blend, rig_wiener  # noqa: E402
from bench.gpu_suite import GPU_CONFIG  # noqa: E402
from bench.replay import bench_config, multisem_tiles  # noqa: E402

app = typer.Typer(add_completion=False)
MODEL_SHARE = 0.5


def timed(stage: Callable[[], object], repeats: int) -> dict[str, float]:
    """Best and median wall seconds of `repeats` calls, after one warm-up call."""
    stage()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        stage()
        seconds.append(time.perf_counter() - started)
    return {"best_s": round(min(seconds), 4), "median_s": round(statistics.median(seconds), 4)}


@app.command()
def main(
    device: Annotated[str, typer.Option(help="cuda | cpu (the rig config: bench/rig-gpu.yaml on cuda).")] = "cpu",
    side: Annotated[int, typer.Option(min=256, help="Tile side (px).")] = 2400,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls per stage.")] = 3,
    cv2_threads: Annotated[
        list[int] | None, typer.Option(help="OpenCV thread settings to run every stage with (0: cv2's default).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="JSON file for the results.")] = None,
) -> None:
    """Time each stage; print and optionally write the JSON."""
    cfg = bench_config(GPU_CONFIG if device == "cuda" else None)
    sharp = [tile for _, tile in multisem_tiles(5, side, "uint8", 0, 0)]
    soft = [tile for _, tile in multisem_tiles(2 * cfg.deblur.max_batch_size, side, "uint8", 1, 0)]
    detector = BlurDetector.from_config(cfg.detector)
    calibration = calibrate(sharp, [f"sharp{i}" for i in range(len(sharp))], detector)
    restorer = TileRestorer.from_config(cfg.deblur)
    if cfg.deblur.warmup_tile_shape is not None:
        restorer.warm_up((side, side))
    reference, restoring = calibration.spectral_arrays(), calibration.spectral_arrays(restoring=True)
    if reference is None or restoring is None:
        raise SystemExit(f"calibration on {side} px tiles gave no spectral reference: no rig Wiener to time")
    rig = RigRestoration(restoring, MODEL_SHARE, restorer.weights_version, calibration.noise_level**2)
    assessments = detector.assess(soft)
    picked = [(t, a) for t, a in zip(soft, assessments, strict=True) if a.label == "soft"]
    batch = picked[: cfg.deblur.max_batch_size]
    if len(batch) < cfg.deblur.max_batch_size:
        labels = [a.label for a in assessments]
        raise SystemExit(f"only {len(picked)} of {len(soft)} soft tiles read soft: labels {labels}")
    tiles, soft_assessments = [t for t, _ in batch], [a for _, a in batch]
    rigs: list[RigRestoration | None] = [rig] * len(tiles)
    threads = cfg.deblur.inference_threads
    result: dict[str, Any] = {
        "device": device,
        "cpu_count": os.cpu_count(),
        "tile": f"{side}x{side} uint8, Gaussian 1.5 px + noise",
        "batch": len(tiles),
        "deblur_backend": restorer.backend,
        "deblur_threads": threads,
        "detector_threads": cfg.detector.inference_threads,
        "settings": {},
    }
    wiener_of = partial(rig_wiener, reference=rig.reference, own_noise_power=rig.own_noise_power)
    wiener = wiener_of(tiles[0])
    assert wiener is not None
    model_out = restorer.restore(tiles[:1], soft_assessments[:1])[0]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for setting in cv2_threads or [0, threads]:
            cv2.setNumThreads((os.cpu_count() or 1) if setting == 0 else setting)
            stages = {
                "detector, 1 tile": timed(lambda: detector.assess(tiles[:1]), repeats),
                "detector with the rig's spectrum, 1 tile": timed(
                    lambda: detector.assess(tiles[:1], spectral_references=[reference]), repeats
                ),
                "model alone, batch": timed(lambda: restorer.restore(tiles, soft_assessments), repeats),
                "rig Wiener, 1 tile": timed(lambda: wiener_of(tiles[0]), repeats),
                "rig Wiener alone, batch on the replica's threads": timed(
                    lambda: list(pool.map(wiener_of, tiles)), repeats
                ),
                "blend, 1 tile": timed(lambda: blend(model_out, wiener, MODEL_SHARE), repeats),
                "restore_versioned with the rig blend, batch": timed(
                    lambda: restorer.restore_versioned(tiles, soft_assessments, rigs=rigs), repeats
                ),
            }
            result["settings"][f"cv2 threads {cv2.getNumThreads()}"] = stages
            print(json.dumps({f"cv2 threads {cv2.getNumThreads()}": stages}), flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
