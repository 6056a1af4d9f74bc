"""The part of a QC record a section report needs, from the running sink or from qc.jsonl (no plotting)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TileQc:
    """One tile of a section as the report shows it.

    stage_x_um, stage_y_um: stage position of the tile centre (µm); width_um, height_um: its extent.
    sigma_px: estimated blur (px), None when the tile failed before detection. t_done: Unix time it
    became durable. action: written | restored | flagged | failed. empty: too little structure to judge.
    """

    tile_id: str
    seq: int
    stage_x_um: float
    stage_y_um: float
    width_um: float
    height_um: float
    label: str | None
    action: str
    sigma_px: float | None
    blur_score: float | None
    beam: int | None
    t_acquired: float
    t_done: float
    path: str
    reason: str
    empty: bool
    detector_version: str | None
    deblur_version: str | None


def tile_qc_from_record(record: dict[str, Any]) -> TileQc:
    """The report's view of one QC line of a tile (not of a refused message: see `is_tile_record`)."""
    pixel_um = float(record["pixel_size_nm"]) / 1000.0
    height, width = record["shape"]
    reason = str(record.get("reason") or record.get("error") or "")
    return TileQc(
        tile_id=str(record["tile_id"]), seq=int(record["seq"]),
        stage_x_um=float(record["stage_x_um"]), stage_y_um=float(record["stage_y_um"]),
        width_um=width * pixel_um, height_um=height * pixel_um,
        label=record.get("label"), action=str(record["action"]),
        sigma_px=record.get("sigma_px"), blur_score=record.get("blur_score"), beam=record.get("beam"),
        t_acquired=float(record["t_acquired"]), t_done=float(record["t"]), path=str(record["path"]),
        reason=reason, empty=reason.startswith("not judgeable"),
        detector_version=record.get("detector_version"), deblur_version=record.get("deblur_version"),
    )


def is_tile_record(record: dict[str, Any]) -> bool:
    """A QC line of a tile that was processed (refused messages have no stage position)."""
    return record.get("action") != "rejected"


def read_sections(qc_path: Path, section: str | None = None) -> dict[str, list[TileQc]]:
    """Tiles per section from a qc.jsonl, in file order; only `section` when given.

    Raises ValueError naming the file and line when a line is not a QC record.
    """
    sections: dict[str, list[TileQc]] = {}
    with open(qc_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not is_tile_record(record) or (section is not None and record["section"] != section):
                    continue
                sections.setdefault(str(record["section"]), []).append(tile_qc_from_record(record))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{qc_path}:{number}: not a QC record of a tile: {exc!r}") from exc
    return sections
