"""The part of a QC record a section report needs, from the running sink or from qc.jsonl (no plotting)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.qc_record import QcTileRecord, read_qc_lines


@dataclass(frozen=True)
class TileQc:
    """One tile of a section as the report shows it.

    stage_x_um, stage_y_um: stage position of the tile centre (µm); width_um, height_um: its extent.
    sigma_px: estimated blur (px), None when the tile failed before detection. t_done: Unix time it
    became durable. action: written | restored | flagged | failed. empty: no tissue (label `empty`) or too
    little structure to judge.
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
    baseline_sigma_px: float | None = None  # the in-focus baseline a calibrated verdict was measured from

    @classmethod
    def from_record(cls, record: QcTileRecord) -> TileQc:
        """The report's view of one tile's QC record."""
        pixel_um = record.pixel_size_nm / 1000.0
        height, width = record.shape
        reason = record.reason or record.error or ""
        return cls(
            tile_id=record.tile_id,
            seq=record.seq,
            stage_x_um=record.stage_x_um,
            stage_y_um=record.stage_y_um,
            width_um=width * pixel_um,
            height_um=height * pixel_um,
            label=record.label,
            action=record.action,
            sigma_px=record.sigma_px,
            blur_score=record.blur_score,
            beam=record.beam,
            t_acquired=record.t_acquired,
            t_done=record.t,
            path=record.path,
            reason=reason,
            empty=record.label == "empty" or reason.startswith("not judgeable"),
            detector_version=record.detector_version,
            deblur_version=record.deblur_version,
            baseline_sigma_px=record.baseline_sigma_px,
        )


def read_sections(qc_path: Path, section: str | None = None) -> dict[str, list[TileQc]]:
    """Tiles per section from a qc.jsonl, in file order (refused messages skipped); only `section` when given.

    Raises ValueError naming the file and line when a line is not a QC record.
    """
    sections: dict[str, list[TileQc]] = {}
    for record in read_qc_lines(qc_path):
        if isinstance(record, QcTileRecord) and section in (None, record.section):
            sections.setdefault(record.section, []).append(TileQc.from_record(record))
    return sections
