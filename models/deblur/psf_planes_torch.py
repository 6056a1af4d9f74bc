"""Batched torch twin of `appliance.psf_planes.psf_planes`, for building planes on the training device.

Same plane order, scale and interpolation as the numpy runtime version (tests/test_psf_planes.py checks
they agree to float rounding); only the constants are imported, so the two cannot drift apart in what
each plane means.
"""

from __future__ import annotations

import torch

from appliance.psf_planes import MAX_ANISOTROPY, PLANE_NAMES, SIGMA_SCALE_PX


def interpolation_taps(grid: int, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """As `appliance.psf_planes.interpolation_taps`: (lower, upper, upper weight) for `length` px."""
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
        [torch.ones_like(sigma_px), sigma_px / SIGMA_SCALE_PX,
         ellipticity * torch.cos(double_angle), ellipticity * torch.sin(double_angle)], dim=1
    ).float()
    planes = constants[:, [0, 1, 1, 2, 3], None, None].expand(batch, len(PLANE_NAMES), height, width).clone()
    planes[:, 2] = upsample_grids(region_sigma_px.float(), height, width) / SIGMA_SCALE_PX
    return planes * known.float()[:, None, None, None]
