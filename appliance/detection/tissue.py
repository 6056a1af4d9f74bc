"""Is there tissue to judge? Per cell of the detector's grid, coarse structure measured against the noise.

Focus is judged from fine detail, but whether a region holds tissue at all is a coarse question: tissue,
even blurred far beyond repair, still varies at the scale of organelles and cells; bare resin, the area
beyond a section's edge or a blank field varies only by noise and smooth shading (charging, detector
gain). So each cell of the GRID x GRID map is cut into BLOCKS x BLOCKS block means, a plane is fitted to
them (shading removed), and the residual's spread is compared with what noise alone leaves in a block
mean (noise sigma / sqrt(block area)). A cell holds tissue when the ratio exceeds TISSUE_RATIO.

The tile is `empty` when fewer than MIN_TISSUE_CELLS cells hold tissue; otherwise only its tissue cells
are judged. Measured (models/detector/MODEL_CARD.md, "No tissue"): cells of resin with white noise read
0.7-1.2; whole real images of all seven em-corpus sources 2.9-38 (median per image; n2v's very noisy
16-bit SEM is the lowest, 56 of 64 cells above 2); ISBI tissue blurred at sigma 16 px 2.5 (median).
Limit: the noise model is white. Resin whose noise is correlated over >= 1 px reads as tissue (and is
judged for focus as before this rule existed), because the per-pixel noise estimate misses the noise's
low-frequency part.
"""

from __future__ import annotations

import cv2
import numpy as np

from appliance.detection.patches import GRID

BLOCKS = 8  # block means per cell side
TISSUE_RATIO = 2.0  # coarse residual spread / noise of a block mean above which a cell holds tissue
MIN_TISSUE_CELLS = 4  # of GRID * GRID: fewer -> no tissue to judge (1/16 of the tile)

_SIDE = GRID * BLOCKS
_YY, _XX = np.mgrid[:BLOCKS, :BLOCKS].reshape(2, -1).astype(np.float64)
_PLANE = np.stack([np.ones_like(_YY), _YY, _XX], axis=1)  # (BLOCKS^2, 3)
# Residual after a least-squares plane fit: r = (I - A A+) v.
_RESIDUAL = np.eye(BLOCKS * BLOCKS) - _PLANE @ np.linalg.pinv(_PLANE)


def tissue_ratio(tile: np.ndarray, noise_sigma: float) -> np.ndarray:
    """Per cell (GRID, GRID): spread of plane-removed block means over the noise of one block mean.

    tile: 2-D uint8/uint16; noise_sigma: the tile's noise std in units of full scale (0-1), e.g. the
    median of appliance.noise.patch_noise_sigma over its patches.
    """
    height, width = tile.shape
    # Whole blocks only: an integer scale keeps INTER_AREA fast (~6 ms for 2400 x 2400 on one core).
    block_h, block_w = max(height // _SIDE, 1), max(width // _SIDE, 1)
    crop = tile[: block_h * _SIDE, : block_w * _SIDE] if height >= _SIDE and width >= _SIDE else tile
    # float32 in: a uint8 resize would round the block means to whole DN, below which noise averages.
    scaled = crop.astype(np.float32) * np.float32(1.0 / np.iinfo(tile.dtype).max)
    blocks = cv2.resize(scaled, (_SIDE, _SIDE), interpolation=cv2.INTER_AREA).astype(np.float64)
    cells = blocks.reshape(GRID, BLOCKS, GRID, BLOCKS).transpose(0, 2, 1, 3).reshape(GRID, GRID, -1)
    spread = (cells @ _RESIDUAL.T).std(axis=2)
    # Pixels in one block: noise averages down by its square root (never below one pixel per block).
    block_noise = noise_sigma / np.sqrt(max(crop.shape[0] / _SIDE, 1.0) * max(crop.shape[1] / _SIDE, 1.0))
    return spread / max(block_noise, 1e-9)


def tissue_cells(tile: np.ndarray, noise_sigma: float) -> np.ndarray:
    """Boolean (GRID, GRID): which cells hold tissue (see module doc)."""
    return tissue_ratio(tile, noise_sigma) > TISSUE_RATIO
