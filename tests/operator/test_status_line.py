"""The serve status line, from two counter snapshots (pure)."""

from __future__ import annotations

import pytest

from appliance.operator.status_line import human_bytes, status_line

pytestmark = pytest.mark.fast


def test_status_line_reports_rate_over_the_interval_and_every_field() -> None:
    before = {"ingest": {"in_flight": 0}, "sink": {"sharp": 100, "soft": 5, "retake": 1}}
    after = {
        "ingest": {"in_flight": 7},
        "sink": {"sharp": 1300, "soft": 35, "retake": 4, "empty": 6, "error": 1, "storage_failed": 2, "rejected": 2},
    }
    line = status_line(before, after, 60.0, 16, 3_100_000_000_000, "/out/s12/report.html")
    assert line == (
        "status: 20.7 tiles/s, in flight 7/16, sharp 1300 soft 35 retake 4 empty 6, errors 5, "
        "disk free 3.1 TB, last report /out/s12/report.html"
    )
    assert status_line(before, before, 60.0, 16, 999, "").endswith("disk free 999 B, no section report yet")


def test_human_bytes_uses_decimal_units() -> None:
    assert [human_bytes(n) for n in (5, 1234, 7.8e10, 5e15)] == ["5 B", "1.2 kB", "78.0 GB", "5000.0 TB"]
