"""Training pairs synthesised on the training device (torch, batched): blur, noise, quantisation, planes.

The torch counterpart of `models.blur_synth` + `models.deblur.data`, so that a GPU is not starved by
CPU-side blurring: the sharp images live on the device, and one batched grouped convolution applies a
different PSF to every sample. Same families and ranges as `models.blur_synth`:
- ``gaussian``, ``astigmatic`` (anisotropy 1.5-4, any angle), ``disk`` (radius 2 sigma): one PSF per
  sample, integrated over each pixel by SUPERSAMPLE x SUPERSAMPLE supersampling, truncated at a common
  kernel half-width ceil(3.5 * max sigma);
- ``tilted``: a training crop is a piece of a tilted section, so its sigma ramps linearly from a
  random lower value to sigma_px in a random direction; rendered, like blur_synth, by blending
  TILTED_LEVELS uniformly blurred copies (fewer levels than blur_synth's 12: sigma error < 10 %);
- Poisson-Gaussian noise after blur (photons per unit log-uniform, by default 30-1000, read sigma
  0-0.01), or, for a share of samples (`own_noise_fraction`), Gaussian noise at the crop's own Immerkaer
  level x 0.7-1.4 (a real tile already carries its rig's noise; a soft retake of it would carry as
  much again: how bench/deblur_sources.py renders other instruments), then quantisation to 8 or 16 bit;
  the intensity window is then taken from the blurred patch exactly as `appliance.restoration.intensity`
  takes it from a tile.
The PSF planes carry a detector-like estimate of the true blur (`perturbed_estimate`), not the truth.
Per-sample random draws use a numpy Generator (a few scalars per sample); pixel noise a torch Generator
on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from appliance.noise import IMMERKAER_L2_NORM, IMMERKAER_MASK
from appliance.restoration.intensity import HIGH_PERCENTILE, LOW_PERCENTILE, SUBSAMPLE
from appliance.restoration.psf_planes_torch import psf_planes_batch
from models.blur_synth import ANISOTROPY_RANGE, FAMILIES, PHOTONS_RANGE, READ_SIGMA_RANGE

if TYPE_CHECKING:
    from models.deblur.recipe import DataConfig

SUPERSAMPLE = 5
TILTED_LEVELS = 6
REGION_GRID = 4  # region cells per patch side (the runtime's 8x8 map over a whole tile, at patch scale)
OWN_NOISE_GAIN = (0.7, 1.4)  # own-noise samples: the crop's Immerkaer level times this (uniform)


@dataclass(frozen=True)
class SynthConfig:
    """What the device synthesis needs of a packed-data recipe's `data:` section (models/deblur/recipe.py)."""

    patch: int
    margin: int
    batch: int
    families: tuple[str, ...]
    sigma_range: tuple[float, float]
    sharp_fraction: float
    uint16_fraction: float
    noise_free_fraction: float
    blind_fraction: float
    wrong_estimate_fraction: float
    estimate_bias_px: tuple[float, float]
    estimate_gain_log_sd: float
    photons_range: tuple[float, float] = PHOTONS_RANGE
    own_noise_fraction: float = 0.0
    psf_planes: bool = True  # False: inputs are the pixels only (a blind model)

    @classmethod
    def from_data(cls, data: DataConfig, patch: int | None = None, psf_planes: bool = True) -> SynthConfig:
        """From the recipe's `data:` section; `patch` overrides its patch side (the validation patches);
        psf_planes is the model's (`model.psf_planes`)."""
        return cls(
            patch=patch if patch is not None else data.patch,
            margin=data.margin,
            batch=data.batch,
            families=tuple(data.families),
            sigma_range=data.sigma_range,
            sharp_fraction=data.sharp_fraction,
            uint16_fraction=data.uint16_fraction,
            noise_free_fraction=data.noise_free_fraction,
            blind_fraction=data.blind_fraction,
            wrong_estimate_fraction=data.wrong_estimate_fraction,
            estimate_bias_px=data.estimate_bias_px,
            estimate_gain_log_sd=data.estimate_gain_log_sd,
            photons_range=data.photons_range or PHOTONS_RANGE,
            own_noise_fraction=data.own_noise_fraction,
            psf_planes=psf_planes,
        )

    @property
    def kernel_half(self) -> int:
        """Half-width (px) of every PSF kernel: covers 3.5 sigma of the largest Gaussian, 2 sigma disks."""
        return max(1, math.ceil(3.5 * self.sigma_range[1]))


@dataclass(frozen=True)
class BlurDraw:
    """Per-sample degradation, numpy arrays of shape (B,) (family: index into FAMILIES; -1 = no blur)."""

    family: np.ndarray
    sigma_px: np.ndarray  # major-axis sigma; tilted: the sigma at the crop's blurred end
    anisotropy: np.ndarray
    angle_deg: np.ndarray  # astigmatic: major axis; tilted: direction in which blur grows
    tilt_low_px: np.ndarray  # tilted: sigma at the crop's sharp end
    full_scale: np.ndarray  # 255 or 65535
    photons: np.ndarray  # 0 = noise-free
    read_sigma: np.ndarray
    own_noise_gain: np.ndarray  # > 0: Gaussian noise at the crop's own level times this, instead of photons


def draw_blur(rng: np.random.Generator, cfg: SynthConfig, batch: int) -> BlurDraw:
    """Random degradations for `batch` samples, as `models.blur_synth.sample_blur` draws them."""
    lo, hi = cfg.sigma_range
    blurred = rng.random(batch) >= cfg.sharp_fraction
    choice = np.array([FAMILIES.index(f) for f in cfg.families])[rng.integers(len(cfg.families), size=batch)]
    family = np.where(blurred, choice, -1)
    sigma = np.where(blurred, np.exp(rng.uniform(math.log(lo), math.log(hi), batch)), 0.0)
    astig = family == FAMILIES.index("astigmatic")
    tilted = family == FAMILIES.index("tilted")
    anisotropy = np.where(astig, rng.uniform(*ANISOTROPY_RANGE, batch), 1.0)
    angle = np.where(astig, rng.uniform(0.0, 180.0, batch), np.where(tilted, rng.uniform(0.0, 360.0, batch), 0.0))
    noisy = rng.random(batch) >= cfg.noise_free_fraction
    photons = np.exp(rng.uniform(math.log(cfg.photons_range[0]), math.log(cfg.photons_range[1]), batch))
    # Drawn only when used, so a recipe without own-noise samples keeps its random stream (gpu.yaml's v3).
    own_used = cfg.own_noise_fraction > 0
    own = noisy & (rng.random(batch) < cfg.own_noise_fraction) if own_used else np.zeros(batch, dtype=bool)
    return BlurDraw(
        family=family,
        sigma_px=sigma,
        anisotropy=anisotropy,
        angle_deg=angle,
        tilt_low_px=np.where(tilted, rng.uniform(0.0, 1.0, batch) * sigma, 0.0),
        full_scale=np.where(rng.random(batch) < cfg.uint16_fraction, 65535.0, 255.0),
        photons=np.where(noisy & ~own, photons, 0.0),
        read_sigma=rng.uniform(*READ_SIGMA_RANGE, batch),
        own_noise_gain=np.where(own, rng.uniform(*OWN_NOISE_GAIN, batch), 0.0) if own_used else np.zeros(batch),
    )


def psf_kernels(
    family: torch.Tensor, sigma_px: torch.Tensor, anisotropy: torch.Tensor, angle_deg: torch.Tensor, half: int
) -> torch.Tensor:
    """float32 (B, 2*half+1, 2*half+1) PSFs, each summing to 1 (family -1 or sigma ~0: a delta)."""
    n = 2 * half + 1
    offsets = (torch.arange(SUPERSAMPLE, device=sigma_px.device) + 0.5) / SUPERSAMPLE - 0.5
    coords = (torch.arange(n, device=sigma_px.device)[:, None] - half + offsets[None, :]).reshape(-1)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    theta = torch.deg2rad(angle_deg)[:, None, None]
    u = torch.cos(theta) * xs + torch.sin(theta) * ys  # along the major axis
    v = -torch.sin(theta) * xs + torch.cos(theta) * ys
    sx = sigma_px.clamp_min(0.05)[:, None, None]
    sy = (sigma_px / anisotropy).clamp_min(0.05)[:, None, None]
    fine = torch.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    radius = (2.0 * sigma_px)[:, None, None]
    disk = (xs * xs + ys * ys <= radius * radius).float()
    is_disk = (family == FAMILIES.index("disk")) & (sigma_px >= 1e-3)
    fine = torch.where(is_disk[:, None, None], disk, fine)
    kernel = fine.reshape(-1, n, SUPERSAMPLE, n, SUPERSAMPLE).sum(dim=(2, 4))
    return kernel / kernel.sum(dim=(1, 2), keepdim=True)


def convolve(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each (1, S, S) image of float32 (B, 1, S, S) with its own (K, K) kernel; reflect borders."""
    batch, _, height, width = images.shape
    half = kernels.shape[-1] // 2
    padded = F.pad(images, (half, half, half, half), mode="reflect").reshape(1, batch, height + 2 * half, -1)
    # conv2d correlates, as cv2.filter2D in blur_synth does; the PSFs are point-symmetric anyway.
    out = F.conv2d(padded, kernels[:, None], groups=batch)
    return out.reshape(batch, 1, height, width)


def tilt_ramp(draw: BlurDraw, index: np.ndarray, ys: torch.Tensor, xs: torch.Tensor, side: int) -> torch.Tensor:
    """Sigma (px) of tilted samples `index` at positions (ys, xs) of a side x side crop: (n, *ys.shape)."""
    device = ys.device
    theta = torch.deg2rad(torch.as_tensor(draw.angle_deg[index], dtype=torch.float32, device=device))
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    corners = torch.stack([c * 0 + s * 0, c * (side - 1), s * (side - 1), c * (side - 1) + s * (side - 1)])
    lo, hi = corners.amin(0), corners.amax(0)
    t = ((c * xs + s * ys - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)
    low = torch.as_tensor(draw.tilt_low_px[index], dtype=torch.float32, device=device)[:, None, None]
    high = torch.as_tensor(draw.sigma_px[index], dtype=torch.float32, device=device)[:, None, None]
    return low + (high - low) * t


def blur_batch(crops: torch.Tensor, draw: BlurDraw, half: int) -> torch.Tensor:
    """Apply each sample's blur to float32 (B, 1, S, S) crops in [0, 1]."""
    device = crops.device

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=device)

    family = torch.as_tensor(draw.family, device=device)
    out = convolve(
        crops, psf_kernels(family, tensor(draw.sigma_px), tensor(draw.anisotropy), tensor(draw.angle_deg), half)
    )
    tilted = np.flatnonzero(draw.family == FAMILIES.index("tilted"))
    if len(tilted):
        rows = torch.as_tensor(tilted, device=device)
        side = crops.shape[-1]
        grid = torch.arange(side, dtype=torch.float32, device=device)
        sigma_map = tilt_ramp(draw, tilted, grid[:, None], grid[None, :], side)[:, None]  # (n, 1, S, S)
        high = tensor(draw.sigma_px[tilted])
        step = (high / (TILTED_LEVELS - 1)).clamp_min(1e-6)[:, None, None, None]
        blended = torch.zeros_like(sigma_map)
        gaussian = torch.zeros(len(tilted), dtype=torch.long, device=device)
        for level in range(TILTED_LEVELS):
            weight = (1.0 - (sigma_map / step - level).abs()).clamp_min(0.0)
            level_sigma = high * level / (TILTED_LEVELS - 1)
            kernels = psf_kernels(gaussian, level_sigma, torch.ones_like(high), torch.zeros_like(high), half)
            blended += weight * convolve(crops[rows], kernels)
        out[rows] = blended
    return out


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Immerkaer noise std of each float32 (B, 1, H, W) image, (B,): `appliance.noise.patch_noise_sigma`."""
    mask = torch.as_tensor(IMMERKAER_MASK, dtype=torch.float32, device=images.device)[None, None]
    residual = F.conv2d(images, mask)  # valid part only, as patch_noise_sigma
    return residual.abs().mean(dim=(1, 2, 3)) * math.sqrt(math.pi / 2) / IMMERKAER_L2_NORM


def add_noise_and_quantise(
    images: torch.Tensor,
    draw: BlurDraw,
    generator: torch.Generator | None,
    own_sigma: torch.Tensor | None = None,
) -> torch.Tensor:
    """Poisson-Gaussian noise (photons 0: none), or for own-noise samples Gaussian noise of std
    own_noise_gain x own_sigma (B,), then rounding to the sample's 8/16-bit grid, in [0, 1]."""
    device = images.device
    photons = torch.as_tensor(draw.photons, dtype=torch.float32, device=device)[:, None, None, None]
    read = torch.as_tensor(draw.read_sigma, dtype=torch.float32, device=device)[:, None, None, None]
    full = torch.as_tensor(draw.full_scale, dtype=torch.float32, device=device)[:, None, None, None]
    clean = images.clamp(0.0, 1.0)
    counts = torch.poisson(clean * photons.clamp_min(1.0), generator=generator)
    gauss = torch.randn(images.shape, generator=generator, device=device, dtype=torch.float32)
    noisy = counts / photons.clamp_min(1.0) + gauss * read
    degraded = torch.where(photons > 0, noisy, clean)
    gain = torch.as_tensor(draw.own_noise_gain, dtype=torch.float32, device=device)
    if own_sigma is not None and bool((gain > 0).any()):
        own = torch.randn(images.shape, generator=generator, device=device, dtype=torch.float32)
        std = (gain * own_sigma)[:, None, None, None]
        degraded = torch.where(std > 0, clean + own * std, degraded)
    return torch.round(degraded.clamp(0.0, 1.0) * full) / full


def intensity_windows(blurred: torch.Tensor, full_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (low, high), (B, 1, 1, 1), as `appliance.restoration.intensity.intensity_window` on the tile."""
    sample = blurred[:, 0, ::SUBSAMPLE, ::SUBSAMPLE].reshape(blurred.shape[0], -1)
    q = torch.tensor([LOW_PERCENTILE / 100.0, HIGH_PERCENTILE / 100.0], device=blurred.device)
    low, high = torch.quantile(sample, q, dim=1)
    high = torch.where(high <= low, low + 1.0 / full_scale, high)
    return low[:, None, None, None], high[:, None, None, None]


@dataclass(frozen=True)
class PsfEstimateBatch:
    """What the detector would report for each sample (numpy (B,), region (B, g, g)); known 0 = blind."""

    known: np.ndarray
    sigma_px: np.ndarray
    anisotropy: np.ndarray
    angle_deg: np.ndarray
    region_sigma_px: np.ndarray


def true_region_sigma(draw: BlurDraw, patch: int, margin: int) -> np.ndarray:
    """(B, REGION_GRID, REGION_GRID) true local sigma at the region cell centres of the patch.

    The detector's region map is a geometric-mean sigma (log-sigma averaged), so an astigmatic PSF
    reads sigma_major / sqrt(anisotropy) there.
    """
    batch = len(draw.sigma_px)
    region = np.broadcast_to(
        (draw.sigma_px / np.sqrt(draw.anisotropy))[:, None, None], (batch, REGION_GRID, REGION_GRID)
    ).copy()
    tilted = np.flatnonzero(draw.family == FAMILIES.index("tilted"))
    if len(tilted):
        centres = torch.tensor((np.arange(REGION_GRID) + 0.5) * patch / REGION_GRID + margin, dtype=torch.float32)
        ramp = tilt_ramp(draw, tilted, centres[:, None], centres[None, :], patch + 2 * margin)
        region[tilted] = ramp.numpy()
    return region.astype(np.float32)


def perturbed_estimate(rng: np.random.Generator, draw: BlurDraw, cfg: SynthConfig) -> PsfEstimateBatch:
    """A detector-like estimate of each sample's blur: the truth with the detector's measured errors.

    models/detector/MODEL_CARD.md: on held-out noisy ISBI the tile sigma reads high (1 -> 1.52,
    1.5 -> 1.92, 2 -> 2.48, 3 -> 3.43 px median), to ~0.1-0.4 px; anisotropy to ~20-40 %, angle to
    3-6 deg; a tilted tile's sigma is its worst region, anywhere in the tile. So: sigma * lognormal
    gain + a per-sample bias (estimate_bias_px), per-cell jitter on the region map, a share of wrong
    estimates (a random sigma) and a share of blind samples (all planes zero).
    """
    batch = len(draw.sigma_px)
    region = true_region_sigma(draw, cfg.patch, cfg.margin)
    tilted = draw.family == FAMILIES.index("tilted")
    astig = draw.family == FAMILIES.index("astigmatic")
    tile_sigma = np.where(tilted, draw.sigma_px * rng.uniform(1.0, 1.5, batch), draw.sigma_px)
    gain = np.exp(rng.normal(0.0, cfg.estimate_gain_log_sd, batch))
    bias = rng.uniform(*cfg.estimate_bias_px, batch)
    sigma = np.maximum(tile_sigma * gain + bias, 0.0)
    jitter = np.exp(rng.normal(0.0, 0.1, region.shape))
    region = np.maximum(region * gain[:, None, None] * jitter + bias[:, None, None], 0.0)
    wrong = rng.random(batch) < cfg.wrong_estimate_fraction
    lo, hi = cfg.sigma_range
    random_sigma = np.exp(rng.uniform(math.log(lo), math.log(hi), batch))
    sigma = np.where(wrong, random_sigma, sigma)
    region = np.where(wrong[:, None, None], random_sigma[:, None, None], region)
    # Anisotropy: astigmatic ~25 % log error, 15 % read as isotropic; others mostly 1, sometimes spurious.
    astig_read = draw.anisotropy * np.exp(rng.normal(0.0, 0.25, batch))
    astig_read = np.where(rng.random(batch) < 0.15, 1.0, np.clip(astig_read, 1.0, 6.0))
    spurious = np.where(rng.random(batch) < 0.3, np.exp(np.abs(rng.normal(0.0, 0.2, batch))), 1.0)
    anisotropy = np.where(astig, astig_read, spurious)
    angle = np.where(astig, draw.angle_deg + rng.normal(0.0, 6.0, batch), rng.uniform(0.0, 180.0, batch))
    angle = np.where(anisotropy > 1.0, np.mod(angle, 180.0), 0.0)
    known = (rng.random(batch) >= cfg.blind_fraction).astype(np.float32)
    return PsfEstimateBatch(
        known,
        sigma.astype(np.float32),
        anisotropy.astype(np.float32),
        angle.astype(np.float32),
        region.astype(np.float32),
    )


class DeviceImages:
    """Sharp images resident on the device, float32 in [0, 1] by their dtype; crops drawn by pixel count."""

    def __init__(self, images: Sequence[np.ndarray], device: torch.device) -> None:
        if not images:
            raise ValueError("DeviceImages: no images (check the packed file's splits)")
        self.images = [
            torch.from_numpy(image.astype(np.float32) / float(np.iinfo(image.dtype).max)).to(device) for image in images
        ]
        sizes = np.array([image.size for image in images], dtype=np.float64)
        self.weights = sizes / sizes.sum()  # every pixel equally likely: big sources count by area

    def crops(self, rng: np.random.Generator, batch: int, side: int) -> torch.Tensor:
        """float32 (batch, 1, side, side): random crops, each rotated by k * 90 deg and maybe mirrored."""
        picks = rng.choice(len(self.images), size=batch, p=self.weights)
        out = []
        for index in picks:
            image = self.images[int(index)]
            if min(image.shape) < side:
                raise ValueError(f"packed image {index} is {tuple(image.shape)}, smaller than a {side} px crop")
            y = int(rng.integers(image.shape[0] - side + 1))
            x = int(rng.integers(image.shape[1] - side + 1))
            crop = torch.rot90(image[y : y + side, x : x + side], int(rng.integers(4)))
            out.append(crop.flip(-1) if rng.random() < 0.5 else crop)
        return torch.stack(out)[:, None].contiguous()


def make_batch(
    images: DeviceImages, rng: np.random.Generator, generator: torch.Generator | None, cfg: SynthConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs float32 (B, 1 + planes, P, P), sharp float32 (B, 1, P, P)) on the model scale, on the device;
    a blind model's config (psf_planes False) gives the pixels only (B, 1, P, P)."""
    m, p = cfg.margin, cfg.patch
    crops = images.crops(rng, cfg.batch, p + 2 * m)
    draw = draw_blur(rng, cfg, cfg.batch)
    blurred = blur_batch(crops, draw, cfg.kernel_half)[:, :, m : m + p, m : m + p]
    full = torch.as_tensor(draw.full_scale, dtype=torch.float32, device=crops.device)
    # The crop's own noise, measured on the sharp crop as the bench measures a tile (structure included).
    own_sigma = noise_sigma(crops[:, :, m : m + p, m : m + p]) if cfg.own_noise_fraction > 0 else None
    blurred = add_noise_and_quantise(blurred, draw, generator, own_sigma)
    low, high = intensity_windows(blurred, full)
    scale = high - low
    sharp = (crops[:, :, m : m + p, m : m + p] - low) / scale
    if not cfg.psf_planes:
        return (blurred - low) / scale, sharp
    estimate = perturbed_estimate(rng, draw, cfg)

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=crops.device)

    planes = psf_planes_batch(
        p,
        p,
        tensor(estimate.known),
        tensor(estimate.sigma_px),
        tensor(estimate.anisotropy),
        tensor(estimate.angle_deg),
        tensor(estimate.region_sigma_px),
    )
    return torch.cat([(blurred - low) / scale, planes], dim=1), sharp
