"""The section report's figures (matplotlib, no pyplot state): focus map, sigma histogram, timeline.

Colour maps are cividis (colour-blind safe, monotone in lightness); marks that matter (retake,
restored, empty) are shapes, not colours alone.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from appliance.operator.section_qc import TileQc

CMAP = "cividis"
NO_SIGMA_COLOUR = "#bdbdbd"


@dataclass(frozen=True)
class Thresholds:
    """Label boundaries of the detector (px): sharp up to `sharp_sigma_px`, restored up to the other."""

    sharp_sigma_px: float = 0.8
    max_restorable_sigma_px: float = 3.0

    @property
    def sigma_max_px(self) -> float:
        """Top of every colour scale and histogram: one fixed scale, so sections compare at a glance."""
        return 2.0 * self.max_restorable_sigma_px


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def tile_polygons(tiles: list[TileQc]) -> np.ndarray:
    """Corners (N, 4, 2) in µm of each tile's footprint, centred on its stage position."""
    centre = np.array([[t.stage_x_um, t.stage_y_um] for t in tiles], dtype=float).reshape(-1, 1, 2)
    half = np.array([[t.width_um / 2, t.height_um / 2] for t in tiles], dtype=float).reshape(-1, 1, 2)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float).reshape(1, 4, 2)
    return centre + corners * half


def focus_map_figure(tiles: list[TileQc], thresholds: Thresholds) -> Figure:
    """Every tile at its stage position, filled by blur sigma; retake, restored and empty tiles marked."""
    figure = Figure(figsize=(8.0, 6.5))
    axes = figure.add_subplot()
    norm = Normalize(0.0, thresholds.sigma_max_px)
    sigmas = np.array([np.nan if t.sigma_px is None else t.sigma_px for t in tiles], dtype=float)
    cmap = colormaps[CMAP].with_extremes(bad=NO_SIGMA_COLOUR)
    tiles_drawn = PolyCollection(
        tile_polygons(tiles),  # type: ignore[arg-type]  # matplotlib stub: an (N, 4, 2) array is N polygons
        array=np.ma.masked_invalid(sigmas),
        cmap=cmap,
        norm=norm,
        edgecolors="face",
        linewidths=0.2,
    )
    tiles_drawn.set_gid("tiles")
    axes.add_collection(tiles_drawn)
    colorbar = figure.colorbar(tiles_drawn, ax=axes, extend="max", shrink=0.8)
    colorbar.set_label("estimated blur σ (px)")
    for level in (thresholds.sharp_sigma_px, thresholds.max_restorable_sigma_px):
        colorbar.ax.axhline(level, color="white", linewidth=1.2)
    marker_size = float(np.clip(3000.0 / max(len(tiles), 1), 4.0, 60.0))
    marks: tuple[tuple[str, Callable[[TileQc], bool], dict[str, Any]], ...] = (
        ("retake", lambda t: t.action == "flagged" and not t.empty, dict(marker="x", color="#d62728")),
        ("restored", lambda t: t.action == "restored", dict(marker="o", facecolors="none", edgecolors="white")),
        (
            "empty (no tissue / not judgeable)",
            lambda t: t.empty,
            dict(marker="s", facecolors="none", edgecolors="#ff7f0e"),
        ),
        ("failed", lambda t: t.action == "failed", dict(marker="D", color="black")),
    )
    handles: list[PathCollection] = []
    for name, chosen, style in marks:
        picked = [t for t in tiles if chosen(t)]
        if picked:
            handles.append(
                axes.scatter(
                    [t.stage_x_um for t in picked],
                    [t.stage_y_um for t in picked],
                    s=marker_size,
                    linewidths=1.2,
                    label=name,
                    **style,
                )
            )
    axes.autoscale_view()
    axes.set_aspect("equal")
    axes.set_xlabel("stage x (µm)")
    axes.set_ylabel("stage y (µm)")
    axes.set_title(f"focus map: {len(tiles)} tiles at their stage positions")
    if handles:
        axes.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(0.0, -0.12),
            ncols=len(handles),
            facecolor="#444444",
            labelcolor="white",
        )
    axes.set_facecolor("#444444")  # light marks (restored) and the cividis range both read on dark grey
    return figure


def sigma_histogram_figure(tiles: list[TileQc], thresholds: Thresholds) -> Figure:
    """Histogram of blur sigma with the sharp and restorable limits drawn in."""
    figure = Figure(figsize=(6.0, 3.2))
    axes = figure.add_subplot()
    sigmas = np.array([t.sigma_px for t in tiles if t.sigma_px is not None], dtype=float)
    top = thresholds.sigma_max_px
    bins = np.linspace(0.0, top, 41)
    axes.hist(np.clip(sigmas, 0.0, top), bins=bins, color="#3b528b")  # type: ignore[arg-type]  # stub: edges as an array
    for level, name in ((thresholds.sharp_sigma_px, "sharp ≤"), (thresholds.max_restorable_sigma_px, "restorable ≤")):
        axes.axvline(level, color="#d62728", linestyle="--", linewidth=1)
        axes.annotate(
            f"{name} {level:g} px",
            (level, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            ha="right",
            va="top",
            fontsize=8,
        )
    axes.set_xlabel(f"estimated blur σ (px; ≥ {top:g} counted in the last bin)")
    axes.set_ylabel("tiles")
    return figure


def timeline_figure(tiles: list[TileQc], thresholds: Thresholds) -> Figure:
    """Blur sigma per tile over acquisition time (with a running median), and throughput over time."""
    figure = Figure(figsize=(8.0, 4.8))
    top, bottom = figure.subplots(2, 1, sharex=True)
    t0 = min((t.t_acquired for t in tiles), default=0.0)
    acquired = np.array([t.t_acquired - t0 for t in tiles if t.sigma_px is not None], dtype=float)
    sigmas = np.array([t.sigma_px for t in tiles if t.sigma_px is not None], dtype=float)
    done = np.array([t.t_done - t0 for t in tiles], dtype=float)
    scale, unit = (60.0, "min") if max(done.max(initial=0.0), acquired.max(initial=0.0)) > 300 else (1.0, "s")
    order = np.argsort(acquired)
    top.scatter(acquired[order] / scale, sigmas[order], s=4, color="#3b528b", label="tile")
    if sigmas.size:
        window = max(1, min(51, sigmas.size // 5))
        median = [np.median(sigmas[order][max(0, i - window // 2) : i + window // 2 + 1]) for i in range(sigmas.size)]
        top.plot(acquired[order] / scale, median, color="#fde725", linewidth=2, label=f"running median ({window})")
    top.axhline(
        thresholds.max_restorable_sigma_px, color="#d62728", linestyle="--", linewidth=1, label="restorable limit"
    )
    top.set_ylabel("blur σ (px)")
    top.legend(loc="upper right", fontsize=8)
    span = float(done.max(initial=0.0))
    width = max(span / 40.0, 1.0)
    edges = np.arange(0.0, span + width, width)
    counts, _ = np.histogram(done, bins=edges)
    bottom.bar(edges[:-1] / scale, counts / width, width=width / scale, align="edge", color="#21918c")
    bottom.set_ylabel("throughput (tiles/s)")
    bottom.set_xlabel(f"time since the first tile was acquired ({unit})")
    return figure
