"""The one line per interval that `serve` prints for the operator (pure: counters in, text out)."""

from __future__ import annotations

from collections.abc import Mapping

LABELS = ("sharp", "soft", "retake", "empty")


def tiles_done(sink_counts: Mapping[str, int]) -> int:
    """Tiles answered so far (every label plus failed ones), from the sink's counters."""
    return sum(sink_counts.get(key, 0) for key in (*LABELS, "error", "storage_failed"))


def human_bytes(n_bytes: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disk tools print them)."""
    if n_bytes < 1000:
        return f"{n_bytes:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n_bytes /= 1000
        if n_bytes < 1000:
            return f"{n_bytes:.1f} {unit}"
    return f"{n_bytes / 1000:.1f} TB"


def status_line(
    previous: Mapping[str, Mapping[str, int]],
    current: Mapping[str, Mapping[str, int]],
    interval_s: float,
    max_in_flight: int,
    disk_free_bytes: int,
    last_report: str,
) -> str:
    """`status: 23.9 tiles/s, in flight 5/8, sharp 1200 soft 30 retake 4, errors 0, disk free 1.2 TB, ...`.

    previous/current: Appliance.stats() snapshots `interval_s` seconds apart.
    """
    sink = current["sink"]
    rate = (tiles_done(sink) - tiles_done(previous["sink"])) / interval_s if interval_s > 0 else 0.0
    errors = sink.get("error", 0) + sink.get("storage_failed", 0) + sink.get("rejected", 0)
    labels = " ".join(f"{label} {sink.get(label, 0)}" for label in LABELS)
    report = f"last report {last_report}" if last_report else "no section report yet"
    return (
        f"status: {rate:.1f} tiles/s, in flight {current['ingest'].get('in_flight', 0)}/{max_in_flight}, "
        f"{labels}, errors {errors}, disk free {human_bytes(disk_free_bytes)}, {report}"
    )
