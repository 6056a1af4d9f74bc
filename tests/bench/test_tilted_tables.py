"""The benches' per-sigma tables of tilted blur (bench/detector_sources.py, bench/detector_local_blur.py)."""

from __future__ import annotations

import pytest

from appliance.config import DetectorConfig
from appliance.messages import BlurAssessment
from bench.detector_local_blur import _tilted_row, markdown
from bench.detector_sources import SIGMAS, _called_sharp_by_sigma
from models.blur_synth import FAMILIES

pytestmark = pytest.mark.fast


def _verdict(label: str, sigma: float = 0.5) -> BlurAssessment:
    return BlurAssessment(blur_score=0.1, label=label, sigma_px=sigma)  # type: ignore[arg-type]


def test_called_sharp_by_sigma_splits_tilted_from_the_other_families() -> None:
    # One tile: tilted called sharp at 1 px only; of the three others, one (disk) called sharp at 1 px.
    tile = {
        (f, s): _verdict("sharp" if s == 1.0 and f in ("tilted", "disk") else "soft") for f in FAMILIES for s in SIGMAS
    }
    by = _called_sharp_by_sigma([tile, tile])
    assert by["tilted"] == {str(s): (1.0 if s == 1.0 else 0.0) for s in SIGMAS}
    assert by["others"]["1.0"] == pytest.approx(1 / 3)
    assert all(by["others"][str(s)] == 0.0 for s in SIGMAS if s != 1.0)


def test_tilted_row_counts_labels_and_reports_the_share_above_the_sharp_threshold() -> None:
    cfg = DetectorConfig()
    verdicts = [_verdict("sharp", 0.6), _verdict("soft", 1.4), _verdict("retake", 3.0), _verdict("soft", 1.0)]
    row = _tilted_row(2.0, [0.0, 90.0, 180.0, 270.0], verdicts, cfg)
    assert row["not_sharp"] == 0.75 and row["retake"] == 0.25
    assert row["share_above_sharp_threshold_edge_ramp"] == pytest.approx(1 - cfg.sharp_sigma_px / 2.0)
    assert row["sigma_over_largest_median"] == pytest.approx(1.2 / 2.0)
    text = markdown(
        {"command": "python bench/detector_local_blur.py", "model_version": "m", "rows": [], "tilted": [row]}
    )
    assert "| 2 | 60 % / 0 % | 75 % | 25 % | 0.60 | - |" in text
