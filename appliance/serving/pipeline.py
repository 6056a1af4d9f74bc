"""Wires ingest -> Serve detector/deblur -> sink on a Ray cluster; start, drain and stop."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import zmq
from ray import serve
from ray.serve.schema import LoggingConfig

from appliance.config import RigConfig
from appliance.detection.calibration import load_configured_calibration
from appliance.detection.online_baseline import OnlineBaseline
from appliance.operator.metrics_endpoint import SCRAPE_TIMEOUT_S, HostMetrics, MetricsEndpoint
from appliance.operator.report_figures import Thresholds
from appliance.serving.blur_detector_deployment import BlurDetectorDeployment
from appliance.serving.deblur_deployment import DeblurDeployment
from appliance.serving.ray_lockdown import init_local_ray
from appliance.serving.supervisor import Restart, Supervisor
from appliance.stream.ingest import IngestActor
from appliance.stream.sink import SinkActor
from appliance.stream.zmq_security import check_curve_keys

log = logging.getLogger(__name__)

DEFAULT_RAY_LOG_DIR = "/tmp/ray/session_latest/logs"
DETECTOR_APP = "blur-detector"
DEBLUR_APP = "deblur"
# Per-request access logs at 25 tiles/s would drown the rig's log; warnings and errors still show.
SERVE_LOGGING = LoggingConfig(log_level="WARNING", enable_access_log=False)
# Supervised actors: Ray restarts a killed sink or ingest process (the Supervisor resumes it). Sink calls
# are idempotent, so Ray also retries them on the restarted sink; ingest calls are not retried.
SINK_OPTIONS = {"max_restarts": -1, "max_task_retries": -1}
INGEST_OPTIONS = {"max_restarts": -1, "max_task_retries": 0}
STATS_TIMEOUT_S = 10.0  # a restarting actor answers after its restart; the status line skips a beat
DRAINING_MESSAGE = "appliance stopping: send nothing more; resend every tile without an answer after the restart"


def resolve_endpoint(endpoint: str) -> str:
    """`tcp://host:*` -> `tcp://host:<a free port>` (other endpoints unchanged), resolved once by the driver
    so that an actor Ray restarts binds the very port the controller already connects to."""
    if not endpoint.endswith(":*"):
        return endpoint
    context = zmq.Context()
    probe = context.socket(zmq.PULL)
    probe.setsockopt(zmq.LINGER, 0)
    try:
        probe.bind(endpoint)
        return probe.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        probe.close()
        context.term()


@dataclass(frozen=True)
class RunningEndpoints:
    """Where the running appliance listens (wildcard ports resolved) and writes."""

    tile: str
    feedback: str
    output_dir: str
    metrics: str | None = None  # http://host:port/metrics, None when metrics.enabled is false


class Appliance:
    """One appliance on one Ray cluster. Use `start()`, then `drain_and_stop()` (also on signals).

    ray_logs_to_terminal: forward Ray's worker and raylet output to this process's stderr (--verbose);
    otherwise it stays in Ray's session log files (`ray_log_dir`).
    """

    def __init__(self, cfg: RigConfig, ray_logs_to_terminal: bool = False) -> None:
        self.cfg = cfg
        self._ray_logs_to_terminal = ray_logs_to_terminal
        self._owns_ray = False
        self._ingest: Any = None
        self._sink: Any = None
        self._metrics: MetricsEndpoint | None = None
        self._supervisor: Supervisor | None = None
        self.endpoints: RunningEndpoints | None = None

    def start(self) -> RunningEndpoints:
        """Start Ray (local unless configured), deploy both models, bind the sockets.

        Raises ConfigError before anything starts when detector.calibration cannot be used.
        """
        calibration = load_configured_calibration(self.cfg.detector)
        check_curve_keys(self.cfg.security)
        self._init_ray()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        # No HTTP proxy: tiles arrive over ZeroMQ only.
        serve.start(proxy_location="Disabled", logging_config=SERVE_LOGGING)
        detector = serve.run(
            BlurDetectorDeployment.options(  # type: ignore[attr-defined]  # added by @serve.deployment
                **self.cfg.detector.deployment_options(), logging_config=SERVE_LOGGING
            ).bind(self.cfg.detector),
            name=DETECTOR_APP,
            route_prefix=None,
        )
        deblur = serve.run(
            DeblurDeployment.options(  # type: ignore[attr-defined]  # added by @serve.deployment
                **self.cfg.deblur.deployment_options(), logging_config=SERVE_LOGGING
            ).bind(self.cfg.deblur),
            name=DEBLUR_APP,
            route_prefix=None,
        )
        thresholds = Thresholds(self.cfg.detector.sharp_sigma_px, self.cfg.detector.max_restorable_sigma_px)
        ingest_cfg = self.cfg.ingest.model_copy(
            update={
                "tile_endpoint": resolve_endpoint(self.cfg.ingest.tile_endpoint),
                "feedback_endpoint": resolve_endpoint(self.cfg.ingest.feedback_endpoint),
            }
        )
        self._sink = SinkActor.options(**SINK_OPTIONS).remote(  # type: ignore[attr-defined]  # added by @ray.remote
            self.cfg.output,
            ingest_cfg.feedback_endpoint,
            thresholds,
            feedback_hwm=ingest_cfg.feedback_hwm,
            security=self.cfg.security,
        )
        sink_info = ray.get(self._sink.endpoints.remote())
        self._ingest = IngestActor.options(**INGEST_OPTIONS).remote(  # type: ignore[attr-defined]
            ingest_cfg,
            detector,
            deblur,
            self._sink,
            calibrated=calibration is not None,
            security=self.cfg.security,
            focus=OnlineBaseline(self.cfg.detector, calibration),
        )
        tile_endpoint = ray.get(self._ingest.start.remote())
        self._supervisor = Supervisor({"sink": self._sink, "ingest": self._ingest})
        self._supervisor.start()
        metrics_url = self._start_metrics(sink_info["output_dir"]) if self.cfg.metrics.enabled else None
        self.endpoints = RunningEndpoints(tile_endpoint, sink_info["feedback"], sink_info["output_dir"], metrics_url)
        log.info(
            "appliance %s listening: tiles %s, feedback %s, output %s, metrics %s",
            self.cfg.rig_name,
            self.endpoints.tile,
            self.endpoints.feedback,
            self.endpoints.output_dir,
            metrics_url,
        )
        return self.endpoints

    def _start_metrics(self, output_dir: str) -> str:
        replicas = {
            BlurDetectorDeployment.name: self.cfg.detector.num_replicas,  # type: ignore[attr-defined]
            DeblurDeployment.name: self.cfg.deblur.num_replicas,  # type: ignore[attr-defined]
        }
        host = HostMetrics(Path(output_dir), replicas, calibrated=self.cfg.detector.calibration is not None)
        ingest, sink = self._ingest, self._sink

        def collect() -> bytes:
            texts = ray.get([ingest.metrics_text.remote(), sink.metrics_text.remote()], timeout=SCRAPE_TIMEOUT_S)
            return b"".join([*texts, host.exposition()])

        self._metrics = MetricsEndpoint(*self.cfg.metrics.host_port, collect)
        return self._metrics.start()

    @staticmethod
    def ray_log_dir() -> str:
        """Where Ray writes its own logs for this session (workers, raylet, Serve)."""
        try:  # no public API for it in Ray 2.60
            return str(ray._private.worker._global_node.get_logs_dir_path())
        except AttributeError:
            return DEFAULT_RAY_LOG_DIR

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters of the ingest (received, in flight, retries) and the sink (by outcome)."""
        ingest, sink = ray.get([self._ingest.stats.remote(), self._sink.stats.remote()], timeout=STATS_TIMEOUT_S)
        return {"ingest": ingest, "sink": sink}

    def restarts(self) -> list[Restart]:
        """Every recovery of the sink or ingest so far (supervision)."""
        return list(self._supervisor.restarts) if self._supervisor is not None else []

    def actor_pids(self) -> dict[str, int | None]:
        """Process id of the sink and the ingest (None while one is down): what an operator or a test kills."""
        return self._supervisor.pids() if self._supervisor is not None else {}

    def last_report(self) -> str:
        """Path of the newest section report ("" before the first section ended)."""
        return str(ray.get(self._sink.last_report.remote()))

    def drain_and_stop(self) -> dict[str, dict[str, int]]:
        """Tell the controller `draining`, refuse what is still buffered (error `draining`) for
        ingest.drain_grace_s, finish every accepted tile, flush feedback, then tear everything down."""
        final: dict[str, dict[str, int]] = {}
        if self._supervisor is not None:
            self._supervisor.stop()
            self._supervisor = None
        if self._ingest is not None:
            if self._sink is not None:
                ray.get(self._sink.send_draining.remote(DRAINING_MESSAGE))
            final["ingest"] = ray.get(self._ingest.drain.remote(self.cfg.ingest.drain_grace_s))
        if self._sink is not None:
            final["sink"] = ray.get(self._sink.close.remote())
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        if self._owns_ray:
            # Every tile is done: ray.shutdown ends the replicas too. serve.shutdown first would only add
            # Ray's "(raylet) Task ServeController... killed by ray.kill" lines, which read like errors.
            ray.shutdown()
        elif ray.is_initialized():
            serve.shutdown()  # a shared cluster outlives us: remove our deployments from it
        self._ingest = self._sink = None
        self.endpoints = None
        return final

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        ray_cfg = self.cfg.ray
        options = {
            "num_cpus": ray_cfg.num_cpus,
            "num_gpus": ray_cfg.num_gpus,
            "include_dashboard": False,
            "log_to_driver": self._ray_logs_to_terminal,
            "configure_logging": True,
            "logging_level": logging.INFO if self._ray_logs_to_terminal else logging.WARNING,
        }
        if ray_cfg.address is None:
            # Our own single-node cluster: every Ray listener on loopback, token auth on (docs/security.md).
            init_local_ray(self.cfg.security, **options)
        else:
            ray.init(address=ray_cfg.address, **options)
        self._owns_ray = True
