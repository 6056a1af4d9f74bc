"""The long-running appliance for a rig: serve until SIGTERM/SIGINT, then drain and exit cleanly."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from appliance.config import RigConfig
from appliance.pipeline import Appliance

log = logging.getLogger(__name__)

STATS_EVERY_S = 60.0


def serve_until_signal(cfg: RigConfig, stop: threading.Event | None = None) -> dict[str, dict[str, int]]:
    """Run the appliance until SIGTERM/SIGINT (or `stop` is set); drain in-flight tiles; return counters."""
    stop = stop or threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.warning("%s received: draining in-flight tiles", signal.Signals(signum).name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    appliance = Appliance(cfg)
    try:
        endpoints = appliance.start()
        # ray.init installs its own fatal-signal handlers in this process: take SIGTERM/SIGINT back.
        for sig in signals:
            signal.signal(sig, _on_signal)
        print(f"appliance {cfg.rig_name} ready: tiles {endpoints.tile}, feedback {endpoints.feedback}, "
              f"output {endpoints.output_dir}", flush=True)
        while not stop.wait(STATS_EVERY_S):
            log.info("stats %s", appliance.stats())
    finally:
        final = appliance.drain_and_stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"drained and stopped: {final}", flush=True)
    return final
