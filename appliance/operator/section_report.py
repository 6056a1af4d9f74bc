"""A section's QC report: one self-contained HTML file (figures embedded as base64 PNG, no scripts)."""

from __future__ import annotations

import base64
import html
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from appliance.operator.report_figures import (
    Thresholds,
    figure_png,
    focus_map_figure,
    sigma_histogram_figure,
    timeline_figure,
)
from appliance.operator.section_qc import TileQc

REPORT_FILENAME = "report.html"
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0 1.5em;max-width:100%}td.text{overflow-wrap:anywhere}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f0f0f0;text-align:left}td.text{text-align:left}figure{margin:0 0 1.5em}img{max-width:100%}
.summary td:first-child{text-align:left}
"""


def _png_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(header: list[str], rows: list[list[str]], text_columns: frozenset[int] = frozenset()) -> str:
    """HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="text">{c}</td>' if i in text_columns else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _sigma_stats(tiles: list[TileQc]) -> tuple[str, str]:
    sigmas = sorted(t.sigma_px for t in tiles if t.sigma_px is not None)
    if not sigmas:
        return "n/a", "n/a"
    p95 = sigmas[min(len(sigmas) - 1, round(0.95 * (len(sigmas) - 1)))]
    return f"{statistics.median(sigmas):.2f}", f"{p95:.2f}"


def _last_baseline(tiles: list[TileQc]) -> str:
    """The in-focus baseline (px) the beam's last calibrated tile was judged against: "n/a" uncalibrated."""
    baselines = [t.baseline_sigma_px for t in sorted(tiles, key=lambda t: t.seq) if t.baseline_sigma_px is not None]
    return f"{baselines[-1]:.2f}" if baselines else "n/a"


def beam_rows(tiles: list[TileQc]) -> list[list[str]]:
    """Per beam: tiles, median and p95 sigma (px), sharp/soft/retake/failed counts, retake share, and the
    in-focus baseline (px) its last tile was judged against (the beam's own when it has one, docs/calibration.md)."""
    beams = sorted({t.beam for t in tiles}, key=lambda b: (b is None, b or 0))
    rows = []
    for beam in beams:
        own = [t for t in tiles if t.beam == beam]
        labels = Counter("failed" if t.action == "failed" else t.label for t in own)
        median, p95 = _sigma_stats(own)
        rows.append(
            [
                "none" if beam is None else str(beam),
                str(len(own)),
                median,
                p95,
                *(str(labels[k]) for k in ("sharp", "soft", "retake", "failed")),
                f"{100.0 * labels['retake'] / len(own):.1f} %",
                _last_baseline(own),
            ]
        )
    return rows


def _link(tile: TileQc, output_dir: Path, report_dir: Path) -> str:
    target = os.path.relpath(output_dir / tile.path, report_dir)
    return f'<a href="{quote(target)}">{html.escape(tile.path)}</a>'


def retake_rows(tiles: list[TileQc], output_dir: Path, report_dir: Path) -> list[list[str]]:
    """Tiles flagged for retake or failed, in acquisition order, with reasons and links to the files."""
    flagged = [t for t in tiles if t.action in ("flagged", "failed")]
    return [
        [
            str(t.seq),
            html.escape(t.tile_id),
            "none" if t.beam is None else str(t.beam),
            f"{t.stage_x_um:.1f}, {t.stage_y_um:.1f}",
            "n/a" if t.sigma_px is None else f"{t.sigma_px:.2f}",
            html.escape(t.reason or t.action),
            _link(t, output_dir, report_dir),
        ]
        for t in sorted(flagged, key=lambda t: t.seq)
    ]


def _summary_rows(section: str, tiles: list[TileQc]) -> list[list[str]]:
    actions = Counter(t.action for t in tiles)
    labels = Counter(t.label for t in tiles)
    span_s = max(t.t_done for t in tiles) - min(t.t_acquired for t in tiles)
    versions = sorted({v for t in tiles for v in (t.detector_version, t.deblur_version) if v})
    rows = [
        ("section", html.escape(section)),
        ("tiles", str(len(tiles))),
        ("sharp (written as acquired)", str(labels["sharp"])),
        ("soft (restored, original kept)", str(actions["restored"])),
        ("retake (flagged to the controller)", str(actions["flagged"])),
        ("empty (no tissue, or not judgeable and flagged)", str(sum(t.empty for t in tiles))),
        ("failed (written as acquired)", str(actions["failed"])),
        ("first acquired … last durable", f"{span_s:.1f} s ({len(tiles) / span_s if span_s > 0 else 0:.1f} tiles/s)"),
        ("models", html.escape(", ".join(versions)) or "n/a"),
    ]
    return [[k, v] for k, v in rows]


def render_section_report(
    section: str, tiles: list[TileQc], output_dir: Path, report_dir: Path, thresholds: Thresholds
) -> str:
    """The report of one section as an HTML string; links to tile files are relative to `report_dir`."""
    if not tiles:
        raise ValueError(f"section {section!r} has no tiles in the QC record")
    figures = {
        "focus-map": (focus_map_figure(tiles, thresholds), "focus map"),
        "sigma-histogram": (sigma_histogram_figure(tiles, thresholds), "blur sigma histogram"),
        "timeline": (timeline_figure(tiles, thresholds), "blur sigma and throughput over time"),
    }
    images = {key: _png_tag(figure_png(figure), alt) for key, (figure, alt) in figures.items()}
    retakes = retake_rows(tiles, output_dir, report_dir)
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    beam_header = [
        "beam",
        "tiles",
        "median σ (px)",
        "p95 σ (px)",
        "sharp",
        "soft",
        "retake",
        "failed",
        "retake share",
        "baseline σ (px)",
    ]
    retake_header = ["seq", "tile", "beam", "stage x, y (µm)", "σ (px)", "reason", "file"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>QC report: section {html.escape(section)}</title>
<style>{STYLE}</style></head><body>
<h1>QC report: section {html.escape(section)}</h1>
<p>Generated {html.escape(generated)} from the appliance's QC record. Blur σ is the detector's
Gaussian-equivalent PSF sigma in pixels: sharp ≤ {thresholds.sharp_sigma_px:g} px, restored up to
{thresholds.max_restorable_sigma_px:g} px, retake beyond.</p>
<table class="summary">{"".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in _summary_rows(section, tiles))}</table>
<h2>Focus map</h2>
<figure id="focus-map" data-tiles="{len(tiles)}">{images["focus-map"]}
<figcaption>{len(tiles)} tiles at their stage positions, coloured by blur σ (grey: no estimate).
× retake, ○ restored, □ empty (too little structure), ◆ failed.</figcaption></figure>
<h2>Blur σ histogram</h2>
<figure id="sigma-histogram">{images["sigma-histogram"]}</figure>
<h2>Per beam</h2>
{_table(beam_header, beam_rows(tiles))}
<h2>Timeline</h2>
<figure id="timeline">{images["timeline"]}</figure>
<h2 id="retakes">Retakes and failures ({len(retakes)})</h2>
{_table(retake_header, retakes, text_columns=frozenset({1, 5, 6})) if retakes else "<p>None.</p>"}
</body></html>
"""


def write_section_report(
    section: str, tiles: list[TileQc], output_dir: Path, out_path: Path, thresholds: Thresholds
) -> Path:
    """Render and write the report atomically (a reader never sees half a file); returns `out_path`."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    page = render_section_report(section, tiles, output_dir, out_path.parent, thresholds)
    partial = out_path.with_name(f".{out_path.name}.part")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, out_path)
    return out_path
