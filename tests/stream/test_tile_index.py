"""The durable tile index: rows from QC lines, counts that add up, rebuild after a crash (real SQLite, real files)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.qc_record import QcRejection, QcStorageFailure, QcSuperseded, QcTileRecord
from appliance.stream.answers import answer_frames
from appliance.stream.protocol import decode_feedback
from appliance.stream.qc_log import QcLog
from appliance.stream.tile_index import TileIndex

pytestmark = pytest.mark.fast


def tile_line(tile_id: str, seq: int, label: str = "sharp", section: str = "s1", **fields: object) -> QcTileRecord:
    action = {"sharp": "written", "soft": "restored", "retake": "flagged"}[label]
    values: dict[str, object] = dict(
        t=time.time(),
        section=section,
        tile_id=tile_id,
        seq=seq,
        action=action,
        path=f"{section}/{tile_id}.tif",
        shape=[64, 64],
        dtype="uint8",
        pixel_size_nm=4.0,
        stage_x_um=0.0,
        stage_y_um=0.0,
        t_acquired=1.7e9,
        blur_score={"sharp": 0.1, "soft": 0.5, "retake": 0.9}[label],
        label=label,
        sigma_px=1.0,
        reason="beyond repair" if label == "retake" else "",
        timings_s={"total_s": 0.25},
    )
    values.update(fields)
    return QcTileRecord(**values)  # type: ignore[arg-type]


def rejection(section: str | None, code: str = "bad_field") -> QcRejection:
    return QcRejection(t=time.time(), section=section, tile_id=None, seq=None, action="rejected", code=code)


def test_rows_answers_and_counts_add_up(tmp_path: Path) -> None:
    index = TileIndex(tmp_path / "index.sqlite")
    retake = tile_line("t2", 2, "retake")
    failed = QcStorageFailure(
        t=time.time(), section="s1", tile_id="t3", seq=3, action="storage_failed", path="s1/t3.tif", error="EROFS"
    )
    lines = [tile_line("t0", 0), tile_line("t1", 1, "soft"), retake, failed, rejection("s1"), rejection(None)]
    index.record_lines(lines, qc_offset=1234)
    row = index.get("s1", "t2")
    assert row is not None and row.answered and row.seq == 2
    assert row.frames == answer_frames(retake)  # result + retake, exactly as sent
    assert [decode_feedback(f)["type"] for f in row.frames] == ["result", "retake"]
    assert index.at_seq("s1", 1) is not None and index.at_seq("s1", 9) is None
    stored = index.get("s1", "t3")
    assert stored is not None and not stored.answered  # a resend of it is stored, not repeated
    index.record_repeat("s1")
    assert index.counts("s1") == {
        "n_done": 4,
        "n_sharp": 1,
        "n_soft": 1,
        "n_retake": 1,
        "n_empty": 0,
        "n_error": 1,
        "n_rejected": 1,
        "n_repeat": 1,
    }
    assert index.qc_offset() == 1234
    # The resend of the storage_failed tile was stored: its row now carries the real outcome.
    index.record_lines([tile_line("t3", 3)], qc_offset=2000)
    assert index.counts("s1")["n_sharp"] == 2 and index.counts("s1")["n_error"] == 0
    # A recorded answer never changes, even if the same tile's line came again.
    index.record_lines([tile_line("t0", 0, "soft")], qc_offset=2100)
    assert index.get("s1", "t0").frames == answer_frames(tile_line("t0", 0))  # type: ignore[union-attr]


def test_superseded_and_section_end(tmp_path: Path) -> None:
    index = TileIndex(tmp_path / "index.sqlite")
    superseded = QcSuperseded(
        t=time.time(),
        section="s1",
        tile_id="t0",
        seq=0,
        action="superseded",
        superseded_by="t0.r1",
        path="s1/replaced/t0.tif",
        delivered_path="s1/t0.tif",
    )
    index.record_lines([tile_line("t0", 0, "retake"), tile_line("t0.r1", 1, replaces="t0", path="s1/t0.tif")], 10)
    index.record_lines([superseded], 20)
    old, new = index.get("s1", "t0"), index.get("s1", "t0.r1")
    assert old is not None and old.superseded_by == "t0.r1"
    assert new is not None and new.replaces == "t0" and new.path == "s1/t0.tif"
    assert decode_feedback(new.frames[0])["replaces"] == "t0"
    assert index.section_state("s1") == "open" and index.section_done_frame("s1") is None
    index.end_section("s1", 2, b"frame")
    assert (index.section_state("s1"), index.section_done_frame("s1")) == ("ended", b"frame")


def test_lines_past_the_indexed_offset_are_applied_at_start_up(tmp_path: Path) -> None:
    """A crash after the QC append and before the index commit: the next start knows the tile."""
    qc = QcLog(tmp_path / "qc.jsonl", fsync=True)
    index = TileIndex(tmp_path / "index.sqlite")
    first = [tile_line("t0", 0), rejection("s1")]
    index.record_lines(first, qc.append(*first))
    qc.append(tile_line("t1", 1, "retake"), rejection("s1"))  # "crash": never committed
    index.close()

    reopened = TileIndex(tmp_path / "index.sqlite")
    assert reopened.get("s1", "t1") is None
    assert reopened.reconcile(qc.path) == 2
    row = reopened.get("s1", "t1")
    assert row is not None and row.frames == answer_frames(tile_line("t1", 1, "retake"))
    assert reopened.counts("s1")["n_rejected"] == 2
    assert reopened.qc_offset() == qc.path.stat().st_size
    assert reopened.reconcile(qc.path) == 0  # nothing applied twice


def test_a_lost_index_is_rebuilt_from_the_whole_qc_record(tmp_path: Path) -> None:
    qc = QcLog(tmp_path / "qc.jsonl", fsync=False)
    qc.append(*(tile_line(f"t{i}", i, label) for i, label in enumerate(["sharp", "soft", "retake"])))
    index = TileIndex(tmp_path / "index.sqlite", fsync=False)
    assert index.reconcile(qc.path) == 3
    assert index.counts("s1")["n_done"] == 3 and index.n_tiles() == 3
