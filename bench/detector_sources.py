"""Blur detector per EM source, uncalibrated and calibrated with 5 known-good tiles of that source.

    nice -n 5 python bench/detector_sources.py      # writes bench/results/detector_sources.{json,md}
    nice -n 5 python bench/detector_sources.py --loso models/detector/runs/loso \
        --out bench/results/detector_sources_loso.json   # each source tested by the fold that never saw it

Sources: every folder of ../shared/data/em-corpus (its `soft/` tiles reported apart: real soft tiles,
never sharp targets) plus the isbi2012-train test split (images 26-29). Per source:

1. Sharp tiles are the real in-focus tiles as they are (their own instrument noise). Tiles larger than
   512 px are centre-cropped to 512 px. A source with fewer than SMALL_SOURCE tiles is cut into a
   non-overlapping k x k grid of crops (k the smallest that gives >= SMALL_SOURCE crops with sides
   >= 128 px); neighbouring crops of one field share specimen and instrument, as tiles of one rig do.
2. Blurred tiles: each sharp tile blurred by every family (gaussian, disk, astigmatic, tilted) at sigma
   1, 1.5, 2, 3 px (models.blur_synth.apply_blur), then Gaussian noise at the tile's own measured
   (Immerkaer) noise level and re-quantised to the tile's dtype: the rig's noise, not the training mix.
3. Uncalibrated: the detector's own labels and sigma on every tile.
4. Calibrated: appliance.detection.calibration.calibrate on 5 tiles drawn from the source, applied to all the
   other tiles (the 5 are left out); repeated over DRAWS random draws (fewer when the source has few).
   A draw that calibrate() refuses is counted and reported, not silently replaced.

Metrics: sharp called non-sharp (%), blurred (sigma >= 1 px, every family) called sharp (%), AUROC of
sigma sharp vs blurred, median sigma of the sharp tiles, median relative sigma error per family at
sigma 1-3 px (uncalibrated: sigma read vs true; calibrated: blur added to the baseline vs true).
Calibrated blurred called sharp is also given per sigma, for the tilted family (its sigma is the largest, at
one edge or corner) and for the three others together.
Calibrated = the runtime's rule: the calibration holds the 5 tiles' in-focus power spectrum, each tile's
blur added to it is read (appliance.spectral) and apply_calibration takes that reading; the
calibrated AUROC is that of the calibrated sigma (the spectral reading is not a function of the model's
sigma). The rule before it (quadrature from the model's baseline) is scored on the same draws
(`quadrature`).
The mapping investigation scores candidate rules on the same draws (`rule_thresholds`): quadrature
subtraction of the median baseline (the runtime rule), quadrature from an upper in-focus baseline, and a
margin in log-sigma above the baseline. Every rule is a threshold on the raw tile sigma.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # models/ is not installed

from appliance.config import DetectorConfig  # noqa: E402
from appliance.detection.calibration import (  # noqa: E402
    CalibrationError,
    RigCalibration,
    apply_calibration,
    calibrate,
    noise_level,
    rig_reference,
)
from appliance.detection.detector import PARTIAL_BLUR, BlurDetector, is_judged, verdict_with_reading  # noqa: E402
from appliance.messages import BlurAssessment  # noqa: E402
from appliance.pixels import centre_crop  # noqa: E402
from appliance.spectral import WindowSpectra, window_spectra  # noqa: E402
from appliance.tile_io import read_tile  # noqa: E402
from bench.detector_eval import auroc, blur_params  # noqa: E402
from models.blur_synth import (  # noqa: E402
    DATA_DIR,
    FAMILIES,
    SPLITS,
    BlurParams,
    blur_with_noise,
)
from models.detector.loso import fold_model  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "em-corpus"
SIGMAS = (1.0, 1.5, 2.0, 3.0)
CALIBRATION_TILES = 5
SMALL_SOURCE = 12  # fewer tiles than this: cut into crops
MIN_CROP = 128
MAX_SIDE = 512
DRAWS = 5
LOG_MARGIN_FLOOR = 0.15  # mapping investigation, see rule_thresholds
SPREAD_FLOOR = 0.05
TARGET_RATE = 0.05
TARGET_AUROC = 0.99
TARGET_REL_ERR = 0.10
# Pixel sizes (nm) a source's PROVENANCE.md states, per tile-name prefix: what a tile header would carry. The
# rat SEM mixes four (its subjects were imaged 2015-2017 at 0.07-0.18 um); the other sources state one size or
# none, and their tiles are read as of one unknown pixel size.
PIXEL_SIZE_NM: dict[str, dict[str, float]] = {
    "axondeepseg_sem_rat_spinalcord": {
        "sub-rat1_": 180.0,
        "sub-rat2_": 93.0,
        "sub-rat3_": 100.0,
        "sub-rat4_": 100.0,
        "sub-rat5_": 130.0,
        "sub-rat6_": 130.0,
        "sub-rat7_": 70.0,
        "sub-rat8_": 70.0,
    },
}


@dataclass
class Source:
    """Sharp tiles of one source (name, pixels) and its real soft tiles; note says how they were cut."""

    name: str
    tiles: list[tuple[str, np.ndarray]]
    soft: list[tuple[str, np.ndarray]] = field(default_factory=list)
    note: str = ""


def grid_crops(tiles: list[tuple[str, np.ndarray]]) -> tuple[list[tuple[str, np.ndarray]], str]:
    """Cut a small source into k x k non-overlapping crops per tile (>= SMALL_SOURCE crops, sides >= 128)."""
    smallest = min(min(t.shape) for _, t in tiles)
    k = 2
    while len(tiles) * k * k < SMALL_SOURCE and smallest // (k + 1) >= MIN_CROP:
        k += 1
    if smallest // k < MIN_CROP:
        return tiles, f"{len(tiles)} tiles, too small to crop"
    out = []
    for name, tile in tiles:
        tile = centre_crop(tile, 2 * MAX_SIDE)
        ch, cw = tile.shape[0] // k, tile.shape[1] // k
        for r in range(k):
            for c in range(k):
                crop = tile[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw]
                out.append((f"{name}[r{r}c{c}]", np.ascontiguousarray(crop)))
    side = min(min(t.shape) for _, t in out)
    return out, f"{len(tiles)} tiles cut into {k}x{k} crops of >= {side} px ({len(out)} crops)"


_TELL_PIXEL_SIZES = [True]  # use_pixel_sizes sets it (a bench's --ignore-pixel-sizes)


def stated_pixel_size_nm(source: str, tile_name: str) -> float | None:
    """The pixel size PIXEL_SIZE_NM states for a tile of `source` (a crop keeps its tile's), or None."""
    for prefix, nm in PIXEL_SIZE_NM.get(source, {}).items():
        if tile_name.startswith(prefix):
            return nm
    return None


def tile_pixel_size_nm(source: str, tile_name: str) -> float | None:
    """The pixel size the appliance is told for a tile (its header's): the stated one, or None when ignored."""
    return stated_pixel_size_nm(source, tile_name) if _TELL_PIXEL_SIZES[0] else None


def add_pixel_size_option(parser: argparse.ArgumentParser) -> None:
    """--ignore-pixel-sizes, shared by the benches that calibrate on the corpus."""
    parser.add_argument(
        "--ignore-pixel-sizes",
        action="store_true",
        help="read every tile as of its source's one (unknown) pixel size, as these benches did before "
        "2026-11-27, instead of the sizes PIXEL_SIZE_NM states",
    )


def use_pixel_sizes(enabled: bool) -> None:
    """Whether tile_pixel_size_nm answers from PIXEL_SIZE_NM (a bench's --ignore-pixel-sizes: None for all)."""
    _TELL_PIXEL_SIZES[0] = enabled


def calibration_pixel_sizes(source: str, names: list[str]) -> list[float] | None:
    """The known-good tiles' pixel sizes for `calibrate`, or None unless every one is stated."""
    sizes = [tile_pixel_size_nm(source, n) for n in names]
    return None if any(s is None for s in sizes) else [s for s in sizes if s is not None]


def _read_folder(folder: Path) -> list[tuple[str, np.ndarray]]:
    files = sorted(p for p in folder.glob("*.png") if p.name != "contact.png")
    return [(p.name, read_tile(p)) for p in files]


def load_sources(corpus: Path) -> list[Source]:
    """Every em-corpus folder plus the isbi2012-train test split, cut as the module docstring says."""
    found = [
        (d.name, _read_folder(d), _read_folder(d / "soft") if (d / "soft").is_dir() else [])
        for d in sorted(p for p in corpus.iterdir() if p.is_dir())
    ]
    isbi = [(f"{i}.png", read_tile(DATA_DIR / f"{i}.png")) for i in SPLITS["test"]]
    found.append(("isbi2012-train_test", isbi, []))
    sources = []
    for name, tiles, soft in found:
        if len(tiles) < SMALL_SOURCE:
            tiles, note = grid_crops(tiles)
        else:
            tiles = [(n, centre_crop(t, MAX_SIDE)) for n, t in tiles]
            note = f"{len(tiles)} tiles, centre crop <= {MAX_SIDE} px"
        sources.append(Source(name, tiles, [(n, centre_crop(t, MAX_SIDE)) for n, t in soft], note))
    return sources


def blur_with_rig_noise(tile: np.ndarray, family: str, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Blur a sharp tile, then add Gaussian noise at the tile's own noise level; same dtype."""
    return render_with_rig_noise(tile, blur_params(family, sigma, rng), rng)


def render_with_rig_noise(tile: np.ndarray, params: BlurParams | None, rng: np.random.Generator) -> np.ndarray:
    """A sharp uint8/uint16 tile blurred by `params` (None: not blurred), plus Gaussian noise at the tile's
    own (Immerkaer) level, re-quantised to its dtype: the rig's noise on top of the tile's own."""
    return blur_with_noise(tile, params, noise_level(tile), rng)


@dataclass
class Rendered:
    """Assessments of one source: sharp[i], blurred[i][(family, sigma)] for sharp tile i, soft[j]; *_spectra:
    each rendered tile's window spectra, so that each calibration draw reads them against its own reference;
    spots: the pixels of the tiles the model calls partial blur beyond repair, by id() of their assessment (the
    detector reads the spot's spectrum against each draw's reference)."""

    sharp: list[BlurAssessment]
    blurred: list[dict[tuple[str, float], BlurAssessment]]
    soft: list[BlurAssessment]
    sharp_spectra: list[WindowSpectra | None]
    blurred_spectra: list[dict[tuple[str, float], WindowSpectra | None]]
    soft_spectra: list[WindowSpectra | None]
    spots: dict[int, np.ndarray]


def render_and_assess(source: Source, detector: BlurDetector, rng: np.random.Generator) -> Rendered:
    """Run the detector on the source's sharp tiles, their blurred copies and its soft tiles."""
    spots: dict[int, np.ndarray] = {}

    def judge(tiles: list[np.ndarray]) -> list[BlurAssessment]:
        verdicts = detector.assess(tiles)
        spots.update({id(v): t for v, t in zip(verdicts, tiles, strict=True) if v.reason.startswith(PARTIAL_BLUR)})
        return verdicts

    tiles = [t for _, t in source.tiles]
    sharp = judge(tiles)
    blurred, blurred_spectra = [], []
    for tile in tiles:
        keys = [(f, s) for f in FAMILIES for s in SIGMAS]
        batch = [blur_with_rig_noise(tile, f, s, rng) for f, s in keys]
        blurred.append(dict(zip(keys, judge(batch), strict=True)))
        blurred_spectra.append({k: window_spectra(t) for k, t in zip(keys, batch, strict=True)})
    soft_tiles = [t for _, t in source.soft]
    soft = judge(soft_tiles) if soft_tiles else []
    spectra = [window_spectra(t) for t in tiles]
    soft_spectra = [window_spectra(t) for t in soft_tiles]
    return Rendered(sharp, blurred, soft, spectra, blurred_spectra, soft_spectra, spots)


@dataclass(frozen=True)
class CalibratedJudge:
    """The runtime's calibrated verdicts for one calibration draw: each tile read against the draw's spectral
    reference (computed once here), then apply_calibration, as the ingest does with its replica's reading."""

    cal: RigCalibration
    cfg: DetectorConfig
    rendered: Rendered
    detector: BlurDetector

    def __call__(
        self, assessment: BlurAssessment, spectra: WindowSpectra | None, pixel_size_nm: float | None = None
    ) -> BlurAssessment:
        """For a partial-blur retake the detector reads the tile again, its spot included. pixel_size_nm: the
        tile's, as its header would carry it (the reference is rescaled to it, as the ingest does)."""
        reference = self.cal.spectral_arrays(pixel_size_nm)
        if reference is not None and is_judged(assessment):
            spot = self.rendered.spots.get(id(assessment))
            if spot is not None:
                (assessment,) = self.detector.assess([spot], spectral_references=[reference])
            else:
                assessment = verdict_with_reading(assessment, spectra, reference)
        return apply_calibration(assessment, rig_reference(self.cal, pixel_size_nm), self.cfg)


# ---------------------------------------------------------------------------------------------------
# Metrics


def raw_sigmas(rendered: Rendered, source: Source) -> dict:
    """Every uncalibrated tile sigma (px), for re-analysis: sharp by tile, blurred by family@sigma."""
    return {
        "sharp": {n: a.sigma_px for (n, _), a in zip(source.tiles, rendered.sharp, strict=True)},
        "blurred": {f"{f}@{s}": [d[(f, s)].sigma_px for d in rendered.blurred] for f in FAMILIES for s in SIGMAS},
        "soft": [a.sigma_px for a in rendered.soft],
    }


def _rel_errors(blurred: list[dict[tuple[str, float], BlurAssessment]], sigma_of) -> dict[str, float]:
    """Median |sigma_est - sigma_true| / sigma_true per family over sigma 1-3 px (blurred: per tile, by key)."""
    out = {}
    for family in FAMILIES:
        errs = [abs(sigma_of(d[(family, s)]) - s) / s for d in blurred for s in SIGMAS]
        out[family] = float(np.median(errs))
    return out


def score_labels(sharp: list[BlurAssessment], blurred: list[BlurAssessment]) -> dict[str, float]:
    """Error rates of labels: sharp called non-sharp, blurred called sharp."""
    return {
        "sharp_called_nonsharp": float(np.mean([a.label != "sharp" for a in sharp])),
        "blurred_called_sharp": float(np.mean([a.label == "sharp" for a in blurred])),
    }


def uncalibrated_metrics(rendered: Rendered) -> dict:
    blurred = [a for d in rendered.blurred for a in d.values()]
    raw = np.array([a.sigma_px for a in rendered.sharp])
    out = score_labels(rendered.sharp, blurred)
    out["auroc"] = auroc(raw, np.array([a.sigma_px for a in blurred]))
    out["auroc_by_sigma"] = {
        str(s): auroc(raw, np.array([d[(f, s)].sigma_px for d in rendered.blurred for f in FAMILIES])) for s in SIGMAS
    }
    out["sharp_sigma_median_px"] = float(np.median(raw))
    out["rel_err_1_3px"] = _rel_errors(rendered.blurred, lambda a: a.sigma_px)
    if rendered.soft:
        out["soft_called_sharp"] = float(np.mean([a.label == "sharp" for a in rendered.soft]))
    return out


def rule_thresholds(cal: RigCalibration, cfg: DetectorConfig) -> dict[str, float]:
    """Raw-sigma threshold (sharp iff sigma <= t) of each candidate mapping, from one calibration.

    quadrature_median (the runtime rule): sqrt(b^2 + sharp^2), b = median baseline.
    quadrature_upper_k: the same with b = exp(median log + k x spread) - 0.5 (the in-focus upper edge).
    log_margin_k: t = exp(median log + max(k x spread, floor)) - 0.5 (a margin in log-sigma).
    """
    logs = np.log(np.array([t.sigma_px for t in cal.tiles]) + 0.5)
    centre, spread = float(np.median(logs)), max(cal.spread_log_sigma, SPREAD_FLOOR)
    out = {"quadrature_median": math.hypot(cal.baseline_sigma_px, cfg.sharp_sigma_px)}
    for k in (1, 2):
        upper = math.exp(centre + k * spread) - 0.5
        out[f"quadrature_upper_{k}"] = math.hypot(upper, cfg.sharp_sigma_px)
    for k in (2, 3):
        out[f"log_margin_{k}"] = math.exp(centre + max(k * cal.spread_log_sigma, LOG_MARGIN_FLOOR)) - 0.5
    return out


def calibrated_draw(
    rendered: Rendered, source: Source, chosen: list[int], detector: BlurDetector, cfg: DetectorConfig
) -> dict:
    """Calibrate on the chosen tiles, evaluate on all the others."""
    names = [source.tiles[i][0] for i in chosen]
    try:
        cal = calibrate(
            [source.tiles[i][1] for i in chosen], names, detector, calibration_pixel_sizes(source.name, names)
        )
    except CalibrationError as exc:
        return {"calibration_tiles": names, "refused": str(exc)}
    rest = [i for i in range(len(source.tiles)) if i not in chosen]
    nm = [tile_pixel_size_nm(source.name, name) for name, _ in source.tiles]
    calibrated = CalibratedJudge(cal, cfg, rendered, detector)
    sharp = [calibrated(rendered.sharp[i], rendered.sharp_spectra[i], nm[i]) for i in rest]
    by_tile = []
    for i in rest:
        spectra = rendered.blurred_spectra[i]
        by_tile.append({k: calibrated(a, spectra[k], nm[i]) for k, a in rendered.blurred[i].items()})
    blurred = [a for d in by_tile for a in d.values()]
    out = score_labels(sharp, blurred)
    # The spectral reading is not a function of the model's sigma: the AUROC is that of what decides `sharp`.
    out["auroc"] = auroc(np.array([decision_px(a) for a in sharp]), np.array([decision_px(a) for a in blurred]))
    out["blurred_called_sharp_by_family"] = {
        f: float(np.mean([d[(f, s)].label == "sharp" for d in by_tile for s in SIGMAS])) for f in FAMILIES
    }
    out["blurred_called_sharp_by_sigma"] = _called_sharp_by_sigma(by_tile)
    out["sharp_sigma_median_px"] = float(np.median([a.sigma_px for a in sharp]))
    out["rel_err_1_3px"] = _rel_errors(by_tile, lambda a: a.sigma_px)
    # The rule before the spectral reference (quadrature from the model's baseline), on the same draw.
    quadrature = {i: replace(rig_reference(cal, nm[i]), spectral=False) for i in rest}
    quad_sharp = [apply_calibration(rendered.sharp[i], quadrature[i], cfg) for i in rest]
    quad_blurred = [apply_calibration(a, quadrature[i], cfg) for i in rest for a in rendered.blurred[i].values()]
    out["quadrature"] = {
        **score_labels(quad_sharp, quad_blurred),
        "rel_err_1_3px": _rel_errors(
            [{k: apply_calibration(a, quadrature[i], cfg) for k, a in rendered.blurred[i].items()} for i in rest],
            lambda a: a.sigma_px,
        ),
    }
    raw_sharp = np.array([rendered.sharp[i].sigma_px for i in rest])
    raw_blurred = np.array([a.sigma_px for i in rest for a in rendered.blurred[i].values()])
    out["rules"] = {
        rule: {
            "sharp_called_nonsharp": float(np.mean(raw_sharp > t)),
            "blurred_called_sharp": float(np.mean(raw_blurred <= t)),
        }
        for rule, t in rule_thresholds(cal, cfg).items()
    }
    if rendered.soft:
        out["soft_called_sharp"] = float(
            np.mean(
                [
                    calibrated(a, spectra, tile_pixel_size_nm(source.name, name)).label == "sharp"
                    for a, spectra, (name, _) in zip(rendered.soft, rendered.soft_spectra, source.soft, strict=True)
                ]
            )
        )
    out.update(
        spectral_reference=cal.spectral is not None,
        calibration_tiles=names,
        baseline_sigma_px=cal.baseline_sigma_px,
        spread_log_sigma=cal.spread_log_sigma,
        n_eval_sharp=len(rest),
    )
    return out


def _called_sharp_by_sigma(by_tile: list[dict[tuple[str, float], BlurAssessment]]) -> dict[str, dict[str, float]]:
    """Blurred tiles called sharp per sigma: the tilted family, and the three others together (a tilted tile's
    sigma is its largest, at one edge or corner; at 1 px four fifths of an edge ramp are below 0.8 px)."""
    groups = {"tilted": ("tilted",), "others": tuple(f for f in FAMILIES if f != "tilted")}
    return {
        g: {str(s): float(np.mean([d[(f, s)].label == "sharp" for d in by_tile for f in fams])) for s in SIGMAS}
        for g, fams in groups.items()
    }


def decision_px(verdict: BlurAssessment) -> float:
    """What makes a calibrated verdict non-sharp (apply_calibration): with a spectral reading the worst region's
    major axis (its sigma_px is the blur estimate), else its sigma."""
    if verdict.spectral_sigma_px is None or "in-focus spectrum" not in verdict.reason:
        return verdict.sigma_px
    return verdict.spectral_sigma_px


def calibration_draws(n: int, rng: np.random.Generator) -> list[list[int]]:
    """Up to DRAWS distinct random 5-tile subsets of n tiles (one when n leaves only 1-3 to evaluate)."""
    count = DRAWS if n - CALIBRATION_TILES >= 4 else 1
    draws: list[list[int]] = []
    for _ in range(50 * count):
        pick = sorted(int(i) for i in rng.choice(n, CALIBRATION_TILES, replace=False))
        if pick not in draws:
            draws.append(pick)
        if len(draws) == count:
            break
    return draws


def summarise(draws: list[dict]) -> dict:
    """Mean over the accepted draws; worst draw of each error rate next to it."""
    ok = [d for d in draws if "refused" not in d]
    if not ok:
        return {"accepted_draws": 0, "refused_draws": len(draws)}
    keys = ["sharp_called_nonsharp", "blurred_called_sharp", "auroc", "sharp_sigma_median_px"]
    out: dict = {k: float(np.mean([d[k] for d in ok])) for k in keys}
    out["worst_sharp_called_nonsharp"] = max(d["sharp_called_nonsharp"] for d in ok)
    out["worst_blurred_called_sharp"] = max(d["blurred_called_sharp"] for d in ok)
    out["rel_err_1_3px"] = {f: float(np.mean([d["rel_err_1_3px"][f] for d in ok])) for f in FAMILIES}
    out["blurred_called_sharp_by_family"] = {
        f: float(np.mean([d["blurred_called_sharp_by_family"][f] for d in ok])) for f in FAMILIES
    }
    out["blurred_called_sharp_by_sigma"] = {
        g: {s: float(np.mean([d["blurred_called_sharp_by_sigma"][g][s] for d in ok])) for s in rates}
        for g, rates in ok[0]["blurred_called_sharp_by_sigma"].items()
    }
    out["quadrature"] = {
        "sharp_called_nonsharp": float(np.mean([d["quadrature"]["sharp_called_nonsharp"] for d in ok])),
        "blurred_called_sharp": float(np.mean([d["quadrature"]["blurred_called_sharp"] for d in ok])),
        "rel_err_1_3px": {f: float(np.mean([d["quadrature"]["rel_err_1_3px"][f] for d in ok])) for f in FAMILIES},
    }
    out["rules"] = {
        rule: {k: float(np.mean([d["rules"][rule][k] for d in ok])) for k in rates}
        for rule, rates in ok[0]["rules"].items()
    }
    if "soft_called_sharp" in ok[0]:
        out["soft_called_sharp"] = float(np.mean([d["soft_called_sharp"] for d in ok]))
    out.update(accepted_draws=len(ok), refused_draws=len(draws) - len(ok))
    return out


def meets_targets(m: dict) -> bool:
    return (
        m.get("accepted_draws", 1) > 0
        and m["sharp_called_nonsharp"] <= TARGET_RATE
        and m["blurred_called_sharp"] <= TARGET_RATE
        and m["auroc"] >= TARGET_AUROC
    )


# ---------------------------------------------------------------------------------------------------
# Report


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, entry in result["sources"].items():
        u, c = entry["uncalibrated"], entry["calibrated"]
        if c.get("accepted_draws", 0) == 0:
            cal_cells = ["refused"] * 5 + ["0/" + str(c["refused_draws"])]
        else:
            cal_cells = [
                f"{_pct(c['sharp_called_nonsharp'])} ({_pct(c['worst_sharp_called_nonsharp'])})",
                f"{_pct(c['blurred_called_sharp'])} ({_pct(c['worst_blurred_called_sharp'])})",
                f"{c['auroc']:.3f}",
                f"{c['sharp_sigma_median_px']:.2f}",
                f"{100 * c['rel_err_1_3px']['gaussian']:.0f}%",
                f"{c['accepted_draws']}/{c['accepted_draws'] + c['refused_draws']}",
            ]
        rows.append(
            [
                name,
                str(entry["n_tiles"]),
                _pct(u["sharp_called_nonsharp"]),
                _pct(u["blurred_called_sharp"]),
                f"{u['auroc']:.3f}",
                f"{u['sharp_sigma_median_px']:.2f}",
                f"{100 * u['rel_err_1_3px']['gaussian']:.0f}%",
                *cal_cells,
                "yes" if entry["meets_targets"] else "no",
            ]
        )
    return rows


HEADER = [
    "source",
    "tiles",
    "uncal sharp->non-sharp",
    "uncal blurred->sharp",
    "uncal AUROC",
    "uncal sharp sigma",
    "uncal gauss err",
    "cal sharp->non-sharp (worst)",
    "cal blurred->sharp (worst)",
    "cal AUROC",
    "cal sharp sigma",
    "cal gauss err",
    "draws ok",
    "meets targets",
]


def markdown(result: dict) -> str:
    lines = [
        "# Blur detector per source: uncalibrated vs calibrated with 5 tiles of the source",
        "",
        f"Command: `{result['command']}`; model `{result['model_version']}`; runtime {result['runtime_s']:.0f} s "
        f"on {result['machine']}.",
        "Blurred = sigma 1, 1.5, 2, 3 px x {gaussian, disk, astigmatic, tilted}, rig-level noise. Calibrated: "
        "mean over the accepted 5-tile draws (worst draw in brackets), the 5 tiles left out of the evaluation. "
        "Targets: sharp->non-sharp <= 5 %, blurred->sharp <= 5 %, AUROC >= 0.99.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    lines += [
        "",
        "Median relative sigma error at sigma 1-3 px per family (uncalibrated -> calibrated):",
        "",
        "| source | " + " | ".join(FAMILIES) + " |",
        "|---|" + "---|" * len(FAMILIES),
    ]
    for name, entry in result["sources"].items():
        u, c = entry["uncalibrated"]["rel_err_1_3px"], entry["calibrated"].get("rel_err_1_3px")
        cells = [f"{100 * u[f]:.0f}% -> {100 * c[f]:.0f}%" if c else f"{100 * u[f]:.0f}% -> -" for f in FAMILIES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "AUROC of the model's tile sigma, sharp vs blurred, per blur strength (all families; uncalibrated, "
        "the model alone):",
        "",
        "| source | " + " | ".join(f"{s} px" for s in SIGMAS) + " |",
        "|---|" + "---|" * len(SIGMAS),
    ]
    for name, entry in result["sources"].items():
        by = entry["uncalibrated"]["auroc_by_sigma"]
        lines.append(f"| {name} | " + " | ".join(f"{by[str(s)]:.3f}" for s in SIGMAS) + " |")
    lines += [
        "",
        "Calibrated blurred->sharp per family (sigma 1-3 px), and the previous rule (quadrature from the model's "
        "baseline) on the same draws: sharp->non-sharp / blurred->sharp / Gaussian error:",
        "",
        "| source | " + " | ".join(FAMILIES) + " | quadrature |",
        "|---|" + "---|" * (len(FAMILIES) + 1),
    ]
    for name, entry in result["sources"].items():
        c = entry["calibrated"]
        if not c.get("accepted_draws"):
            lines.append(f"| {name} | " + " | ".join(["refused"] * (len(FAMILIES) + 1)) + " |")
            continue
        q = c["quadrature"]
        rates = (q["sharp_called_nonsharp"], q["blurred_called_sharp"], q["rel_err_1_3px"]["gaussian"])
        quad = " / ".join(_pct(v) for v in rates)
        fams = [_pct(c["blurred_called_sharp_by_family"][f]) for f in FAMILIES]
        lines.append(f"| {name} | " + " | ".join(fams) + f" | {quad} |")
    lines += [
        "",
        "Calibrated blurred->sharp per sigma: tilted (its largest sigma) / the three other families together:",
        "",
        "| source | " + " | ".join(f"{s} px" for s in SIGMAS) + " |",
        "|---|" + "---|" * len(SIGMAS),
    ]
    for name, entry in result["sources"].items():
        by = entry["calibrated"].get("blurred_called_sharp_by_sigma")
        cells = [f"{_pct(by['tilted'][str(s)])} / {_pct(by['others'][str(s)])}" if by else "refused" for s in SIGMAS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rules = [n for n, e in result["sources"].items() if e["calibrated"].get("rules")]
    if rules:
        names = list(result["sources"][rules[0]]["calibrated"]["rules"])
        lines += [
            "",
            "Mapping investigation (same draws): sharp->non-sharp / blurred->sharp per candidate rule "
            "(`rule_thresholds`):",
            "",
            "| source | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for name in rules:
            r = result["sources"][name]["calibrated"]["rules"]
            cells = [f"{_pct(r[k]['sharp_called_nonsharp'])} / {_pct(r[k]['blurred_called_sharp'])}" for k in names]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        means = [np.mean([sum(result["sources"][n]["calibrated"]["rules"][k].values()) for n in rules]) for k in names]
        lines.append("| mean sum of both rates | " + " | ".join(_pct(m) for m in means) + " |")
    soft = {n: e for n, e in result["sources"].items() if "soft_called_sharp" in e["uncalibrated"]}
    if soft:
        lines += ["", "Real soft tiles (`soft/`, kept out of the sharp set): share called sharp", ""]
        for name, e in soft.items():
            cal = e["calibrated"].get("soft_called_sharp")
            cal_text = _pct(cal) if cal is not None else "-"
            lines.append(
                f"- {name}: {e['n_soft']} tiles, uncalibrated {_pct(e['uncalibrated']['soft_called_sharp'])}, "
                f"calibrated {cal_text}"
            )
    lines += ["", "How each source was cut:", ""]
    lines += [f"- {n}: {e['note']}" for n, e in result["sources"].items()]
    refusals = [(n, d) for n, e in result["sources"].items() for d in e["draws"] if "refused" in d]
    if refusals:
        lines += ["", "Calibrations refused by `calibrate` (the tiles it was given, and why):", ""]
        lines += [f"- {n}: {d['refused']}" for n, d in refusals]
    return "\n".join(lines) + "\n"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print `rows` under `header`, each column padded to its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def report(result: dict, header: list[str], rows: list[list[str]], markdown_text: str, out: Path) -> None:
    """Print the table, write the JSON result to `out` and its markdown beside it (.md)."""
    print()
    print_table(header, rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown_text)
    print(f"\nwrote {out} and {out.with_suffix('.md')} ({result['runtime_s']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "detector_sources.json")
    parser.add_argument("--seed", type=int, default=20261126)
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model", type=Path, help="ONNX detector to test (default: the bundled one)")
    models.add_argument(
        "--loso",
        type=Path,
        help="leave-one-source-out: test each source with <LOSO>/<source>/weights/ "
        "(models/detector/loso.py), the fold that never saw it",
    )
    add_pixel_size_option(parser)
    args = parser.parse_args()
    use_pixel_sizes(not args.ignore_pixel_sizes)
    start = time.monotonic()
    cfg = DetectorConfig(model_path=args.model)
    rng = np.random.default_rng(args.seed)
    sources = {}
    versions = {}
    for source in load_sources(args.corpus):
        t0 = time.monotonic()
        if args.loso is not None:
            path = fold_model(args.loso, source.name)
            if not path.is_file():
                raise SystemExit(f"{path}: no fold model for {source.name}; run python -m models.detector.loso")
            cfg = DetectorConfig(model_path=path)
        detector = BlurDetector.from_config(cfg)
        versions[source.name] = detector.model_version
        rendered = render_and_assess(source, detector, rng)
        draws = [
            calibrated_draw(rendered, source, pick, detector, cfg) for pick in calibration_draws(len(source.tiles), rng)
        ]
        entry = {
            "n_tiles": len(source.tiles),
            "n_soft": len(source.soft),
            "note": source.note,
            "uncalibrated": uncalibrated_metrics(rendered),
            "calibrated": summarise(draws),
            "draws": draws,
            "raw_sigma_px": raw_sigmas(rendered, source),
        }
        entry["meets_targets"] = (
            meets_targets(entry["calibrated"]) if entry["calibrated"].get("accepted_draws") else False
        )
        sources[source.name] = entry
        print(f"{source.name}: {source.note}; {time.monotonic() - t0:.0f} s", flush=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "pixel_sizes": "ignored" if args.ignore_pixel_sizes else "as PIXEL_SIZE_NM states (rat SEM)",
        "model_version": f"leave-one-source-out folds in {args.loso}" if args.loso else detector.model_version,
        "model_versions": versions,
        "config": cfg.model_dump(mode="json"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs (shared)",
        "sigmas_px": SIGMAS,
        "families": FAMILIES,
        "draws_per_source": DRAWS,
        "rule_floors": {"log_margin": LOG_MARGIN_FLOOR, "spread": SPREAD_FLOOR},
        "sources": sources,
        "runtime_s": time.monotonic() - start,
    }
    report(result, HEADER, table_rows(result), markdown(result), args.out)


if __name__ == "__main__":
    main()
