"""Localized blur: the blurriest small window of the tile, read from the patches in it, not from cell means.

A spot or strip blurred beyond repair on 1/16 of a tile must make it `retake` wherever it lies. Cell
means cannot see it: a spot off the cell grid splits over 3x3 cells, and a 150 px strip of a 2400 px tile
covers half a cell row. So windows of `window_share` of the tile (half the region share by default), in
several shapes (square, 1:4 and 4:1 bands, strips as thick as a region strip), slide over the tile one
lattice spacing at a time; each window's reading is the reliability-weighted log-mean sigma of the
patches lying wholly inside it (a connected cluster of patches). Windows narrower than a patch are
skipped (small tiles). Membership depends only on the tile shape and the lattice, so it is built once per
shape (a windows x patches matrix) and every tile costs two small matrix products.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from appliance.detection.patches import GRID, PATCH, patch_lattice


def _window_sizes(share: float, window_share: float) -> list[tuple[float, float, str]]:
    """(height, width) as fractions of the tile's sides, and a name, of every window shape read.

    Windows cover window_share of the tile (less than the region share, so several fit inside a region of
    `share` wherever it lies and the worst of them is read as the tile's worst region is); strips keep the
    region's full thickness (share of the side) and are window_share / share long.
    """
    side, thin = math.sqrt(window_share), math.sqrt(window_share / 4.0)
    return [
        (side, side, "spot"),
        (thin, 4.0 * thin, "band"),
        (4.0 * thin, thin, "band"),
        (share, window_share / share, "horizontal strip"),
        (window_share / share, share, "vertical strip"),
    ]


@dataclass(frozen=True)
class LocalBlur:
    """The blurriest trusted window: its log-mean sigma (px), shape, and the cell of its blurriest patch."""

    sigma_px: float
    shape: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class _Windows:
    members: np.ndarray  # (W, N) float64 0/1: patch n lies wholly inside window w
    shapes: tuple[str, ...]  # (W,)


def _starts(side: int, window: int, step: float) -> np.ndarray:
    """Window origins along one axis: every `step` px, the last one flush with the far edge."""
    last = side - window
    return np.unique(np.append(np.arange(0.0, last, step), last).round().astype(int))


@functools.lru_cache(maxsize=8)
def _windows(shape: tuple[int, int], rows: int, per_row: int, share: float, window_share: float) -> _Windows:
    """Every window of `share` of a tile of `shape`, and which lattice patches lie wholly inside each."""
    h, w = max(shape[0], PATCH), max(shape[1], PATCH)
    ys, xs, _ = patch_lattice((h, w), rows, per_row)
    step_y, step_x = h / rows, w / rows
    masks, names = [], []
    for frac_h, frac_w, name in _window_sizes(share, window_share):
        win_h, win_w = round(h * min(frac_h, 1.0)), round(w * min(frac_w, 1.0))
        if win_h < PATCH or win_w < PATCH:
            continue
        for y0 in _starts(h, win_h, step_y):
            inside_y = (ys >= y0) & (ys + PATCH <= y0 + win_h)
            for x0 in _starts(w, win_w, step_x):
                masks.append(inside_y & (xs >= x0) & (xs + PATCH <= x0 + win_w))
                names.append(name)
    if not masks:
        return _Windows(np.zeros((0, len(ys))), ())
    return _Windows(np.array(masks, dtype=np.float64), tuple(names))


def worst_window(
    logs: np.ndarray,
    weight: np.ndarray,
    cells: np.ndarray,
    tile_shape: tuple[int, int],
    lattice: tuple[int, int],
    share: float,
    window_share: float,
    min_weight: float,
    log_offset_px: float,
) -> LocalBlur | None:
    """The blurriest window holding at least min_weight of reliability, or None when no window qualifies.

    logs: log(sigma + log_offset_px) per patch (N,); weight: reliability per patch, tissue applied (N,);
    cells: each patch's cell index (N,) on the GRID x GRID map; lattice: (rows, per_row) of the patches;
    share: the region share to be caught (strip thickness); window_share: the share each window covers.
    """

    windows = _windows(tile_shape, *lattice, share, window_share)
    if not windows.shapes:
        return None
    win_w = windows.members @ weight
    trusted = win_w >= min_weight
    if not trusted.any():
        return None
    log_mean = np.where(trusted, (windows.members @ (weight * logs)) / np.maximum(win_w, 1e-300), -np.inf)
    best = int(np.argmax(log_mean))
    inside = (windows.members[best] > 0) & (weight > 0)
    blurriest = int(np.flatnonzero(inside)[np.argmax(logs[inside])])
    cell = int(cells[blurriest])
    sigma = max(math.exp(float(log_mean[best])) - log_offset_px, 0.0)
    return LocalBlur(sigma_px=sigma, shape=windows.shapes[best], cell=(cell // GRID, cell % GRID))
