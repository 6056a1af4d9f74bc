"""`python -m appliance ...`: demo, serve, report, calibrate, score, deblur."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance.config import ConfigError, DeblurConfig, DetectorConfig, load_rig_config
from appliance.tools.offline import FileResult

if TYPE_CHECKING:
    from appliance.tools.offline import OfflineDetector

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _error(message: str) -> None:
    # Plain, unwrapped lines: operators grep them and scripts parse them.
    typer.echo(f"error: {message}", err=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


keys_app = typer.Typer(no_args_is_help=True, help="ZeroMQ CURVE keys of the rig and its controller (docs/security.md).")
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="Directory for the key files (created; secrets get mode 0600).")],
    name: Annotated[
        list[str] | None, typer.Option(help="Key pair(s) to make, NAME.key + NAME.key_secret (repeat the option).")
    ] = None,
) -> None:
    """Make CURVE key pairs (default: `server` for the rig and `controller` for the microscope controller)."""
    from appliance.stream.zmq_security import load_key_pair, write_key_pair

    made: dict[str, tuple[Path, Path]] = {}
    for pair in name or ["server", "controller"]:
        try:
            made[pair] = write_key_pair(out, pair)
        except (FileExistsError, OSError) as exc:
            _error(str(exc))
            raise typer.Exit(2) from None
    for pair, (public, secret) in made.items():
        typer.echo(f"{pair}: public {load_key_pair(public).public.decode()}  ({public}; secret: {secret}, mode 0600)")
    if "server" in made:
        controllers = [load_key_pair(p).public.decode() for n, (p, _) in made.items() if n != "server"]
        typer.echo("\nrig.yaml:\nsecurity:\n  curve: true")
        typer.echo(f"  server_secret_key_file: {made['server'][1].resolve()}")
        typer.echo("  controller_public_keys:" + "".join(f'\n    - "{key}"' for key in controllers))


@app.command()
def demo(
    tiles: Annotated[int, typer.Option(min=1, help="Tiles to replay (the bundled samples in turn).")] = 120,
    rate: Annotated[float, typer.Option(min=0.0, help="Tiles/s to send; 0 = flat out.")] = 25.4,
    out: Annotated[Path | None, typer.Option(help="Output directory (default appliance-out/demo-<time>).")] = None,
    verbose: bool = False,
) -> None:
    """Run the whole appliance locally on CPU on the bundled real EM sample tiles and print a summary."""
    _setup_logging(verbose)
    from appliance.serving.pipeline import Appliance
    from appliance.tools.demo import run_demo
    from appliance.tools.replay_summary import print_table, replay_table

    report, output_dir, report_html = run_demo(out, tiles, rate or None, verbose)
    print_table(replay_table(report, "appliance demo (bundled 512x512 sample tiles)"))
    typer.echo(f"outputs (tiles, originals/, qc.jsonl): {output_dir}")
    if report_html.is_file():
        typer.echo(f"QC report (focus map, per beam, retakes), open in a browser: {report_html}")
    else:
        _error(f"no QC report at {report_html}; Ray's logs: {Appliance.ray_log_dir()}")
    if report.lost or report.duplicated:
        raise typer.Exit(1)


@app.command()
def serve(
    config: Annotated[Path, typer.Option(help="Rig config (see rig.example.yaml).")],
    status_every: Annotated[float, typer.Option(min=0.1, help="Seconds between status lines.")] = 60.0,
    verbose: Annotated[bool, typer.Option(help="Also show INFO logs and Ray's own output.")] = False,
) -> None:
    """Run the appliance for a rig until SIGTERM/SIGINT, then drain in-flight tiles and exit."""
    _setup_logging(verbose)
    try:
        cfg = load_rig_config(config)
    except ConfigError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    from appliance.serving.service import serve_until_signal

    try:
        serve_until_signal(cfg, status_every_s=status_every, verbose=verbose)
    except ConfigError as exc:  # checked at start, before Ray: e.g. detector.calibration
        _error(f"{config}: {exc}")
        raise typer.Exit(2) from None


@app.command()
def report(
    output_dir: Annotated[Path, typer.Argument(help="The appliance's output directory (holds qc.jsonl).")],
    section: Annotated[str | None, typer.Option(help="Section to report (default: every section).")] = None,
    out: Annotated[Path | None, typer.Option(help="HTML file (default: OUTPUT_DIR/<section>/report.html).")] = None,
    sharp_sigma_px: Annotated[float, typer.Option(help="detector.sharp_sigma_px of the run.")] = 0.8,
    max_restorable_sigma_px: Annotated[float, typer.Option(help="detector.max_restorable_sigma_px.")] = 3.0,
) -> None:
    """Write a section's self-contained QC report (focus map, sigma histogram, per beam, timeline, retakes)."""
    from appliance.operator.report_figures import Thresholds
    from appliance.operator.section_qc import read_sections
    from appliance.operator.section_report import REPORT_FILENAME, write_section_report
    from appliance.qc_record import QC_FILENAME

    qc_path = output_dir / QC_FILENAME
    try:
        sections = read_sections(qc_path, section)
    except (OSError, ValueError) as exc:
        _error(f"{qc_path}: {exc.strerror}" if isinstance(exc, OSError) else str(exc))
        raise typer.Exit(1) from None
    if not sections:
        _error(f"{qc_path}: no tiles" + (f" of section {section!r}" if section else ""))
        raise typer.Exit(1)
    if out is not None and len(sections) > 1:
        _error(f"{qc_path} holds sections {', '.join(sections)}: choose one with --section to write {out}")
        raise typer.Exit(2)
    thresholds = Thresholds(sharp_sigma_px, max_restorable_sigma_px)
    for name, tiles in sections.items():
        path = out or output_dir / name / REPORT_FILENAME
        typer.echo(write_section_report(name, tiles, output_dir, path, thresholds))


def _emit(results: Iterable[FileResult], as_json: bool) -> int:
    failures = 0
    for result in results:
        if result.error or result.record is None:
            failures += 1
            _error(result.error or f"{result.path}: no result")
        elif as_json:
            print(json.dumps(result.record), flush=True)
        else:
            record = result.record
            print(" ".join(f"{key}={record[key]}" for key in record if key != "region_scores"), flush=True)
    return failures


def _rig_sections(config: Path | None) -> tuple[DetectorConfig, DeblurConfig]:
    """The rig's detector and deblur sections (--config), or the defaults; exits 2 naming a bad field."""
    if config is None:
        return DetectorConfig(), DeblurConfig()
    try:
        rig = load_rig_config(config)
    except ConfigError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    return rig.detector, rig.deblur


def _offline_detector(cfg: DetectorConfig, calibration: Path | None, pixel_size_nm: float | None) -> OfflineDetector:
    """The detector for `score` and `deblur`; exits 2 on a pixel size without a calibration, 1 on a bad one."""
    from appliance.detection.calibration import CalibrationError
    from appliance.tools.offline import OfflineDetector

    try:
        detector = OfflineDetector(cfg, calibration, pixel_size_nm)
    except CalibrationError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    warning = detector.pixel_size_warning()
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    return detector


CALIBRATION_HELP = "Rig calibration (`calibrate`): measure blur from this rig's in-focus baseline."
PIXEL_SIZE_HELP = (
    "Pixel size of these tiles (nm), as a tile header gives it to the appliance: the calibration's baseline and "
    'spectrum are taken at it (docs/calibration.md, "Pixel size"); needs --calibration. Unset: the tiles are '
    "taken as of the calibration's pixel size."
)


@app.command()
def calibrate(
    files: Annotated[list[Path], typer.Argument(help="5-20 known-good in-focus tiles of one rig (PNG/TIFF).")],
    out: Annotated[Path, typer.Option(help="Calibration file to write (JSON; written atomically).")],
    config: Annotated[
        Path | None, typer.Option(help="Rig config whose detector to calibrate (default: built-in).")
    ] = None,
    pixel_size_nm: Annotated[
        list[float] | None,
        typer.Option(
            min=0.001,
            help="Pixel size of these tiles (nm): once for all, or once per file in their order (one rig at a few "
            "magnifications, within 2x of their median). Recorded, so that tiles of another pixel size get the "
            "baseline and the rig's spectrum scaled (docs/calibration.md); unset: both are used as they are.",
        ),
    ] = None,
    restoration: Annotated[
        bool,
        typer.Option(
            help="Also measure how this rig's soft tiles are best restored: the deblur model's share of a blend "
            "with the Wiener filter against the rig's spectrum (the rig config's deblur model; ~25-40 s on a CPU).",
        ),
    ] = True,
) -> None:
    """Learn this rig's in-focus blur baseline from known-good tiles (set detector.calibration to the file)."""
    from appliance.tools.offline import calibrate_files

    detector, deblur = _rig_sections(config)
    sizes = pixel_size_nm[0] if pixel_size_nm and len(pixel_size_nm) == 1 else pixel_size_nm or None
    calibration, errors = calibrate_files(files, out, detector, sizes, deblur if restoration else None)
    for error in errors:
        _error(error)
    if calibration is None:
        raise typer.Exit(1)
    typer.echo(
        f"calibrated detector {calibration.model_version} on {calibration.tile_count} tiles: in-focus baseline "
        f"sigma {calibration.baseline_sigma_px:.2f} px (regions {calibration.region_baseline_sigma_px:.2f} px, "
        f"spread {calibration.spread_log_sigma:.2f} in log-sigma), noise {calibration.noise_level:.4f}, "
        f"{calibration.contrast_polarity}, {calibration.dtype}, pixel size "
        + ("unknown" if calibration.pixel_size_nm is None else f"{calibration.pixel_size_nm:g} nm")
    )
    if calibration.spectral is None:
        typer.echo("no spectral reference (tiles < 128 px or too little structure above the noise): quadrature rule")
    else:
        usable = sum(calibration.spectral.usable)
        typer.echo(f"spectral reference: the rig's in-focus power spectrum ({usable} usable frequency bins)")
    blend = calibration.restoration
    if blend is not None:
        typer.echo(
            f"restoration: {blend.model_weight:.0%} deblur model {blend.deblur_model}, "
            f"{1 - blend.model_weight:.0%} Wiener filter against the rig's spectrum (best of "
            f"{len(blend.psnr_db)} shares on {blend.probes} blurred copies of the known-good tiles)"
        )
    typer.echo(f"written {out}; use it: detector.calibration: {out.resolve()} in rig.yaml, or --calibration {out}")


@app.command()
def score(
    files: Annotated[list[Path], typer.Argument(help="PNG/TIFF tiles, 8- or 16-bit grayscale.")],
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per file.")] = False,
    backend: Annotated[str, typer.Option(help="auto | onnx | classical")] = "auto",
    calibration: Annotated[Path | None, typer.Option(help=CALIBRATION_HELP)] = None,
    pixel_size_nm: Annotated[float | None, typer.Option(min=0.001, help=PIXEL_SIZE_HELP)] = None,
) -> None:
    """Score focus offline: blur_score (0 sharp ... 1 very blurred), label, blur estimate, region map."""
    from appliance.tools.offline import score_files

    detector = _offline_detector(DetectorConfig(backend=backend), calibration, pixel_size_nm)
    failures = _emit(score_files(files, detector), json_lines)
    if failures:
        raise typer.Exit(1)


@app.command()
def deblur(
    files: Annotated[list[Path], typer.Argument(help="PNG/TIFF tiles, 8- or 16-bit grayscale.")],
    out: Annotated[Path, typer.Option(help="Directory for the restored TIFFs (created).")],
    force: Annotated[bool, typer.Option(help="Also restore files scored `sharp` (never `retake`).")] = False,
    backend: Annotated[str, typer.Option(help="auto | onnx | torch | classical")] = "auto",
    calibration: Annotated[Path | None, typer.Option(help=CALIBRATION_HELP)] = None,
    pixel_size_nm: Annotated[float | None, typer.Option(min=0.001, help=PIXEL_SIZE_HELP)] = None,
) -> None:
    """Restore soft-focus tiles offline with the same detector and deblur model as the appliance.

    Refused (exit 2, nothing written): --out being an input's folder, two inputs with the same stem,
    an --out that cannot be written.
    """
    from appliance.tools.offline import check_deblur_outputs, deblur_files, prepare_out_dir

    problems = check_deblur_outputs(files, out)
    for problem in problems:
        _error(problem)
    if problems:
        raise typer.Exit(2)
    detector = _offline_detector(DetectorConfig(), calibration, pixel_size_nm)
    unwritable = prepare_out_dir(out)
    if unwritable:
        _error(unwritable)
        raise typer.Exit(2)
    results = deblur_files(files, out, detector, DeblurConfig(backend=backend), force)
    if _emit(results, True):
        raise typer.Exit(1)
