"""The one /metrics HTTP endpoint, served from the driver: the actors' registries joined at scrape time.

Pull, not push: on each scrape the driver asks each microscope's ingest and sink actors for their
exposition text (two small Ray calls per microscope every scrape interval, nothing per tile) and adds what
only the host knows (disk free, calibration, configured replicas). Metric names never repeat across the
actors of one microscope; the same names from several microscopes are joined into one family, each sample
labelled with its `microscope`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from appliance.operator.metrics import PREFIX

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_S = 10.0


class MicroscopeHostMetrics:
    """What the host knows of one microscope, read at scrape time: disk free under its output folder, and
    whether its detector readings are calibrated."""

    def __init__(self, output_dir: Path, calibrated: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        free = Gauge(
            f"{PREFIX}disk_free_bytes", "Free bytes on the output directory's file system.", registry=self.registry
        )
        free.set_function(lambda: shutil.disk_usage(output_dir).free)
        Gauge(
            f"{PREFIX}detector_calibrated",
            "1 when the detector runs with a rig calibration (detector.calibration), else 0.",
            registry=self.registry,
        ).set(int(calibrated))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HostMetrics:
    """What the host knows of the shared deployments: configured Serve replicas (no microscope label)."""

    def __init__(self, replicas_by_deployment: dict[str, int]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        replicas = Gauge(
            f"{PREFIX}replicas", "Configured Serve replicas per deployment.", ["deployment"], registry=self.registry
        )
        for deployment, count in replicas_by_deployment.items():
            replicas.labels(deployment=deployment).set(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Families:
    """A collector yielding parsed metric families, for generate_latest."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def join_microscopes(texts_by_microscope: dict[str, list[bytes]], shared: bytes) -> bytes:
    """One exposition from each microscope's actor texts, every sample labelled `microscope="<name>"`,
    plus the shared text (unlabelled). Families of the same name from several microscopes become one
    family (a name must appear once on a page), so per-microscope series sit side by side."""
    families: dict[str, Metric] = {}
    for microscope, texts in texts_by_microscope.items():
        for text in texts:
            for family in text_string_to_metric_families(text.decode("utf-8")):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                merged.samples += [
                    sample._replace(labels={"microscope": microscope, **sample.labels}) for sample in family.samples
                ]
    return generate_latest(_Families(list(families.values()))) + shared


class MetricsEndpoint:
    """HTTP server on (host, port) answering GET /metrics with `collect()`; runs in a daemon thread."""

    def __init__(self, host: str, port: int, collect: Callable[[], bytes]) -> None:
        handler = _handler_for(collect)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise OSError(
                f"metrics.address {host}:{port}: cannot listen: {exc.strerror}; pick another port "
                "or set metrics.enabled: false"
            ) from exc
        self._server.daemon_threads = True
        # shutdown() waits for serve_forever's next poll: 0.5 s by default on every stop, 0.05 s here.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="metrics-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = str(self._server.server_address[0]), self._server.server_address[1]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/metrics"

    def start(self) -> str:
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(collect: Callable[[], bytes]) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] != "/metrics":
                self._reply(404, b"only /metrics is served here\n", "text/plain")
                return
            try:
                body = collect()
            except Exception as exc:  # an actor gone: a failed scrape (up=0), never partial counters
                log.warning("metrics scrape failed: %r", exc)
                self._reply(503, f"appliance not answering: {exc!r}\n".encode(), "text/plain")
                return
            self._reply(200, body, CONTENT_TYPE)

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
            pass  # one line per scrape would flood the rig's log

    return _Handler
