"""One line of qc.jsonl, typed: the sink builds it, the section report and the tests read it back.

Four kinds of line (docs/protocol.md): `QcTileRecord`, a tile that was written (as acquired, restored or
flagged) or failed in processing; `QcRejection`, a message the appliance refused; `QcStorageFailure`, a
tile that could not be written durably (nothing delivered, the controller resends it); and
`QcSuperseded`, a delivered tile replaced by a retake (retake loop, protocol v1.1). The detector's
verdict is flattened into the tile line (its `model_version` as `detector_version`); a tile that failed
before detection carries `label` and `blur_score` null and no other verdict fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.messages import BlurAssessment, TileLabel

QC_FILENAME = "qc.jsonl"
# The sink's durable tile index beside qc.jsonl (appliance/stream/tile_index.py), and SQLite's companions.
INDEX_FILENAME = "index.sqlite"
OUTPUT_DIR_FILES = frozenset(
    {QC_FILENAME, INDEX_FILENAME, f"{INDEX_FILENAME}-wal", f"{INDEX_FILENAME}-shm", f"{INDEX_FILENAME}-journal"}
)
TileAction = Literal["written", "restored", "flagged", "failed"]


class _Line(BaseModel):
    # The file is the contract: an unknown key is a different format, not something to skip.
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json_line(self) -> str:
        """Compact JSON of the fields that were set (a failed tile has no verdict fields); no NaN."""
        return json.dumps(self.model_dump(exclude_unset=True), separators=(",", ":"), allow_nan=False)


class QcTileRecord(_Line):
    """A tile the appliance processed. Times are Unix seconds; stage position of the tile centre in µm."""

    t: float = Field(description="When the tile file and this line became durable.")
    section: str
    tile_id: str
    seq: int
    action: TileAction
    path: str = Field(description="Delivered tile, relative to the output directory.")
    original_path: str | None = Field(None, description="Kept as-acquired tile (restored tiles), relative.")
    shape: list[int] = Field(min_length=2, max_length=2, description="Height, width (px).")
    dtype: str | None = None
    pixel_size_nm: float
    stage_x_um: float
    stage_y_um: float
    t_acquired: float
    beam: int | None = None
    # The detector's verdict (BlurAssessment); null label and score when the tile failed before detection.
    blur_score: float | None = None
    label: TileLabel | None = None
    sigma_px: float | None = None
    anisotropy: float | None = None
    angle_deg: float | None = None
    region_scores: list[list[float]] | None = None
    reason: str | None = None
    baseline_sigma_px: float | None = Field(
        None,
        description="Calibrated verdicts only (else absent): the in-focus baseline (px at this tile's pixel size) "
        "sigma_px was measured from, the rig's or the beam's own (docs/calibration.md).",
    )
    spectral_sigma_px: float | None = Field(
        None,
        description="With a spectral rig calibration only (else absent): blur added to the rig's in-focus power "
        "spectrum, px (docs/calibration.md).",
    )
    spectral_estimate_px: float | None = Field(
        None,
        description="With a spectral rig calibration only (else absent): the blur estimate against that spectrum, "
        "px; a calibrated sigma_px is this (docs/calibration.md).",
    )
    spectral_spot_sigma_px: float | None = Field(
        None,
        description="A partial-blur retake read with a spectral calibration only: the largest reading around the "
        "region it names, px (docs/calibration.md).",
    )
    deblur_version: str | None = Field(
        None,
        description="A restored tile only: the deblur model and engine, plus `+rig-wiener-<share>` where a rig "
        "calibration's restoration blend was applied (docs/calibration.md).",
    )
    error: str | None = None
    timings_s: dict[str, float] = Field(default_factory=dict, description="Seconds per stage, total_s included.")
    detector_version: str | None = None
    replaces: str | None = Field(
        None, description="Retake loop: tile_id of the flagged tile this one re-acquires (absent otherwise)."
    )
    restore_suspended: bool | None = Field(
        None,
        description="True (else absent): a soft tile written as acquired because its section tripped the "
        "safety rule (ingest.implausible_blur_share, docs/operating.md).",
    )

    @staticmethod
    def verdict_fields(assessment: BlurAssessment | None) -> dict[str, Any]:
        """The verdict as record fields: the assessment's, model_version named detector_version."""
        if assessment is None:
            return {"label": None, "blur_score": None, "detector_version": None}
        fields = assessment.to_record()
        fields["detector_version"] = fields.pop("model_version")
        return fields


class QcRejection(_Line):
    """A message the ingest refused, with its wire error code; ids are null where they were unreadable."""

    t: float
    section: str | None
    tile_id: str | None
    seq: int | None
    action: Literal["rejected"]
    code: str
    error: str | None = None


class QcStorageFailure(_Line):
    """A valid tile whose file or record could not be written (error `storage_failed`): nothing delivered."""

    t: float
    section: str
    tile_id: str
    seq: int
    action: Literal["storage_failed"]
    path: str = Field(description="Where the tile would have been delivered, relative to the output directory.")
    label: TileLabel | None = None
    error: str


class QcSuperseded(_Line):
    """A delivered tile replaced by its retake: its file moved to `path`, the retake now at `delivered_path`."""

    t: float
    section: str
    tile_id: str = Field(description="The replaced (flagged) tile.")
    seq: int
    action: Literal["superseded"]
    superseded_by: str = Field(description="tile_id of the retake.")
    path: str = Field(description="The replaced tile's file now: <section>/replaced/<tile_id>.tif.")
    delivered_path: str = Field(description="Where the retake is delivered (the replaced tile's old path).")


QcLine = QcTileRecord | QcRejection | QcStorageFailure | QcSuperseded
_LINE_BY_ACTION: dict[str, type[QcRejection | QcStorageFailure | QcSuperseded]] = {
    "rejected": QcRejection,
    "storage_failed": QcStorageFailure,
    "superseded": QcSuperseded,
}


def parse_qc_line(line: str) -> QcLine:
    """One qc.jsonl line as its typed record; ValueError (pydantic's, naming the field) otherwise."""
    raw = json.loads(line)
    action = raw.get("action") if isinstance(raw, dict) else None
    if isinstance(action, str) and action in _LINE_BY_ACTION:
        return _LINE_BY_ACTION[action].model_validate(raw)
    return QcTileRecord.model_validate(raw)


def read_qc_lines(path: Path) -> list[QcLine]:
    """Every record of a qc.jsonl in file order; ValueError naming the file and line of a bad one."""
    records: list[QcLine] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_qc_line(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not a QC record: {exc}") from exc
    return records
