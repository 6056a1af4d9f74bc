"""Batched torch twin of `appliance.restoration.psf_planes.psf_planes`: the planes built on the device.

Used by the whole-tile GPU path (`appliance.restoration.torch_backend`: only a few numbers per tile cross the bus,
never (5, H, W) planes) and by training (`models/deblur/gpu_synth.py`). Same plane order, scale and
interpolation as the numpy version (tests/models/test_deblur_gpu_recipe.py and tests/restoration/test_restorer_psf.py
check they agree to float rounding); only the constants are imported, so the two cannot drift apart in
what each plane means. Imported only where torch is (the optional `train` extra at runtime).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from appliance.restoration.psf_planes import MAX_ANISOTROPY, PLANE_NAMES, SIGMA_SCALE_PX, PsfEstimate


def interpolation_taps(grid: int, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """As `appliance.restoration.psf_planes.interpolation_taps`: (lower, upper, upper weight) for `length` px."""
    position = (torch.arange(length, dtype=torch.float32, device=device) + 0.5) * (grid / length)
    position = (position - 0.5).clamp(0.0, float(grid - 1))
    lower = position.floor().long()
    upper = (lower + 1).clamp_max(grid - 1)
    return lower, upper, position - lower


def upsample_grids(grids: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float32 (B, gh, gw) cell-centre values -> (B, height, width), bilinear between centres."""
    y0, y1, wy = interpolation_taps(grids.shape[1], height, grids.device)
    x0, x1, wx = interpolation_taps(grids.shape[2], width, grids.device)
    rows = grids[:, y0] * (1 - wy[None, :, None]) + grids[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx[None, None, :]) + rows[:, :, x1] * wx[None, None, :]


def psf_planes_batch(
    height: int,
    width: int,
    known: torch.Tensor,
    sigma_px: torch.Tensor,
    anisotropy: torch.Tensor,
    angle_deg: torch.Tensor,
    region_sigma_px: torch.Tensor,
) -> torch.Tensor:
    """float32 (B, len(PLANE_NAMES), height, width); known (B,) in {0, 1} zeroes the blind samples.

    sigma_px, anisotropy, angle_deg: (B,); region_sigma_px: (B, gh, gw) sigma per cell (a (B, 1, 1)
    grid holding sigma_px stands for "no region map").
    """
    batch = known.shape[0]
    ellipticity = torch.log(anisotropy.clamp(1.0, MAX_ANISOTROPY))
    double_angle = torch.deg2rad(2.0 * angle_deg)
    constants = torch.stack(
        [
            torch.ones_like(sigma_px),
            sigma_px / SIGMA_SCALE_PX,
            ellipticity * torch.cos(double_angle),
            ellipticity * torch.sin(double_angle),
        ],
        dim=1,
    ).float()
    planes = constants[:, [0, 1, 1, 2, 3], None, None].expand(batch, len(PLANE_NAMES), height, width).clone()
    planes[:, 2] = upsample_grids(region_sigma_px.float(), height, width) / SIGMA_SCALE_PX
    return planes * known.float()[:, None, None, None]


def psf_planes_for_estimates(
    height: int, width: int, estimates: Sequence[PsfEstimate | None], device: torch.device
) -> torch.Tensor:
    """float32 (len(estimates), len(PLANE_NAMES), height, width) on `device`, one tile per estimate.

    As `appliance.restoration.psf_planes.psf_planes` per tile (None = blind, all-zero planes). One batched call when
    the region maps share a grid (the detector's is always 8 x 8), else one call per tile.
    """
    grids = _region_grids(estimates)
    same_grid = len({grid.shape for grid in grids}) == 1
    groups = [list(range(len(estimates)))] if same_grid else [[i] for i in range(len(estimates))]
    parts = []
    for group in groups:
        rows = [_scalars(estimates[i]) for i in group]
        scalars = torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)
        region = torch.from_numpy(np.stack([grids[i] for i in group])).to(device, non_blocking=True)
        known, sigma_px, anisotropy, angle_deg = scalars.unbind(1)
        parts.append(psf_planes_batch(height, width, known, sigma_px, anisotropy, angle_deg, region))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _scalars(estimate: PsfEstimate | None) -> list[float]:
    """(known, sigma_px, anisotropy, angle_deg) of one tile; the blind path's values are zeroed anyway."""
    if estimate is None:
        return [0.0, 0.0, 1.0, 0.0]
    return [1.0, estimate.sigma_px, estimate.anisotropy, estimate.angle_deg]


def _region_grids(estimates: Sequence[PsfEstimate | None]) -> list[np.ndarray]:
    """float32 (gh, gw) sigma per region cell for each tile: the map, or (1, 1) holding the tile sigma
    when there is none; a blind tile borrows the first map's shape (its planes are zeroed) so that
    blind and estimated tiles still go in one call."""
    maps = [e.region_sigma_px for e in estimates if e is not None and e.region_sigma_px is not None]
    blind_shape = np.shape(maps[0]) if maps else (1, 1)
    grids = []
    for estimate in estimates:
        if estimate is None:
            grids.append(np.zeros(blind_shape, np.float32))
        elif estimate.region_sigma_px is None:
            grids.append(np.full((1, 1), estimate.sigma_px, np.float32))
        else:
            grids.append(np.asarray(estimate.region_sigma_px, dtype=np.float32))
    return grids
