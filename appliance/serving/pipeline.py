"""Wires each microscope's ingest -> the shared Serve detector/deblur -> its sink on a Ray cluster; start,
drain and stop."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve
from ray.serve.schema import LoggingConfig

from appliance.config import RigConfig
from appliance.detection.calibration import load_configured_calibration
from appliance.operator.metrics_endpoint import (
    SCRAPE_TIMEOUT_S,
    HostMetrics,
    MetricsEndpoint,
    MicroscopeHostMetrics,
    join_microscopes,
)
from appliance.operator.report_figures import Thresholds
from appliance.serving.blur_detector_deployment import BlurDetectorDeployment
from appliance.serving.deblur_deployment import DeblurDeployment
from appliance.serving.microscope import MicroscopeRuntime, RunningEndpoints, resolve_endpoint
from appliance.serving.ray_lockdown import init_local_ray
from appliance.serving.supervisor import Restart
from appliance.stream.zmq_security import check_curve_keys

log = logging.getLogger(__name__)

__all__ = ["Appliance", "RunningEndpoints", "resolve_endpoint"]

DEFAULT_RAY_LOG_DIR = "/tmp/ray/session_latest/logs"
DETECTOR_APP = "blur-detector"
DEBLUR_APP = "deblur"
# Per-request access logs at 25 tiles/s would drown the rig's log; warnings and errors still show.
SERVE_LOGGING = LoggingConfig(log_level="WARNING", enable_access_log=False)
DRAINING_MESSAGE = "appliance stopping: send nothing more; resend every tile without an answer after the restart"


class Appliance:
    """One appliance on one Ray cluster. Use `start()`, then `drain_and_stop()` (also on signals).

    ray_logs_to_terminal: forward Ray's worker and raylet output to this process's stderr (--verbose);
    otherwise it stays in Ray's session log files (`ray_log_dir`).
    """

    def __init__(self, cfg: RigConfig, ray_logs_to_terminal: bool = False) -> None:
        self.cfg = cfg
        self._ray_logs_to_terminal = ray_logs_to_terminal
        self._owns_ray = False
        self._scopes = [MicroscopeRuntime(cfg, scope) for scope in cfg.served_microscopes()]
        self._metrics: MetricsEndpoint | None = None
        self.endpoints: RunningEndpoints | None = None  # the first microscope's (the only one, usually)
        self.microscopes: dict[str, RunningEndpoints] = {}  # every microscope's, by name

    def start(self) -> RunningEndpoints:
        """Start Ray (local unless configured), deploy both models once, bind each microscope's sockets.

        Raises ConfigError before anything starts when a microscope's calibration cannot be used.
        Returns the first microscope's endpoints; `microscopes` has every one's.
        """
        for scope in self._scopes:
            load_configured_calibration(self.cfg.detector_for(scope.scope))
        check_curve_keys(self.cfg.security)
        self._init_ray()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        # No HTTP proxy: tiles arrive over ZeroMQ only.
        serve.start(proxy_location="Disabled", logging_config=SERVE_LOGGING)
        # Both applications in one deploy: Serve waits for their replicas together (~2 s less per start).
        detector, deblur = serve.run_many(
            [
                serve.RunTarget(
                    BlurDetectorDeployment.options(  # type: ignore[attr-defined]  # added by @serve.deployment
                        **self.cfg.detector.deployment_options(), logging_config=SERVE_LOGGING
                    ).bind(self.cfg.detector),
                    name=DETECTOR_APP,
                    route_prefix=None,
                ),
                serve.RunTarget(
                    DeblurDeployment.options(  # type: ignore[attr-defined]  # added by @serve.deployment
                        **self.cfg.deblur.deployment_options(), logging_config=SERVE_LOGGING
                    ).bind(self.cfg.deblur),
                    name=DEBLUR_APP,
                    route_prefix=None,
                ),
            ]
        )
        thresholds = Thresholds(self.cfg.detector.sharp_sigma_px, self.cfg.detector.max_restorable_sigma_px)
        # Each microscope's sink and ingest are Ray actors, each a new worker process (1-2 s to spawn):
        # the microscopes start side by side, not one after another.
        with ThreadPoolExecutor(max_workers=len(self._scopes)) as pool:
            started = list(pool.map(lambda scope: scope.start(detector, deblur, thresholds), self._scopes))
        metrics_url = self._start_metrics() if self.cfg.metrics.enabled else None
        self.microscopes = {
            e.microscope: RunningEndpoints(e.tile, e.feedback, e.output_dir, metrics_url, e.microscope) for e in started
        }
        self.endpoints = next(iter(self.microscopes.values()))
        for endpoints in self.microscopes.values():
            log.info(
                "appliance %s, microscope %s listening: tiles %s, feedback %s, output %s, metrics %s",
                self.cfg.rig_name,
                endpoints.microscope,
                endpoints.tile,
                endpoints.feedback,
                endpoints.output_dir,
                metrics_url,
            )
        return self.endpoints

    def _start_metrics(self) -> str:
        replicas = {
            BlurDetectorDeployment.name: self.cfg.detector.num_replicas,  # type: ignore[attr-defined]
            DeblurDeployment.name: self.cfg.deblur.num_replicas,  # type: ignore[attr-defined]
        }
        hosts = {s.name: MicroscopeHostMetrics(s.output_dir, s.calibrated) for s in self._scopes}
        shared = HostMetrics(replicas)
        scopes = list(self._scopes)

        def collect() -> bytes:
            refs = [ref for scope in scopes for ref in scope.metrics_refs()]
            texts = iter(ray.get(refs, timeout=SCRAPE_TIMEOUT_S))
            by_microscope = {s.name: [next(texts), next(texts), hosts[s.name].exposition()] for s in scopes}
            return join_microscopes(by_microscope, shared.exposition())

        self._metrics = MetricsEndpoint(*self.cfg.metrics.host_port, collect)
        return self._metrics.start()

    @staticmethod
    def ray_log_dir() -> str:
        """Where Ray writes its own logs for this session (workers, raylet, Serve)."""
        try:  # no public API for it in Ray 2.60
            return str(ray._private.worker._global_node.get_logs_dir_path())
        except AttributeError:
            return DEFAULT_RAY_LOG_DIR

    @property
    def _ingest(self) -> Any:
        """The first microscope's ingest actor (the fault drills and tests reach into it)."""
        return self._scopes[0].ingest

    @property
    def _sink(self) -> Any:
        """The first microscope's sink actor (the fault drills and tests reach into it)."""
        return self._scopes[0].sink

    def _scope(self, microscope: str | None) -> MicroscopeRuntime:
        if microscope is None:
            return self._scopes[0]
        for scope in self._scopes:
            if scope.name == microscope:
                return scope
        raise KeyError(f"no microscope {microscope!r} on this appliance: {[s.name for s in self._scopes]}")

    def stats(self, microscope: str | None = None) -> dict[str, dict[str, int]]:
        """Counters of a microscope's ingest (received, in flight, retries) and sink (by outcome).

        microscope: its name; None: the first (the only one on a single-microscope rig).
        """
        return self._scope(microscope).stats()

    def restarts(self) -> list[Restart]:
        """Every recovery of a sink or ingest so far, all microscopes (supervision)."""
        return [restart for scope in self._scopes for restart in scope.restarts()]

    def actor_pids(self, microscope: str | None = None) -> dict[str, int | None]:
        """Process id of a microscope's sink and ingest (None while one is down): what an operator or a test
        kills. microscope: None = the first."""
        return self._scope(microscope).actor_pids()

    def last_report(self, microscope: str | None = None) -> str:
        """Path of a microscope's newest section report ("" before its first section ended)."""
        return self._scope(microscope).last_report()

    def drain_and_stop(self) -> dict[str, dict[str, int]]:
        """Tell every controller `draining`, refuse what is still buffered (error `draining`) for
        ingest.drain_grace_s, finish every accepted tile, flush feedback, then tear everything down.

        Returns the first microscope's final counters ("ingest", "sink"); with several microscopes also
        each one's under "<name>/ingest" and "<name>/sink"."""
        for scope in self._scopes:
            scope.stop_supervising()
        ray.get([ref for scope in self._scopes if (ref := scope.send_draining(DRAINING_MESSAGE)) is not None])
        # All microscopes drain at once: the grace period is waited once, not once per microscope.
        grace_s = self.cfg.ingest.drain_grace_s
        finals = _gather({f"{s.name}/ingest": s.drain_ingest(grace_s) for s in self._scopes})
        finals |= _gather({f"{s.name}/sink": s.close_sink() for s in self._scopes})
        first = self._scopes[0].name
        final = {part: finals[f"{first}/{part}"] for part in ("ingest", "sink") if f"{first}/{part}" in finals}
        if len(self._scopes) > 1:
            final |= finals
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        if self._owns_ray:
            # Every tile is done: ray.shutdown ends the replicas too. serve.shutdown first would only add
            # Ray's "(raylet) Task ServeController... killed by ray.kill" lines, which read like errors.
            ray.shutdown()
        elif ray.is_initialized():
            serve.shutdown()  # a shared cluster outlives us: remove our deployments from it
        for scope in self._scopes:
            scope.ingest = scope.sink = None
        self.endpoints = None
        self.microscopes = {}
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


def _gather(refs: dict[str, ray.ObjectRef | None]) -> dict[str, dict[str, int]]:
    """{key: result} of the calls that were made (None: that actor was never started)."""
    made = {key: ref for key, ref in refs.items() if ref is not None}
    return dict(zip(made, ray.get(list(made.values())), strict=True))
