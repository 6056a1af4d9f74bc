"""The /metrics endpoint of a running appliance: real Ray, real ZeroMQ, a real HTTP scrape."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from appliance.config import IngestConfig, MetricsConfig, OutputConfig, RigConfig
from appliance.tools.reference_controller import ReferenceController, cycle_tiles

TIER = "fast"  # this module's default tier (tests/conftest.py); tests of the other tier are marked

REPO = Path(__file__).resolve().parents[2]
METRICS_DOC = REPO / "docs" / "metrics.md"
DASHBOARD = REPO / "ansible" / "roles" / "deblur_appliance" / "files" / "grafana-dashboard.json"


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    """Samples by family name: [(labels, value, sample name)]."""
    with urllib.request.urlopen(url, timeout=15) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {
        family.name: [(sample.labels, sample.value, sample.name) for sample in family.samples]
        for family in text_string_to_metric_families(text)
    }


def scrape_until(
    url: str, settled: Callable[[dict[str, list[tuple[dict[str, str], float, str]]]], bool], timeout_s: float = 10.0
) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    """Scrape until `settled` holds (the last scrape either way, for the assertions to report)."""
    deadline = time.monotonic() + timeout_s
    metrics = scrape(url)
    while not settled(metrics) and time.monotonic() < deadline:
        time.sleep(0.1)
        metrics = scrape(url)
    return metrics


def total(samples: list[tuple[dict[str, str], float, str]], suffix: str = "", **labels: str) -> float:
    return sum(
        value
        for sample_labels, value, name in samples
        if name.endswith(suffix) and all(sample_labels.get(k) == v for k, v in labels.items())
    )


def documented_metrics() -> set[str]:
    """Metric names in the first column of docs/metrics.md's tables."""
    return set(re.findall(r"^\| `(em_appliance_\w+)`", METRICS_DOC.read_text(encoding="utf-8"), re.MULTILINE))


@pytest.mark.system
def test_scraped_counters_add_up_to_the_tiles_sent(
    start_appliance: Callable[..., object], tmp_path: Path, real_em_tiles: list[tuple[str, np.ndarray]]
) -> None:
    appliance = start_appliance(
        RigConfig(
            ingest=IngestConfig(tile_endpoint="tcp://127.0.0.1:*", feedback_endpoint="tcp://127.0.0.1:*"),
            output=OutputConfig(directory=tmp_path / "out"),
            metrics=MetricsConfig(address="127.0.0.1:0"),
        )
    )
    endpoints = appliance.endpoints  # type: ignore[attr-defined]
    assert endpoints.metrics.startswith("http://127.0.0.1:")
    with ReferenceController(endpoints.tile, endpoints.feedback) as controller:
        report = controller.send_section("m1", cycle_tiles(real_em_tiles, 24), rate_hz=None, timeout_s=120, beams=3)
        controller.send_raw([b"\xc1 not msgpack"])
        assert controller.wait_for(lambda fb: any(m["type"] == "error" for m in fb), timeout_s=30)
    assert (report.done, report.lost) == (24, 0)
    # A tile's credit is released when the sink's call returns, just after its result went out: the last
    # one's can still be held for a moment when the controller has every answer.
    metrics = scrape_until(
        endpoints.metrics,
        lambda m: total(m["em_appliance_in_flight_tiles"]) == total(m["em_appliance_deployment_queue_depth"]) == 0,
    )

    done = metrics["em_appliance_tiles_done"]
    assert total(done, "_total") == 24
    for label, count in report.results.items():
        assert total(done, "_total", label=label) == count
    assert total(done, "_total", action="restored") == report.actions["restored"] > 0
    assert total(metrics["em_appliance_tiles_received"], "_total") == 24
    assert total(metrics["em_appliance_messages_received"], "_total") == 24 + 3  # + start, end, bad message
    assert total(metrics["em_appliance_errors"], "_total", code="bad_message") == 1
    assert total(metrics["em_appliance_retake_flags"], "_total") == report.retake_flags
    assert total(metrics["em_appliance_sections_done"], "_total") == 1
    for stage in ("receive_to_durable", "detect", "write"):
        assert total(metrics[f"em_appliance_{stage}_seconds"], "_count") == 24, stage
    assert total(metrics["em_appliance_deblur_seconds"], "_count") == report.actions["restored"]
    sigma = metrics["em_appliance_tile_blur_sigma_px"]
    assert {labels["beam"] for labels, _, _ in sigma} == {"0", "1", "2"}
    assert total(sigma, "_count") == 24
    assert total(metrics["em_appliance_deblur_replica_busy_seconds"], "_total") > 0
    # Everything finished: nothing in flight or queued, credits as configured.
    assert total(metrics["em_appliance_in_flight_tiles"]) == 0
    assert total(metrics["em_appliance_in_flight_limit"]) == 8
    assert total(metrics["em_appliance_deployment_queue_depth"]) == 0
    assert total(metrics["em_appliance_disk_free_bytes"]) > 0
    assert total(metrics["em_appliance_replicas"], deployment="DeblurDeployment") == 1
    # The section's report is written by a Ray task after section_done; drain waits for it.
    appliance.drain_and_stop()  # type: ignore[attr-defined]
    assert (Path(endpoints.output_dir) / "m1" / "report.html").is_file()
    # Every metric the endpoint serves is documented, and every documented one is served.
    assert set(metrics) == documented_metrics()


def test_dashboard_queries_only_documented_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {
        re.sub(r"_(total|bucket|count|sum)$", "", name)
        for expr in expressions
        for name in re.findall(r"em_appliance_\w+", expr)
    }
    assert used and used <= documented_metrics(), used - documented_metrics()


def test_metrics_address_is_validated_naming_the_field() -> None:
    assert MetricsConfig().host_port == ("127.0.0.1", 9464)
    assert MetricsConfig(address="[::1]:9100").host_port == ("::1", 9100)
    for bad in ("9464", "host:99999", "http://host:9464"):
        with pytest.raises(ValidationError, match="metrics"):
            RigConfig.model_validate({"metrics": {"address": bad}})


def test_a_busy_metrics_port_fails_start_naming_the_field() -> None:
    from appliance.operator.metrics_endpoint import MetricsEndpoint

    first = MetricsEndpoint("127.0.0.1", 0, lambda: b"")
    try:
        port = int(first.start().rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(OSError, match=f"metrics.address 127.0.0.1:{port}: cannot listen"):
            MetricsEndpoint("127.0.0.1", port, lambda: b"")
    finally:
        first.stop()
