"""Offline use of the same detector and restorer on files: `appliance score` and `appliance deblur`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import DeblurConfig, DetectorConfig
from appliance.detection.detector import BlurDetector
from appliance.restoration.restorer import TileRestorer
from appliance.tile_io import TileError, read_tile, write_tile_atomic


@dataclass(frozen=True)
class FileResult:
    """One file's outcome: a record to print, or the error that names the file."""

    path: Path
    record: dict[str, Any] | None = None
    error: str | None = None


def score_files(paths: list[Path], cfg: DetectorConfig) -> Iterator[FileResult]:
    """Assess each file; a bad file yields its error and the rest go on."""
    detector = BlurDetector.from_config(cfg)
    for path in paths:
        try:
            assessment = detector.assess([read_tile(path)], names=[str(path)])[0]
        except TileError as exc:
            yield FileResult(path, error=str(exc))
            continue
        yield FileResult(path, record={"path": str(path), **assessment.to_record()})


def deblur_files(
    paths: list[Path], out_dir: Path, detector_cfg: DetectorConfig, deblur_cfg: DeblurConfig, force: bool
) -> Iterator[FileResult]:
    """Restore each `soft` file (and `sharp` ones with `force`) into out_dir/<stem>.tif, atomically.

    Sharp files are written unchanged; `retake` files are too, always: restoring blur beyond the
    model's measured range would invent structure.
    """
    detector = BlurDetector.from_config(detector_cfg)
    restorer = TileRestorer.from_config(deblur_cfg)
    for path in paths:
        try:
            pixels = read_tile(path)
        except TileError as exc:
            yield FileResult(path, error=str(exc))
            continue
        assessment = detector.assess([pixels], names=[str(path)])[0]
        restore = assessment.label == "soft" or (force and assessment.label == "sharp")
        output = restorer.restore([pixels], [assessment], names=[str(path)])[0] if restore else pixels
        out_path = out_dir / f"{path.stem}.tif"
        write_tile_atomic(out_path, output)
        yield FileResult(
            path,
            record={
                "path": str(path),
                "out": str(out_path),
                "label": assessment.label,
                "blur_score": assessment.blur_score,
                "sigma_px": assessment.sigma_px,
                "action": "restored" if restore else "copied",
                "deblur_version": restorer.model_version if restore else None,
            },
        )
