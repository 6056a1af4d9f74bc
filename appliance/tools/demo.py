"""The demo job: a local appliance on CPU, fed the bundled real EM sample tiles over ZeroMQ."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from appliance.config import IngestConfig, MetricsConfig, OutputConfig, RayConfig, RigConfig
from appliance.operator.section_report import REPORT_FILENAME
from appliance.serving.pipeline import Appliance
from appliance.tile_io import read_tile
from appliance.tools.reference_controller import ReplayReport, cycle_tiles, run_replay

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_tiles"
DEMO_SECTION = "demo"
DEMO_BEAMS = 7  # a small multi-beam head, so the report's per-beam table has rows


def sample_tiles() -> list[tuple[str, np.ndarray]]:
    """The bundled tiles (name, pixels): real ISBI 2012 EM, some made soft or beyond repair."""
    paths = sorted(SAMPLE_DIR.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no sample tiles in {SAMPLE_DIR}; reinstall the package")
    return [(path.stem, read_tile(path)) for path in paths]


def demo_config(output_dir: Path) -> RigConfig:
    """Local Ray on this machine's CPUs, ephemeral loopback ports (metrics too), outputs in `output_dir`."""
    return RigConfig(
        rig_name="demo",
        ingest=IngestConfig(
            tile_endpoint="tcp://127.0.0.1:*",
            feedback_endpoint="tcp://127.0.0.1:*",
            # Half the sample tiles are soft or beyond repair on purpose (to show both): the safety rule
            # would stop restoring at tile 50 (26 of 50), so it is off here (docs/operating.md).
            implausible_blur_share=1.0,
        ),
        output=OutputConfig(directory=output_dir),
        ray=RayConfig(num_cpus=os.cpu_count() or 2),
        metrics=MetricsConfig(address="127.0.0.1:0"),
    )


def run_demo(
    output_dir: Path | None, count: int, rate_hz: float | None, verbose: bool = False
) -> tuple[ReplayReport, Path, Path]:
    """Start the appliance, replay `count` sample tiles, drain and stop.

    Returns (replay report, output directory, the section's report.html). Prints the metrics URL first.
    """
    output_dir = output_dir or Path("appliance-out") / time.strftime("demo-%Y%m%d-%H%M%S")
    appliance = Appliance(demo_config(output_dir), ray_logs_to_terminal=verbose)
    endpoints = appliance.start()
    print(f"metrics while it runs: curl {endpoints.metrics}", flush=True)
    try:
        tiles = cycle_tiles(sample_tiles(), count)
        report = run_replay(appliance, tiles, count, rate_hz, DEMO_SECTION, beams=DEMO_BEAMS)
    finally:
        appliance.drain_and_stop()  # waits for the section report
    return report, Path(endpoints.output_dir), Path(endpoints.output_dir) / DEMO_SECTION / REPORT_FILENAME
