"""One microscope on the appliance: its sink, its ingest and their supervisor, on the shared deployments.

Every microscope of a rig (RigConfig.served_microscopes) gets its own sink actor (output folder, QC
record, index, feedback socket to its controller), its own ingest actor (tile socket, credits) and its
own supervisor; all of them call the same detector and deblur deployments (the GPUs). Credits are per
ingest, so a microscope whose controller stops reading holds back only its own tiles.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
import zmq
from ray.serve.handle import DeploymentHandle

from appliance.config import MicroscopeConfig, RigConfig
from appliance.detection.calibration import load_configured_calibration
from appliance.detection.online_baseline import OnlineBaseline
from appliance.operator.report_figures import Thresholds
from appliance.serving.supervisor import Restart, Supervisor
from appliance.stream.ingest import IngestActor
from appliance.stream.sink import SinkActor

log = logging.getLogger(__name__)

# Supervised actors: Ray restarts a killed sink or ingest process (the Supervisor resumes it). Sink calls
# are idempotent, so Ray also retries them on the restarted sink; ingest calls are not retried.
SINK_OPTIONS = {"max_restarts": -1, "max_task_retries": -1}
INGEST_OPTIONS = {"max_restarts": -1, "max_task_retries": 0}
STATS_TIMEOUT_S = 10.0  # a restarting actor answers after its restart; the status line skips a beat
PORT_ATTEMPTS = 3  # starts of the actors on freshly resolved wildcard ports (on_free_ports)

T = TypeVar("T")


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


def on_free_ports(configured: Sequence[str], start: Callable[[list[str]], T]) -> tuple[list[str], T]:
    """(the endpoints, start(endpoints)) with wildcard ports resolved (`resolve_endpoint`). A resolved port is
    free when probed but not held: another process (any outgoing connection's ephemeral port) can take it
    before an actor binds it, and the actor's creation then fails with "Address already in use" naming the
    address (seen once in CI, 2026-11-27). At start nobody has connected yet, so fresh ports are resolved and
    `start` called again, up to PORT_ATTEMPTS times; a fixed port's failure is raised as it is."""
    attempt = 1
    while True:
        endpoints = [resolve_endpoint(endpoint) for endpoint in configured]
        try:
            return endpoints, start(endpoints)
        except ray.exceptions.RayError as exc:
            resolved = [e for c, e in zip(configured, endpoints, strict=True) if c.endswith(":*")]
            taken = any(f"Address already in use (addr='{endpoint}')" in str(exc) for endpoint in resolved)
            if not taken or attempt == PORT_ATTEMPTS:
                raise
        log.warning("%s: a port was taken before its actor bound it (attempt %d); resolving others", endpoints, attempt)
        attempt += 1


@dataclass(frozen=True)
class RunningEndpoints:
    """Where one microscope's part of the running appliance listens (wildcard ports resolved) and writes."""

    tile: str
    feedback: str
    output_dir: str
    metrics: str | None = None  # http://host:port/metrics (one for the appliance), None when disabled
    microscope: str = ""


class MicroscopeRuntime:
    """The sink, ingest and supervisor of one microscope. `start()`, then `drain(grace_s)`."""

    def __init__(self, cfg: RigConfig, scope: MicroscopeConfig) -> None:
        self.cfg = cfg
        self.scope = scope
        self.ingest: Any = None
        self.sink: Any = None
        self.supervisor: Supervisor | None = None
        self.endpoints: RunningEndpoints | None = None

    @property
    def name(self) -> str:
        return self.scope.name

    @property
    def calibrated(self) -> bool:
        return self.cfg.detector_for(self.scope).calibration is not None

    def start(self, detector: DeploymentHandle, deblur: DeploymentHandle, thresholds: Thresholds) -> RunningEndpoints:
        """Start the sink (binds feedback) and the ingest (binds tiles, reads once the sink is up), then the
        supervisor."""
        ingest_cfg = self.cfg.ingest_for(self.scope)
        security = self.cfg.security_for(self.scope)
        detector_cfg = self.cfg.detector_for(self.scope)
        calibration = load_configured_calibration(detector_cfg)

        def start_sink_and_ingest(endpoints: list[str]) -> tuple[Any, Any, dict[str, str], str]:
            feedback_endpoint, tile_endpoint = endpoints
            # The ingest finds its sink by this name (IngestActor): unique per start, as tests run several
            # appliances in one Ray and a start on a taken port is tried again.
            sink_name = f"sink-{self.name}-{uuid.uuid4().hex[:12]}"
            sink = SinkActor.options(name=sink_name, **SINK_OPTIONS).remote(  # type: ignore[attr-defined]
                self.cfg.output_for(self.scope),
                feedback_endpoint,
                thresholds,
                feedback_hwm=ingest_cfg.feedback_hwm,
                security=security,
            )
            # Created before the sink answers, so that both worker processes spawn at once (~1.5 s each): a
            # named actor is registered as it is created, so the ingest's constructor finds it. The ingest binds
            # its tile socket now but reads it only from `start`, once the sink has bound the feedback socket.
            ingest = IngestActor.options(**INGEST_OPTIONS).remote(  # type: ignore[attr-defined]
                ingest_cfg.model_copy(update={"feedback_endpoint": feedback_endpoint, "tile_endpoint": tile_endpoint}),
                detector,
                deblur,
                sink_name,
                calibrated=calibration is not None,
                security=security,
                focus=OnlineBaseline(detector_cfg, calibration),
                microscope=self.name,
            )
            try:
                sink_info = ray.get(sink.endpoints.remote())
                return sink, ingest, sink_info, ray.get(ingest.start.remote())
            except ray.exceptions.RayError:
                for actor in (ingest, sink):  # neither may keep its port for the next attempt
                    ray.kill(actor, no_restart=True)
                raise

        _, (self.sink, self.ingest, sink_info, tile_endpoint) = on_free_ports(
            [ingest_cfg.feedback_endpoint, ingest_cfg.tile_endpoint], start_sink_and_ingest
        )
        self.supervisor = Supervisor({"sink": self.sink, "ingest": self.ingest})
        self.supervisor.start()
        feedback, output_dir = sink_info["feedback"], sink_info["output_dir"]
        self.endpoints = RunningEndpoints(tile_endpoint, feedback, output_dir, microscope=self.name)
        return self.endpoints

    @property
    def output_dir(self) -> Path:
        assert self.endpoints is not None
        return Path(self.endpoints.output_dir)

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters of this microscope's ingest and sink."""
        ingest, sink = ray.get([self.ingest.stats.remote(), self.sink.stats.remote()], timeout=STATS_TIMEOUT_S)
        return {"ingest": ingest, "sink": sink}

    def metrics_refs(self) -> list[ray.ObjectRef]:
        """The ingest's and the sink's exposition texts (ObjectRefs, resolved together by the scrape)."""
        return [self.ingest.metrics_text.remote(), self.sink.metrics_text.remote()]

    def restarts(self) -> list[Restart]:
        return list(self.supervisor.restarts) if self.supervisor is not None else []

    def actor_pids(self) -> dict[str, int | None]:
        return self.supervisor.pids() if self.supervisor is not None else {}

    def last_report(self) -> str:
        return str(ray.get(self.sink.last_report.remote()))

    def stop_supervising(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None

    def send_draining(self, message: str) -> ray.ObjectRef | None:
        return self.sink.send_draining.remote(message) if self.sink is not None else None

    def drain_ingest(self, grace_s: float) -> ray.ObjectRef | None:
        return self.ingest.drain.remote(grace_s) if self.ingest is not None else None

    def close_sink(self) -> ray.ObjectRef | None:
        return self.sink.close.remote() if self.sink is not None else None
