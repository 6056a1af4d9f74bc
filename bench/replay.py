"""Replay tiles over ZeroMQ to an appliance and measure it; also time the bare detector/deblur loops.

Examples:
  python bench/replay.py --local --tiles 300                        # MultiSEM-size tiles, 25.4 tiles/s
  python bench/replay.py --local --tiles 300 --rate 0               # flat out
  python bench/replay.py --local --tiles 300 --microscopes 4        # 4 microscopes at 25.4 tiles/s each
  python bench/replay.py --tiles-dir /data/section_0001 --tile-endpoint tcp://rig:5555 \
      --feedback-endpoint tcp://rig:5556                            # a running appliance
      [--curve-client-key keys/controller.key_secret --curve-server-key keys/server.key]   # a CURVE rig

Generated tiles are mosaics of real EM (../shared/data/isbi2012-train) at MultiSEM size (default
2400x2400 uint8, 5.76 MB); by default 1 in 16 is made soft (Gaussian sigma 1.5 px) and 1 in 16 beyond
repair (sigma 6 px) with models.blur_synth. Prints a table and writes a JSON report. With --microscopes N
(--local) one appliance serves N microscopes (shared detector and deblur), each streamed by its own
controller at --rate: a table per microscope and one for all of them together.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # bench/ runs from a checkout: models/ is importable from there

from appliance.config import ConfigError, IngestConfig, MetricsConfig, RigConfig, load_rig_config  # noqa: E402
from appliance.tile_io import TileError, read_tile  # noqa: E402
from appliance.tools.reference_controller import (  # noqa: E402
    MULTISEM_TILES_PER_S,
    ControllerCurve,
    ReferenceController,
    ReplayReport,
    cycle_tiles,
    run_replay,
    run_replays,
)
from appliance.tools.replay_summary import print_table, replay_table  # noqa: E402

app = typer.Typer(add_completion=False)


def multisem_tiles(
    count: int, side: int, dtype: str, soft_every: int, retake_every: int
) -> list[tuple[str, np.ndarray]]:
    """A pool of `count` real-EM mosaics of side x side px; some soft or beyond repair (blur_synth)."""
    from models.blur_synth import BlurParams, load_image, load_split, synthesize

    images = [load_image(path) for path in load_split("train") + load_split("val") + load_split("test")]
    rng = np.random.default_rng(0)
    pool = []
    for index in range(count):
        picks = rng.choice(len(images), size=(side // 512 + 1) ** 2)
        rows = side // 512 + 1
        mosaic = np.vstack([np.hstack([images[p] for p in picks[r * rows : (r + 1) * rows]]) for r in range(rows)])
        sharp = mosaic[:side, :side]
        if dtype == "uint16":
            sharp = sharp.astype(np.uint16) * 257
        params, kind = None, "sharp"
        if retake_every and index % retake_every == retake_every - 1:
            params, kind = BlurParams("gaussian", 6.0), "retake"
        elif soft_every and index % soft_every == soft_every // 2:
            params, kind = BlurParams("gaussian", 1.5), "soft"
        tile = sharp if params is None else synthesize(sharp, params, rng, noise=True, dtype=np.dtype(dtype))
        pool.append((f"{kind}{index:03d}", np.ascontiguousarray(tile)))
    return pool


def directory_tiles(directory: Path) -> list[tuple[str, np.ndarray]]:
    """Every PNG/TIFF in `directory` (sorted), read and checked; a bad file stops the bench naming it."""
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff"))
    if not paths:
        raise typer.BadParameter(f"no .png/.tif/.tiff tiles in {directory}")
    return [(path.stem, read_tile(path)) for path in paths]


def time_bare_loops(cfg: RigConfig, pool: list[tuple[str, np.ndarray]], repeats: int) -> dict[str, Any]:
    """Detector and deblur called directly in this process (no Ray, no ZeroMQ) on the same tiles."""
    from appliance.detection.detector import BlurDetector
    from appliance.restoration.restorer import TileRestorer

    detector = BlurDetector.from_config(cfg.detector)
    restorer = TileRestorer.from_config(cfg.deblur)
    tiles = [pixels for _, pixels in pool]
    batch = cfg.detector.max_batch_size  # the largest batch a replica sees
    detector.assess(tiles[:1])  # warm-up (session creation, caches)
    t0 = time.perf_counter()
    for _ in range(repeats):
        assessments = [a for i in range(0, len(tiles), batch) for a in detector.assess(tiles[i : i + batch])]
    detect_s = (time.perf_counter() - t0) / (repeats * len(tiles))
    soft = [(tile, a) for tile, a in zip(tiles, assessments, strict=True) if a.label == "soft"]
    deblur_s = float("nan")
    if soft:
        t1 = time.perf_counter()
        for tile, assessment in soft:
            restorer.restore([tile], [assessment])
        deblur_s = (time.perf_counter() - t1) / len(soft)
    soft_fraction = len(soft) / len(tiles)
    per_tile_s = detect_s + soft_fraction * (deblur_s if soft else 0.0)
    return {
        "detector_version": detector.model_version,
        "deblur_version": restorer.model_version,
        "detect_s_per_tile": detect_s,
        "deblur_s_per_soft_tile": deblur_s,
        "soft_fraction": soft_fraction,
        "detector_tiles_per_s": 1.0 / detect_s,
        "deblur_tiles_per_s": 1.0 / deblur_s if soft else None,
        "bare_mix_tiles_per_s": 1.0 / per_tile_s,
        "labels": {label: sum(a.label == label for a in assessments) for label in ("sharp", "soft", "retake")},
    }


def bench_config(config: Path | None) -> RigConfig:
    """The rig config at `config`, or the defaults on ephemeral loopback ports (tiles, feedback, metrics)."""
    if config is None:
        return RigConfig(
            ingest=IngestConfig(tile_endpoint="tcp://127.0.0.1:*", feedback_endpoint="tcp://127.0.0.1:*"),
            metrics=MetricsConfig(address="127.0.0.1:0"),
        )
    try:
        return load_rig_config(config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def with_microscopes(cfg: RigConfig, count: int) -> RigConfig:
    """`cfg` serving `count` microscopes scope-1..N on free loopback ports, each writing to
    output.directory/scope-K (cfg itself when count is 1 or it lists its own microscopes)."""
    if count == 1 or cfg.microscopes:
        return cfg
    # The single-microscope endpoints and folder are left out: the microscopes name their own.
    raw = cfg.model_dump(
        mode="json", exclude={"ingest": {"tile_endpoint", "feedback_endpoint"}, "output": {"directory"}}
    )
    raw["microscopes"] = [
        {
            "name": f"scope-{k}",
            "tile_endpoint": "tcp://127.0.0.1:*",
            "feedback_endpoint": "tcp://127.0.0.1:*",
            "output_directory": str(cfg.output.directory / f"scope-{k}"),
        }
        for k in range(1, count + 1)
    ]
    return RigConfig.model_validate(raw)


@app.command()
def main(
    tiles: Annotated[int, typer.Option(min=1, help="Tiles to send.")] = 300,
    rate: Annotated[float, typer.Option(min=0.0, help="Tiles/s; 0 = flat out.")] = MULTISEM_TILES_PER_S,
    tiles_dir: Annotated[Path | None, typer.Option(help="Replay these PNG/TIFF tiles, not generated ones.")] = None,
    side: Annotated[int, typer.Option(min=64, help="Generated tile side (px).")] = 2400,
    dtype: Annotated[str, typer.Option(help="Generated tile dtype: uint8 | uint16.")] = "uint8",
    pool: Annotated[int, typer.Option(min=1, help="Distinct generated tiles, sent in turn.")] = 16,
    soft_every: Annotated[int, typer.Option(min=0, help="Every Nth generated tile is soft (0 = none).")] = 16,
    retake_every: Annotated[int, typer.Option(min=0, help="Every Nth is beyond repair (0 = none).")] = 16,
    local: Annotated[bool, typer.Option(help="Start an appliance in this process (local Ray) for the run.")] = False,
    config: Annotated[Path | None, typer.Option(help="Rig config for --local and the bare loops.")] = None,
    tile_endpoint: Annotated[str, typer.Option(help="Running appliance's tile endpoint.")] = "tcp://127.0.0.1:5555",
    feedback_endpoint: Annotated[
        str, typer.Option(help="Running appliance's feedback endpoint.")
    ] = "tcp://127.0.0.1:5556",
    curve_client_key: Annotated[
        Path | None, typer.Option(help="A CURVE rig: this controller's key pair file (keys generate, NAME.key_secret).")
    ] = None,
    curve_server_key: Annotated[
        Path | None, typer.Option(help="A CURVE rig: the rig's public key file (server.key).")
    ] = None,
    microscopes: Annotated[
        int, typer.Option(min=1, max=64, help="--local: microscopes on the appliance, each streamed at --rate.")
    ] = 1,
    bare_repeats: Annotated[int, typer.Option(min=0, help="Passes of the bare loops over the pool (0 = skip).")] = 1,
    json_out: Annotated[Path | None, typer.Option(help="JSON report path.")] = None,
) -> None:
    """Replay tiles, print throughput/latency/loss and the pipeline/bare ratio, write JSON."""
    if dtype not in ("uint8", "uint16"):
        raise typer.BadParameter(f"--dtype {dtype!r}: use uint8 or uint16")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if microscopes > 1 and not local:
        raise typer.BadParameter("--microscopes > 1 starts its own appliance: add --local")
    cfg = with_microscopes(bench_config(config), microscopes)
    try:
        tile_pool = (
            directory_tiles(tiles_dir) if tiles_dir else multisem_tiles(pool, side, dtype, soft_every, retake_every)
        )
    except TileError as exc:
        raise typer.BadParameter(str(exc)) from None
    mb = tile_pool[0][1].nbytes / 1e6
    print(f"{len(tile_pool)} distinct tiles of {tile_pool[0][1].shape} {tile_pool[0][1].dtype} ({mb:.2f} MB)")

    bare = time_bare_loops(cfg, tile_pool, bare_repeats) if bare_repeats else None

    from appliance.serving.pipeline import Appliance

    section = time.strftime("bench-%Y%m%d-%H%M%S")
    per_microscope: dict[str, ReplayReport] = {}
    if local:
        appliance = Appliance(cfg)
        appliance.start()
        try:
            if len(appliance.microscopes) == 1:
                report = run_replay(appliance, cycle_tiles(tile_pool, tiles), tiles, rate or None, section)
            else:
                per_microscope = run_replays(
                    appliance.microscopes, lambda: cycle_tiles(tile_pool, tiles), tiles, rate or None, section
                )
                report = ReplayReport.combined(per_microscope.values())
            stats = (
                {name: appliance.stats(name) for name in appliance.microscopes} if per_microscope else appliance.stats()
            )
        finally:
            appliance.drain_and_stop()
    else:
        if (curve_client_key is None) != (curve_server_key is None):
            raise typer.BadParameter("give both --curve-client-key and --curve-server-key, or neither")
        curve = ControllerCurve.from_files(curve_client_key, curve_server_key) if curve_client_key else None
        with ReferenceController(tile_endpoint, feedback_endpoint, curve=curve) as client:
            report = client.send_section(section, cycle_tiles(tile_pool, tiles), rate_hz=rate or None)
        stats = None
    for name, one in per_microscope.items():
        print_table(replay_table(one, f"bench/replay.py, microscope {name}", {"target rate": _rate(rate)}))
    _report(report, bare, stats, rate, json_out, tile_pool, per_microscope)


def _rate(rate: float) -> str:
    return f"{rate} tiles/s" if rate else "flat out"


def _report(
    report: ReplayReport,
    bare: dict[str, Any] | None,
    stats: dict[str, Any] | None,
    rate: float,
    json_out: Path | None,
    tile_pool: list[tuple[str, np.ndarray]],
    per_microscope: dict[str, ReplayReport],
) -> None:
    extra: dict[str, Any] = {"target rate": _rate(rate) + (" per microscope" if per_microscope else "")}
    if per_microscope:
        extra["microscopes"] = str(len(per_microscope))
    ratio = None
    if bare:
        ratio = report.tiles_per_s / bare["bare_mix_tiles_per_s"]
        extra["bare detector"] = f"{bare['detector_tiles_per_s']:.1f} tiles/s ({bare['detector_version']})"
        if bare["deblur_tiles_per_s"]:
            extra["bare deblur"] = f"{bare['deblur_tiles_per_s']:.2f} tiles/s ({bare['deblur_version']})"
        extra["bare loop, same mix"] = f"{bare['bare_mix_tiles_per_s']:.1f} tiles/s"
        extra["pipeline / bare"] = f"{ratio:.2f}"
    title = f"bench/replay.py, all {len(per_microscope)} microscopes" if per_microscope else "bench/replay.py"
    print_table(replay_table(report, title, extra))
    out = json_out or REPO_ROOT / "bench" / "results" / f"replay-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "pipeline": report.summary(),
        "microscopes": {name: one.summary() for name, one in per_microscope.items()},
        "bare": bare,
        "pipeline_over_bare": ratio,
        "appliance_stats": stats,
        "tile_shape": list(tile_pool[0][1].shape),
        "tile_dtype": str(tile_pool[0][1].dtype),
        "tile_mb": tile_pool[0][1].nbytes / 1e6,
        "rate_hz": rate or None,
        "cpu_count": os.cpu_count(),
    }
    out.write_text(json.dumps(payload, indent=2, default=float))
    print(f"JSON report: {out}")
    if report.lost or report.duplicated:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
