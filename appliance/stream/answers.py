"""The feedback frames that answer one tile, built from its QC record (one function for the live answer,
the index and the rebuild from qc.jsonl, so a repeat answer is the same answer)."""

from __future__ import annotations

from typing import Any

from appliance.qc_record import QcStorageFailure, QcTileRecord
from appliance.stream.protocol import encode_feedback


def tile_ids(record: QcTileRecord | QcStorageFailure) -> dict[str, Any]:
    """The `section`, `tile_id`, `seq` every per-tile feedback message carries."""
    return {"section": record.section, "tile_id": record.tile_id, "seq": record.seq}


def answer_frames(record: QcTileRecord) -> list[bytes]:
    """`result` (+ `retake` for a flagged tile), or `error` processing_failed for a tile that failed in processing.

    latency_s is the record's timings_s["total_s"] (receive -> durable, s).
    """
    ids = tile_ids(record)
    if record.action == "failed":
        message = f"tile written as acquired: {record.error}"
        return [encode_feedback("error", code="processing_failed", message=message, **ids)]
    assert record.label is not None and record.blur_score is not None and record.sigma_px is not None
    frames = [
        encode_feedback(
            "result",
            **ids,
            label=record.label,
            action=record.action,
            blur_score=record.blur_score,
            sigma_px=record.sigma_px,
            path=record.path,
            latency_s=record.timings_s.get("total_s", 0.0),
            **({"restore_suspended": True} if record.restore_suspended else {}),
            **({"replaces": record.replaces} if record.replaces else {}),
        )
    ]
    if record.label == "retake":
        reason = record.reason or "beyond repair"
        frames.append(encode_feedback("retake", **ids, reason=reason, blur_score=record.blur_score))
    return frames


def storage_failed_frame(record: QcStorageFailure) -> bytes:
    """The `error` storage_failed answer: nothing was delivered, the controller resends the tile later."""
    message = f"tile not stored: {record.error}; nothing delivered, resend it later"
    return encode_feedback("error", code="storage_failed", message=message, **tile_ids(record))
