"""Where the blur detector looks: native-resolution patches on a sheared lattice over the tile.

Patches are never downscaled (focus lives in the finest detail). PATCH is the patch contract shared with
the learned model: its sidecar records the size it was trained on and the runtime refuses any other.

The lattice has `rows` rows of `per_row` patches; each row is shifted along x by a different fraction of
the patch spacing (bit-reversed order), so the patch centres fall on `rows` distinct column lines as well
as `rows` row lines. Any full-width or full-height strip taller/wider than a patch plus the line spacing
therefore holds a whole row (or column) of patches, which a plain grid of one patch per cell cannot
promise (a 150 px strip of a 2400 px tile fell between its rows). Each patch belongs to the cell of the
GRID x GRID region map its centre lies in; with the default 32 x 4 every cell holds two patches.
"""

from __future__ import annotations

import numpy as np

GRID = 8  # region map is GRID x GRID cells
PATCH = 64  # px, native resolution


def _bit_reversed(n: int) -> list[int]:
    """0..n-1 (n a power of two) in bit-reversed order: consecutive entries spread evenly over 0..n-1."""
    bits = max(n.bit_length() - 1, 0)
    return [int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(n)]


def patch_lattice(shape: tuple[int, int], rows: int, per_row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-left corners (ys, xs) of the patches of a tile of `shape` (px) and each patch's cell index.

    rows must be a multiple of per_row with rows / per_row a power of two (DetectorConfig checks it);
    tiles smaller than PATCH are padded to PATCH first, patches of small tiles overlap.
    """
    h, w = max(shape[0], PATCH), max(shape[1], PATCH)
    shifts = _bit_reversed(rows // per_row)
    row = np.repeat(np.arange(rows), per_row)
    slot = np.array([shifts[r % len(shifts)] + m * len(shifts) for r in range(rows) for m in range(per_row)])
    cy, cx = (row + 0.5) * h / rows, (slot + 0.5) * w / rows
    ys = np.clip(np.round(cy - PATCH / 2).astype(int), 0, h - PATCH)
    xs = np.clip(np.round(cx - PATCH / 2).astype(int), 0, w - PATCH)
    cells = np.minimum((cy * GRID / h).astype(int), GRID - 1) * GRID + np.minimum((cx * GRID / w).astype(int), GRID - 1)
    return ys, xs, cells


def extract_patches(tile: np.ndarray, rows: int, per_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the patch lattice out of a uint8/uint16 tile: float32 (N, PATCH, PATCH) in [0, 1], cells (N,)."""
    scale = 1.0 / float(np.iinfo(tile.dtype).max)
    if tile.shape[0] < PATCH or tile.shape[1] < PATCH:
        pad_y, pad_x = max(PATCH - tile.shape[0], 0), max(PATCH - tile.shape[1], 0)
        tile = np.pad(tile, ((0, pad_y), (0, pad_x)), mode="reflect")
    ys, xs, cells = patch_lattice(tile.shape, rows, per_row)
    # Index a view of every PATCH x PATCH window by its corner: one block copy per patch (~7x faster on a
    # 2400 x 2400 tile than gathering each pixel by a broadcast index).
    patches = np.lib.stride_tricks.sliding_window_view(tile, (PATCH, PATCH))[ys, xs]
    return patches.astype(np.float32) * np.float32(scale), cells
