"""Where the blur detector looks: a GRID x GRID grid of cells over the tile, native-resolution patches in each.

Patches are never downscaled (focus lives in the finest detail). PATCH is the patch contract shared with
the learned model: its sidecar records the size it was trained on and the runtime refuses any other.
"""

from __future__ import annotations

import numpy as np

GRID = 8  # region map is GRID x GRID cells
PATCH = 64  # px, native resolution


def patch_grid(shape: tuple[int, int], per_cell: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-left corners (ys, xs) of the patches of a tile of `shape` and each patch's cell index.

    Each of the GRID x GRID cells gets per_cell x per_cell patches spread evenly inside it; tiles
    smaller than GRID * PATCH get overlapping patches (the tile is padded to at least PATCH first).
    """
    h, w = max(shape[0], PATCH), max(shape[1], PATCH)
    ys, xs, cells = [], [], []
    for r in range(GRID):
        for c in range(GRID):
            for i in range(per_cell):
                for j in range(per_cell):
                    cy = (r + (i + 0.5) / per_cell) * h / GRID
                    cx = (c + (j + 0.5) / per_cell) * w / GRID
                    ys.append(min(max(int(round(cy - PATCH / 2)), 0), h - PATCH))
                    xs.append(min(max(int(round(cx - PATCH / 2)), 0), w - PATCH))
                    cells.append(r * GRID + c)
    return np.array(ys), np.array(xs), np.array(cells)


def extract_patches(tile: np.ndarray, per_cell: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Cut the patch grid out of a uint8/uint16 tile: float32 (N, PATCH, PATCH) in [0, 1], cells (N,)."""
    scale = 1.0 / float(np.iinfo(tile.dtype).max)
    if tile.shape[0] < PATCH or tile.shape[1] < PATCH:
        pad_y, pad_x = max(PATCH - tile.shape[0], 0), max(PATCH - tile.shape[1], 0)
        tile = np.pad(tile, ((0, pad_y), (0, pad_x)), mode="reflect")
    ys, xs, cells = patch_grid(tile.shape, per_cell)
    offs = np.arange(PATCH)
    patches = tile[ys[:, None, None] + offs[None, :, None], xs[:, None, None] + offs[None, None, :]]
    return patches.astype(np.float32) * np.float32(scale), cells
