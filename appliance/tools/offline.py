"""Offline use of the same detector and restorer on files: `appliance calibrate`, `score` and `deblur`."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import DeblurConfig, DetectorConfig
from appliance.detection.calibration import (
    SPECTRAL_PIXEL_SIZE_RATIO,
    CalibrationError,
    RestorationBlend,
    RigCalibration,
    apply_calibration,
    calibrate,
    load_calibration,
    rig_reference,
    save_calibration,
)
from appliance.detection.detector import BlurDetector
from appliance.messages import BlurAssessment
from appliance.restoration.restorer import TileRestorer
from appliance.restoration.rig_blend import measure_model_weight
from appliance.restoration.rig_wiener import RigRestoration
from appliance.tile_io import TileError, ensure_dir, read_tile, write_tile_atomic


@dataclass(frozen=True)
class FileResult:
    """One file's outcome: a record to print, or the error that names the file."""

    path: Path
    record: dict[str, Any] | None = None
    error: str | None = None


class OfflineDetector:
    """The detector of `cfg`, with the rig calibration in `calibration_path` applied when one is given.

    pixel_size_nm: the tiles' pixel size (nm), as a tile header gives it to the running appliance: the
    calibration's baseline and spectrum are taken at it (rig_reference, RigCalibration.spectral_arrays; the rig
    Wiener's spectrum too, `rig_restoration`). None: the tiles are taken as of the calibration's pixel size.

    Raises CalibrationError naming the file when it cannot be read or was made with another detector model,
    and ValueError when a pixel size is given without a calibration (it would change nothing).
    """

    def __init__(
        self, cfg: DetectorConfig, calibration_path: Path | None = None, pixel_size_nm: float | None = None
    ) -> None:
        if pixel_size_nm is not None and calibration_path is None:
            raise ValueError(
                f"--pixel-size-nm {pixel_size_nm:g} needs --calibration: the pixel size scales a rig's calibration, "
                "and the uncalibrated detector reads blur in px"
            )
        self.cfg = cfg
        self.pixel_size_nm = pixel_size_nm
        self.detector = BlurDetector.from_config(cfg)
        self.calibration: RigCalibration | None = (
            load_calibration(calibration_path, self.detector.model_version) if calibration_path is not None else None
        )
        self._spectrum = None if self.calibration is None else self.calibration.spectral_arrays(pixel_size_nm)

    def assess(self, pixels: np.ndarray, name: str) -> BlurAssessment:
        """One tile's verdict (calibrated when a calibration is loaded); raises TileError on bad pixels."""
        verdict = self.detector.assess([pixels], [name], [self._spectrum])[0]
        if self.calibration is None:
            return verdict
        return apply_calibration(verdict, rig_reference(self.calibration, self.pixel_size_nm), self.cfg)

    def calibration_fields(self) -> dict[str, Any]:
        """`calibrated`, the rig's `baseline_sigma_px` and the tiles' `pixel_size_nm` (when given) for a
        calibrated record; nothing otherwise."""
        if self.calibration is None:
            return {}
        fields: dict[str, Any] = {"calibrated": True, "baseline_sigma_px": self.calibration.baseline_sigma_px}
        if self.pixel_size_nm is not None:
            fields["pixel_size_nm"] = self.pixel_size_nm
        return fields

    def pixel_size_warning(self) -> str | None:
        """Why the given pixel size weakens the calibration (one line for the operator), or None."""
        if self.calibration is None or self.pixel_size_nm is None:
            return None
        cal_nm = self.calibration.pixel_size_nm
        if cal_nm is None:
            return (
                f"the calibration records no pixel size: --pixel-size-nm {self.pixel_size_nm:g} changes nothing "
                "(recalibrate with `calibrate --pixel-size-nm`)"
            )
        if self.calibration.spectral is not None and self._spectrum is None:
            low, high = SPECTRAL_PIXEL_SIZE_RATIO
            return (
                f"tiles at {self.pixel_size_nm:g} nm are beyond {low:g}-{high:g}x the calibration's {cal_nm:g} nm: "
                "blur is read from the baseline in quadrature, not the rig's spectrum (less reliable); calibrate "
                "at this pixel size"
            )
        return None


def calibrate_files(
    paths: list[Path],
    out: Path,
    cfg: DetectorConfig,
    pixel_size_nm: float | Sequence[float] | None = None,
    deblur: DeblurConfig | None = None,
) -> tuple[RigCalibration | None, list[str]]:
    """Calibrate the detector of `cfg` on known-good tile files and write the calibration to `out` atomically.

    pixel_size_nm: the tiles' pixel size (nm) when known, recorded in the calibration: one value for all, or one
    per file (calibrate's). deblur: the rig's deblur settings; given, and with a spectral reference, the
    restoration blend is measured with that model (`with_restoration_blend`).

    Returns (calibration, []) or (None, errors naming each bad file or the problem); on any error nothing
    is written.
    """
    per_tile = None if pixel_size_nm is None or isinstance(pixel_size_nm, int | float) else list(pixel_size_nm)
    if per_tile is not None and len(per_tile) != len(paths):
        return None, [
            f"{len(per_tile)} pixel sizes for {len(paths)} tiles: give one --pixel-size-nm for all of them, or one "
            "per tile in the order of the files"
        ]
    tiles, errors = [], []
    for path in paths:
        try:
            tiles.append(read_tile(path))
        except TileError as exc:
            errors.append(str(exc))
    if errors:
        return None, errors
    try:
        calibration = calibrate(tiles, [str(p) for p in paths], BlurDetector.from_config(cfg), pixel_size_nm)
    except CalibrationError as exc:
        return None, [str(exc)]
    if deblur is not None:
        restorer = TileRestorer.from_config(deblur)
        calibration = with_restoration_blend(calibration, tiles, restorer, per_tile)
    try:
        save_calibration(calibration, out)
    except OSError as exc:
        return None, [f"{out}: cannot write the calibration: {exc.strerror or exc}"]
    return calibration, []


def with_restoration_blend(
    calibration: RigCalibration,
    tiles: list[np.ndarray],
    restorer: TileRestorer,
    pixel_size_nm: Sequence[float] | None = None,
) -> RigCalibration:
    """The calibration with the restoration blend measured on its known-good tiles with `restorer`'s model
    (appliance.restoration.rig_blend); unchanged without a spectral reference or when no tile can be read.
    pixel_size_nm: per tile, when they differ (calibrate's): each is restored against the spectrum at its own."""
    reference = calibration.spectral_arrays()
    if reference is None:
        return calibration
    per_tile = (
        None if pixel_size_nm is None else [calibration.spectral_arrays(nm, restoring=True) for nm in pixel_size_nm]
    )
    measured = measure_model_weight(restorer, tiles, reference, calibration.noise_level**2, tile_references=per_tile)
    if measured is None:
        return calibration
    blend = RestorationBlend(
        deblur_model=restorer.weights_version,
        model_weight=measured.model_weight,
        psnr_db={f"{w:g}": round(v, 3) for w, v in measured.psnr_db.items()},
        probes=measured.probes,
    )
    return RigCalibration.model_validate({**calibration.model_dump(), "restoration": blend.model_dump()})


def rig_restoration(calibration: RigCalibration | None, pixel_size_nm: float | None = None) -> RigRestoration | None:
    """What a calibration gives the restorer of tiles of pixel_size_nm (its blend and the spectrum it restores
    against; None: as calibrated), or None."""
    inputs = None if calibration is None else calibration.restoration_inputs(pixel_size_nm)
    return None if inputs is None else RigRestoration(*inputs)


def score_files(paths: list[Path], detector: OfflineDetector) -> Iterator[FileResult]:
    """Assess each file; a bad file yields its error and the rest go on."""
    for path in paths:
        try:
            assessment = detector.assess(read_tile(path), str(path))
        except TileError as exc:
            yield FileResult(path, error=str(exc))
            continue
        yield FileResult(path, record={"path": str(path), **assessment.to_record(), **detector.calibration_fields()})


def deblur_output_path(path: Path, out_dir: Path) -> Path:
    """Where `deblur` writes the file restored from `path`: out_dir/<stem>.tif."""
    return out_dir / f"{path.stem}.tif"


def check_deblur_outputs(paths: list[Path], out_dir: Path) -> list[str]:
    """Why `deblur` must not run with these inputs and --out (empty when it may): one line per problem.

    Refused: --out being an input's folder (the acquired file could be overwritten), two inputs
    written to the same output name (same stem). Creates nothing (prepare_out_dir does).
    """
    problems = []
    out_resolved = out_dir.resolve()
    for path in paths:
        if path.resolve().parent == out_resolved:
            problems.append(
                f"--out {out_dir} is the folder of the input {path}: the restored TIFF could overwrite the acquired "
                "file; choose another folder"
            )
            break
    by_output: dict[Path, Path] = {}
    for path in paths:
        target = deblur_output_path(path, out_dir)
        if target in by_output and by_output[target].resolve() != path.resolve():
            problems.append(
                f"inputs {by_output[target]} and {path} would both be written to {target}; rename one or run them apart"
            )
        by_output.setdefault(target, path)
    return problems


def prepare_out_dir(out_dir: Path) -> str | None:
    """Create `out_dir` and check a file can be written there; the problem in one line, else None."""
    try:
        ensure_dir(out_dir)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        return f"--out {out_dir}: cannot write there: {exc.strerror or exc}"
    return None


def deblur_files(
    paths: list[Path], out_dir: Path, detector: OfflineDetector, deblur_cfg: DeblurConfig, force: bool
) -> Iterator[FileResult]:
    """Restore each `soft` file (and `sharp` ones with `force`) into out_dir/<stem>.tif, atomically.

    Sharp files are written unchanged; `retake` files are too, always: restoring blur beyond the
    model's measured range would invent structure. Call check_deblur_outputs first; a file that still
    cannot be written yields its error and the rest go on.
    """
    restorer = TileRestorer.from_config(deblur_cfg)
    rig = rig_restoration(detector.calibration, detector.pixel_size_nm)
    for path in paths:
        try:
            pixels = read_tile(path)
        except TileError as exc:
            yield FileResult(path, error=str(exc))
            continue
        assessment = detector.assess(pixels, str(path))
        restore = assessment.label == "soft" or (force and assessment.label == "sharp")
        version = None
        if restore:
            restored, versions = restorer.restore_versioned([pixels], [assessment], [str(path)], [rig])
            output, version = restored[0], versions[0]
        else:
            output = pixels
        out_path = deblur_output_path(path, out_dir)
        try:
            write_tile_atomic(out_path, output)
        except OSError as exc:
            yield FileResult(path, error=f"{path}: cannot write {out_path}: {exc.strerror or exc}")
            continue
        yield FileResult(
            path,
            record={
                "path": str(path),
                "out": str(out_path),
                "label": assessment.label,
                "blur_score": assessment.blur_score,
                "sigma_px": assessment.sigma_px,
                "action": "restored" if restore else "copied",
                "deblur_version": version,
                **detector.calibration_fields(),
            },
        )
