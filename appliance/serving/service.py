"""The long-running appliance for a rig: serve until SIGTERM/SIGINT, then drain and exit cleanly."""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from types import FrameType

from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from appliance.config import RigConfig
from appliance.operator.section_report import REPORT_FILENAME
from appliance.operator.status_line import status_line
from appliance.serving.pipeline import Appliance

log = logging.getLogger(__name__)

STATUS_EVERY_S = 60.0


def serve_until_signal(
    cfg: RigConfig,
    stop: threading.Event | None = None,
    status_every_s: float = STATUS_EVERY_S,
    verbose: bool = False,
) -> dict[str, dict[str, int]]:
    """Run the appliance until SIGTERM/SIGINT (or `stop` is set), printing a status line every
    `status_every_s`; drain in-flight tiles; return counters. verbose: Ray's own output on the terminal."""
    stop = stop or threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.warning("%s received: draining in-flight tiles", signal.Signals(signum).name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    appliance = Appliance(cfg, ray_logs_to_terminal=verbose)
    try:
        endpoints = appliance.start()
        # ray.init installs its own fatal-signal handlers in this process: take SIGTERM/SIGINT back.
        for sig in signals:
            signal.signal(sig, _on_signal)
        print(
            f"appliance {cfg.rig_name} ready: tiles {endpoints.tile}, feedback {endpoints.feedback}, "
            f"output {endpoints.output_dir}, metrics {endpoints.metrics or 'off'}",
            flush=True,
        )
        print(
            f"each section's QC report: {endpoints.output_dir}/<section>/{REPORT_FILENAME}; "
            f"Ray's own logs: {appliance.ray_log_dir()}",
            flush=True,
        )
        _print_status_until(stop, appliance, status_every_s)
    finally:
        final = appliance.drain_and_stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"drained and stopped: {final}", flush=True)
    return final


def _print_status_until(stop: threading.Event, appliance: Appliance, every_s: float) -> None:
    assert appliance.endpoints is not None
    output_dir = appliance.endpoints.output_dir
    previous, t_previous = appliance.stats(), time.monotonic()
    while not stop.wait(every_s):
        try:
            current, now = appliance.stats(), time.monotonic()
        except (RayActorError, ActorUnavailableError, GetTimeoutError) as exc:
            # A dead sink or ingest is restarted and resumed by supervision (docs/operating.md): keep serving.
            print(f"status: unavailable, an actor is restarting ({type(exc).__name__})", flush=True)
            continue
        line = status_line(
            previous,
            current,
            now - t_previous,
            appliance.cfg.ingest.max_in_flight,
            shutil.disk_usage(output_dir).free,
            appliance.last_report(),
        )
        print(line, flush=True)
        previous, t_previous = current, now
