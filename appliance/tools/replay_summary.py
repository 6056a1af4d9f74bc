"""Human-readable summary of a replay (demo and bench share it)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from appliance.tools.reference_controller import ReplayReport


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds == seconds else "n/a"  # NaN when nothing came back


def replay_table(report: ReplayReport, title: str, extra: dict[str, Any] | None = None) -> Table:
    """One table: tiles in, outcome counts, throughput, latency p50/p95/p99, lost and duplicated."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("tiles in", str(report.sent)),
        ("sharp (written as acquired)", str(report.results.get("sharp", 0))),
        ("soft (deblurred)", str(report.results.get("soft", 0))),
        ("retake (flagged to controller)", str(report.results.get("retake", 0))),
        ("errors", ", ".join(f"{k}={v}" for k, v in report.errors.items()) or "0"),
        ("throughput", f"{report.tiles_per_s:.1f} tiles/s, {report.mb_per_s:.1f} MB/s"),
        ("latency send -> written p50", _ms(report.latency_percentile_s(50))),
        ("latency p95", _ms(report.latency_percentile_s(95))),
        ("latency p99", _ms(report.latency_percentile_s(99))),
        ("controller blocked by backpressure", f"{report.send_blocked_s:.2f} s"),
        ("lost", str(report.lost)),
        ("duplicated", str(report.duplicated)),
    ]
    rows += [(key, str(value)) for key, value in (extra or {}).items()]
    for key, value in rows:
        style = "bold red" if key in ("lost", "duplicated") and value != "0" else None
        table.add_row(key, value, style=style)
    return table


def print_table(table: Table) -> None:
    Console().print(table)
