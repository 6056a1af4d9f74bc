"""Wires ingest -> Serve detector/deblur -> sink on a Ray cluster; start, drain and stop."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.schema import LoggingConfig

from appliance.config import RigConfig
from appliance.deblur import DeblurDeployment
from appliance.detector import DetectorDeployment
from appliance.ingest import IngestActor
from appliance.sink import SinkActor

log = logging.getLogger(__name__)

DETECTOR_APP = "blur-detector"
DEBLUR_APP = "deblur"
# Per-request access logs at 25 tiles/s would drown the rig's log; warnings and errors still show.
SERVE_LOGGING = LoggingConfig(log_level="WARNING", enable_access_log=False)


@dataclass(frozen=True)
class RunningEndpoints:
    """Where the running appliance listens (wildcard ports resolved) and writes."""

    tile: str
    feedback: str
    output_dir: str


class Appliance:
    """One appliance on one Ray cluster. Use `start()`, then `drain_and_stop()` (also on signals)."""

    def __init__(self, cfg: RigConfig) -> None:
        self.cfg = cfg
        self._owns_ray = False
        self._ingest: Any = None
        self._sink: Any = None
        self.endpoints: RunningEndpoints | None = None

    def start(self) -> RunningEndpoints:
        """Start Ray (local unless configured), deploy both models, bind the sockets."""
        self._init_ray()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        # No HTTP proxy: tiles arrive over ZeroMQ only.
        serve.start(proxy_location="Disabled", logging_config=SERVE_LOGGING)
        detector = serve.run(
            DetectorDeployment.options(**self.cfg.detector.deployment_options(), logging_config=SERVE_LOGGING)
            .bind(self.cfg.detector),
            name=DETECTOR_APP, route_prefix=None,
        )
        deblur = serve.run(
            DeblurDeployment.options(**self.cfg.deblur.deployment_options(), logging_config=SERVE_LOGGING)
            .bind(self.cfg.deblur),
            name=DEBLUR_APP, route_prefix=None,
        )
        self._sink = SinkActor.remote(self.cfg.output, self.cfg.ingest.feedback_endpoint)
        sink_info = ray.get(self._sink.endpoints.remote())
        self._ingest = IngestActor.remote(self.cfg.ingest, detector, deblur, self._sink)
        tile_endpoint = ray.get(self._ingest.start.remote())
        self.endpoints = RunningEndpoints(tile_endpoint, sink_info["feedback"], sink_info["output_dir"])
        log.info("appliance %s listening: tiles %s, feedback %s, output %s", self.cfg.rig_name,
                 self.endpoints.tile, self.endpoints.feedback, self.endpoints.output_dir)
        return self.endpoints

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters of the ingest (received, in flight, retries) and the sink (by outcome)."""
        return {"ingest": ray.get(self._ingest.stats.remote()), "sink": ray.get(self._sink.stats.remote())}

    def drain_and_stop(self) -> dict[str, dict[str, int]]:
        """Stop reading, finish every accepted tile, flush feedback, then tear everything down."""
        final: dict[str, dict[str, int]] = {}
        if self._ingest is not None:
            final["ingest"] = ray.get(self._ingest.drain.remote())
        if self._sink is not None:
            final["sink"] = ray.get(self._sink.close.remote())
        if ray.is_initialized():
            serve.shutdown()
        if self._owns_ray:
            ray.shutdown()
        self._ingest = self._sink = None
        self.endpoints = None
        return final

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        ray_cfg = self.cfg.ray
        if ray_cfg.address is None:
            # A local single-machine cluster: token auth guards nothing here and needs a token file.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address=ray_cfg.address, num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus,
            include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level=logging.WARNING,
        )
        self._owns_ray = True
