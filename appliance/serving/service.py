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
    if cfg.deblur.warmup_tile_shape is not None:  # a compile at start can take minutes: say why it waits
        height, width = cfg.deblur.warmup_tile_shape
        print(
            f"deblur replicas warm up on a {height}x{width} tile before the appliance is ready (deblur.torch_compile: "
            f"{cfg.deblur.torch_compile}; a compile took ~20 s on an H100, ~3 min with max-autotune)",
            flush=True,
        )
    try:
        appliance.start()
        # ray.init installs its own fatal-signal handlers in this process: take SIGTERM/SIGINT back.
        for sig in signals:
            signal.signal(sig, _on_signal)
        several = len(appliance.microscopes) > 1
        for name, scope in appliance.microscopes.items():
            print(
                f"appliance {cfg.rig_name}{f', microscope {name}' if several else ''} ready: tiles {scope.tile}, "
                f"feedback {scope.feedback}, output {scope.output_dir}, metrics {scope.metrics or 'off'}",
                flush=True,
            )
        reports = ", ".join(f"{e.output_dir}/<section>/{REPORT_FILENAME}" for e in appliance.microscopes.values())
        print(f"each section's QC report: {reports}; Ray's own logs: {appliance.ray_log_dir()}", flush=True)
        _print_status_until(stop, appliance, status_every_s)
    finally:
        final = appliance.drain_and_stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"drained and stopped: {final}", flush=True)
    return final


def _print_status_until(stop: threading.Event, appliance: Appliance, every_s: float) -> None:
    """One status line per microscope every `every_s` (`status NAME:` when there are several)."""
    scopes = dict(appliance.microscopes)
    label = {name: f"status {name}:" if len(scopes) > 1 else "status:" for name in scopes}
    previous = {name: _stats(appliance, name) for name in scopes}
    t_previous = time.monotonic()
    while not stop.wait(every_s):
        now = time.monotonic()
        for name, endpoints in scopes.items():
            current, before = _stats(appliance, name), previous[name]
            previous[name] = current
            if current is None or before is None:
                # A dead sink or ingest is restarted and resumed by supervision (docs/operating.md): keep serving.
                print(f"{label[name]} unavailable, an actor is restarting", flush=True)
                continue
            line = status_line(
                before,
                current,
                now - t_previous,
                appliance.cfg.ingest.max_in_flight,
                shutil.disk_usage(endpoints.output_dir).free,
                appliance.last_report(name),
            )
            print(line.replace("status:", label[name], 1), flush=True)
        t_previous = now


def _stats(appliance: Appliance, microscope: str) -> dict[str, dict[str, int]] | None:
    """The microscope's counters, None while one of its actors is down or restarting."""
    try:
        return appliance.stats(microscope)
    except (RayActorError, ActorUnavailableError, GetTimeoutError):
        return None
