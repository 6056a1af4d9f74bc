"""Prometheus metrics kept inside the actors that see the events (ingest, sink); every name in docs/metrics.md.

Each actor owns a private registry and hands its exposition text to the driver on scrape
(appliance/operator/metrics_endpoint.py), so a tile costs no extra Ray call and no metric is counted twice.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from appliance.messages import FOCUS_DRIFT, FOCUS_OK, IMPLAUSIBLE_BLUR_SHARE, NO_BEAM

# `*_created` timestamps would be one more series per metric that no dashboard reads.
disable_created_metrics()
PREFIX = "em_appliance_"
# Receive -> durable spans ms (sharp tiles on a GPU rig) to minutes (CPU deblur behind a queue).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Edges include the default label thresholds (sharp <= 0.8 px, restorable <= 3 px).
SIGMA_BUCKETS_PX = (0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)

    def exposition(self) -> bytes:
        """Prometheus text format (0.0.4) of this actor's metrics."""
        return generate_latest(self.registry)


class IngestMetrics(_Metrics):
    """What the ingest actor sees: messages, credits, outstanding Serve calls, backpressure, replica busy time."""

    def __init__(self, max_in_flight: int) -> None:
        super().__init__()
        r = self.registry
        self.messages_received = Counter(
            f"{PREFIX}messages_received", "Messages read from the tile socket.", registry=r
        )
        self.tiles_received = Counter(f"{PREFIX}tiles_received", "Tiles accepted (valid, not duplicate).", registry=r)
        self.in_flight = Gauge(
            f"{PREFIX}in_flight_tiles", "Credits taken: tiles between receive and durable.", registry=r
        )
        Gauge(f"{PREFIX}in_flight_limit", "Credits in all (ingest.max_in_flight).", registry=r).set(max_in_flight)
        self.queue_depth = Gauge(
            f"{PREFIX}deployment_queue_depth",
            "Requests the ingest has outstanding at a Serve deployment (queued + running).",
            ["deployment"],
            registry=r,
        )
        self.backpressure_s = Counter(
            f"{PREFIX}backpressure_seconds",
            "Time the ingest stopped reading because every credit was taken (the controller's send blocks).",
            registry=r,
        )
        self.serve_rejections = Counter(
            f"{PREFIX}serve_rejections",
            "Serve BackPressureError answers (each retried, never dropped).",
            ["deployment"],
            registry=r,
        )
        self.deblur_busy_s = Counter(
            f"{PREFIX}deblur_replica_busy_seconds",
            "Compute time of a deblur replica (its batches' wall time); rate() = utilisation 0..1.",
            ["replica"],
            registry=r,
        )


class SinkMetrics(_Metrics):
    """What the sink sees: outcomes, errors, stage latencies, blur per beam, feedback backlog."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.tiles_done = Counter(
            f"{PREFIX}tiles_done", "Tiles durable and answered, by label and action.", ["label", "action"], registry=r
        )
        self.errors = Counter(
            f"{PREFIX}errors", "Error messages sent to the controller, by wire code.", ["code"], registry=r
        )
        self.retake_flags = Counter(f"{PREFIX}retake_flags", "Retake requests sent to the controller.", registry=r)
        self.alarms = Counter(
            f"{PREFIX}alarms", "Alarms sent to the controller, by kind (docs/protocol.md).", ["kind"], registry=r
        )
        for kind in (IMPLAUSIBLE_BLUR_SHARE, FOCUS_DRIFT, FOCUS_OK):  # exported at 0 from the start: increase() works
            self.alarms.labels(kind=kind)
        self.beam_focus_drift = Gauge(
            f"{PREFIX}beam_focus_drift",
            "1 while a beam's running in-focus baseline is off its reference (focus_drift sent, focus_ok not yet), "
            f'else 0; only beams that drifted since start (beam="{NO_BEAM}" for tiles without one).',
            ["beam"],
            registry=r,
        )
        self.restore_suspended = Counter(
            f"{PREFIX}restore_suspended_tiles",
            "Soft tiles written as acquired because their section tripped the implausible-blur-share rule.",
            registry=r,
        )
        self.sections_done = Counter(f"{PREFIX}sections_done", "Sections closed (section_done sent).", registry=r)
        self.reports = Counter(
            f"{PREFIX}section_reports", "Section reports (report.html), by result.", ["result"], registry=r
        )
        self.feedback_pending = Gauge(
            f"{PREFIX}feedback_pending", "Feedback messages the controller has not taken yet.", registry=r
        )
        self.feedback_held_s = Counter(
            f"{PREFIX}feedback_held_seconds",
            "Seconds tile writes were held because the feedback outbox was full (controller not reading).",
            registry=r,
        )
        stages = (
            ("receive_to_durable", "Receive -> file and QC line durable."),
            ("detect", "Blur detector call, queue included."),
            ("deblur", "Deblur call of a soft tile, queue included."),
            ("write", "Tile file(s) written and fsynced."),
        )
        self.latency_s = {
            stage: Histogram(f"{PREFIX}{stage}_seconds", text, buckets=LATENCY_BUCKETS_S, registry=r)
            for stage, text in stages
        }
        self.sigma_px = Histogram(
            f"{PREFIX}tile_blur_sigma_px",
            "Estimated blur (Gaussian-equivalent PSF sigma, px) per beam "
            f'(beam="{NO_BEAM}" when the controller sends none).',
            ["beam"],
            buckets=SIGMA_BUCKETS_PX,
            registry=r,
        )

    def observe_tile(
        self, label: str | None, action: str, beam: int | None, sigma_px: float | None, timings_s: dict[str, float]
    ) -> None:
        """One tile done. timings_s: detect_s, deblur_s, write_s, total_s (seconds; absent stages skipped)."""
        self.tiles_done.labels(label=label or "none", action=action).inc()
        if sigma_px is not None and label != "empty":  # no tissue: no focus reading to count
            self.sigma_px.labels(beam=NO_BEAM if beam is None else str(beam)).observe(sigma_px)
        keys = {"receive_to_durable": "total_s", "detect": "detect_s", "deblur": "deblur_s", "write": "write_s"}
        for stage, key in keys.items():
            if key in timings_s:
                self.latency_s[stage].observe(timings_s[key])
