"""Is there tissue to judge? Per cell of the detector's grid, coarse structure measured against the noise.

Focus is judged from fine detail, but whether a region holds tissue at all is a coarse question: tissue,
even blurred far beyond repair, still varies at the scale of organelles and cells; bare resin, the area
beyond a section's edge or a blank field varies only by noise and smooth shading (charging, detector
gain). So each cell of the GRID x GRID map is cut into BLOCKS x BLOCKS block means, a plane is fitted to
them (shading removed), and the residual's spread is compared with what noise alone leaves in a block
mean (noise sigma / sqrt(block area)). A cell holds tissue when the ratio exceeds TISSUE_RATIO.

Block means need pixels: on a small tile (a few hundred px) a block is 2-3 px and noise hides the
tissue of a noisy instrument (SBEM, 16-bit SEM), so a second test looks at each cell's own 64 px patch:
after a plane fit, its variance against its own noise variance (Immerkaer per patch, so signal-dependent
Poisson noise of bright or dark resin is its own reference) at full resolution (> PATCH_VAR_RATIO) or
in 4x4-pixel block means (> PATCH_BLOCK_RATIO; noise averages down 16x, tissue structure does not). A
cell holds tissue when either test says so. Measured (bench/detector_sources.py crops, 128-512 px):
every em-corpus source, in focus and blurred at 3 or 6 px, keeps >= 38 % of its patches as tissue
(before: noisy sources blurred at 3 px read `empty`); flat, shaded and dark resin keep 0 %.

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
PATCH_VAR_RATIO = 1.2  # plane-removed patch variance / its noise variance: white noise reads 1 +- 0.03
PATCH_BLOCK = 4  # px, block means of the patch test's coarse reading
PATCH_BLOCK_RATIO = 2.0  # the same on 4x4 block means over noise variance / 16: white noise reads 1 +- 0.1
MIN_TISSUE_CELLS = 4  # of GRID * GRID: fewer -> no tissue to judge (1/16 of the tile)

_SIDE = GRID * BLOCKS


def tissue_ratio(tile: np.ndarray, noise_sigma: float) -> np.ndarray:
    """Per cell (GRID, GRID): spread of plane-removed block means over the noise of one block mean.

    tile: 2-D uint8/uint16; noise_sigma: the tile's noise std in units of full scale (0-1), e.g. the
    median of appliance.noise.patch_noise_sigma over its patches.
    """
    height, width = tile.shape
    block_h, block_w = max(height // _SIDE, 1), max(width // _SIDE, 1)
    crop = tile[: block_h * _SIDE, : block_w * _SIDE] if height >= _SIDE and width >= _SIDE else tile
    blocks = _block_means(crop) / float(np.iinfo(tile.dtype).max)
    cells = blocks.reshape(GRID, BLOCKS, GRID, BLOCKS).transpose(0, 2, 1, 3).reshape(GRID * GRID, BLOCKS, BLOCKS)
    # max(0): a cell that is exactly a plane can read a rounding error below zero.
    spread = np.sqrt(np.maximum(_plane_removed_var(cells), 0.0)).reshape(GRID, GRID)
    # Pixels in one block: noise averages down by its square root (never below one pixel per block).
    block_noise = noise_sigma / np.sqrt(max(crop.shape[0] / _SIDE, 1.0) * max(crop.shape[1] / _SIDE, 1.0))
    return spread / max(block_noise, 1e-9)


def _block_means(crop: np.ndarray) -> np.ndarray:
    """(_SIDE, _SIDE) float64 block means of a uint8/uint16 image, in its DN.

    uint8 in whole blocks (sides a multiple of _SIDE, < 2^23 px so int32 sums cannot overflow): exact sums
    from one integral image, ~1.1 ms for a 2400 x 2400 tile on one core against ~6 ms for INTER_AREA at that
    scale. Otherwise INTER_AREA on float32 (~1.5 ms for 1700 x 1700 uint16; a smaller image is interpolated
    up), never on the integers: a uint8 resize would round the means to whole DN, below which noise averages.
    """
    height, width = crop.shape
    whole = height >= _SIDE and width >= _SIDE and not (height % _SIDE or width % _SIDE)
    if crop.dtype != np.uint8 or not whole or crop.size >= 2**23:
        return cv2.resize(crop.astype(np.float32), (_SIDE, _SIDE), interpolation=cv2.INTER_AREA).astype(np.float64)
    integral = cv2.integral(crop, sdepth=cv2.CV_32S)
    corners = integral[np.ix_(np.arange(0, height + 1, height // _SIDE), np.arange(0, width + 1, width // _SIDE))]
    sums = np.diff(np.diff(corners.astype(np.float64), axis=0), axis=1)
    return sums / ((height // _SIDE) * (width // _SIDE))


def _plane_removed_var(stack: np.ndarray) -> np.ndarray:
    """Variance per image of a stack (N, S, S) after a least-squares plane fit (shading removed).

    On a square grid the centred row and column coordinates are orthogonal to each other and to the mean,
    so the plane takes from the variance exactly the two slopes' shares: sums along rows and columns,
    no fitted plane per image (~4x faster on a detector batch, the same value to float64 rounding).
    """
    side = stack.shape[1]
    ramp = np.arange(side) - (side - 1) / 2.0
    total = stack.reshape(stack.shape[0], -1).var(axis=1, dtype=np.float64)
    along_y = stack.sum(axis=2, dtype=np.float64) @ ramp
    along_x = stack.sum(axis=1, dtype=np.float64) @ ramp
    return total - (along_y**2 + along_x**2) / (side**3 * float(ramp @ ramp))


def patch_tissue(patches: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Boolean (N,): which patches show structure above their own noise (see module doc).

    patches: float32 (N, P, P) in [0, 1] (P a multiple of PATCH_BLOCK); noise: (N,) each patch's noise std.
    """
    n, side = patches.shape[0], patches.shape[1]
    noise_var = np.maximum(np.asarray(noise, np.float64) ** 2, 1e-12)
    fine = _plane_removed_var(patches) / noise_var
    k = side // PATCH_BLOCK
    # Block means of every patch at once: the patches stacked into one image, INTER_AREA at an integer scale
    # whose blocks never straddle two patches (~15x faster than numpy's strided mean, the same values).
    stacked = np.ascontiguousarray(patches[:, : k * PATCH_BLOCK, : k * PATCH_BLOCK], np.float32)
    blocks = cv2.resize(stacked.reshape(n * k * PATCH_BLOCK, k * PATCH_BLOCK), (k, n * k), interpolation=cv2.INTER_AREA)
    blocks = blocks.reshape(n, k, k)
    coarse = _plane_removed_var(blocks) / (noise_var / PATCH_BLOCK**2)
    return (fine > PATCH_VAR_RATIO) | (coarse > PATCH_BLOCK_RATIO)


def tissue_cells(
    tile: np.ndarray, noise_sigma: float, patch_has_tissue: np.ndarray | None = None, cells: np.ndarray | None = None
) -> np.ndarray:
    """Boolean (GRID, GRID): which cells hold tissue (see module doc).

    patch_has_tissue, cells: `patch_tissue` of the tile's patches and the cell of each; a cell holds tissue
    when the coarse block test or any of its patches says so.
    """
    found = tissue_ratio(tile, noise_sigma) > TISSUE_RATIO
    if patch_has_tissue is not None and cells is not None:
        by_patch = np.zeros(GRID * GRID, bool)
        np.logical_or.at(by_patch, cells[patch_has_tissue], True)
        found |= by_patch.reshape(GRID, GRID)
    return found
