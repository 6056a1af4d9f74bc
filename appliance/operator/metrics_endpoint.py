"""The one /metrics HTTP endpoint, served from the driver: the actors' registries joined at scrape time.

Pull, not push: on each scrape the driver asks the ingest and sink actors for their exposition text
(two small Ray calls every scrape interval, nothing per tile) and adds what only the host knows (disk
free, configured replicas). Metric names never repeat across actors, so the texts join as they are.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from appliance.operator.metrics import PREFIX

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_S = 10.0


class HostMetrics:
    """Metrics of the machine, read at scrape time: disk free under the output directory, replicas, calibration."""

    def __init__(self, output_dir: Path, replicas_by_deployment: dict[str, int], calibrated: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        free = Gauge(
            f"{PREFIX}disk_free_bytes", "Free bytes on the output directory's file system.", registry=self.registry
        )
        free.set_function(lambda: shutil.disk_usage(output_dir).free)
        replicas = Gauge(
            f"{PREFIX}replicas", "Configured Serve replicas per deployment.", ["deployment"], registry=self.registry
        )
        for deployment, count in replicas_by_deployment.items():
            replicas.labels(deployment=deployment).set(count)
        Gauge(
            f"{PREFIX}detector_calibrated",
            "1 when the detector runs with a rig calibration (detector.calibration), else 0.",
            registry=self.registry,
        ).set(int(calibrated))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

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
