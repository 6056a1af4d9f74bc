"""Synthetic soft focus for real EM: turn sharp tiles into realistically blurred, noisy, quantised tiles.

Shared by the blur detector (issue 3) and the deblur model (issue 4): both train on the same families
and evaluate on the same held-out images (`load_split`). Pure numpy + OpenCV, no torch.

Blur families (`BlurParams.family`); every `sigma_px` is the Gaussian-equivalent PSF sigma in pixels,
i.e. the standard deviation of the PSF along its major axis, so strengths are comparable across families:

- ``gaussian``   isotropic defocus, Gaussian PSF. sigma_px in `sigma_range` (default 0.5-6 px).
- ``disk``       isotropic defocus, pillbox (uniform disk) PSF of radius R = 2 * sigma_px (a disk of
                 radius R has per-axis standard deviation R/2). Anti-aliased by supersampling.
- ``astigmatic`` stigmation error: elliptical Gaussian PSF, sigma_major = sigma_px,
                 sigma_minor = sigma_px / anisotropy, anisotropy in [1.5, 4], major axis at angle_deg in
                 [0, 180) (image axes: x to the right, y down; angle measured from +x towards +y).
- ``tilted``     tilted or non-flat section: spatially varying isotropic Gaussian blur whose sigma grows
                 linearly from 0 at one edge/corner to sigma_px at the opposite one. angle_deg in [0, 360)
                 is the direction in which blur grows (0 = sharp on the left, blurred on the right;
                 45 = sharp top-left corner, blurred bottom-right corner). Rendered by blending a stack
                 of uniformly blurred copies, so there is no single PSF (`psf_kernel` refuses it).

Noise and quantisation (`synthesize`):
- Poisson-Gaussian SEM/TEM detector noise, applied after blur: counts ~ Poisson(photons_per_unit * I),
  I_noisy = counts / photons_per_unit + N(0, read_sigma^2). Defaults sampled per tile:
  photons_per_unit log-uniform in [30, 1000] (SNR ~ 5-30 at mid grey), read_sigma uniform in [0, 0.01].
- Quantisation to uint8 or uint16 (round, clip to the full range).

Held-out split of ``../shared/data/isbi2012-train/{0..29}.png`` (fixed here, used by every model):
train = 0-21, val = 22-25, test = 26-29.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from appliance.pixels import tilted_blur

BlurFamily = Literal["gaussian", "disk", "astigmatic", "tilted"]
FAMILIES: tuple[str, ...] = ("gaussian", "disk", "astigmatic", "tilted")

ANISOTROPY_RANGE: tuple[float, float] = (1.5, 4.0)
PHOTONS_RANGE: tuple[float, float] = (30.0, 1000.0)
READ_SIGMA_RANGE: tuple[float, float] = (0.0, 0.01)
# Number of uniformly blurred copies blended to render a tilted blur; 12 keeps the sigma error < 4%.
_TILTED_LEVELS = 12
_SUPERSAMPLE = 7

REPO_ROOT = Path(__file__).resolve().parents[1]
# ISBI2012_DIR lets a deployment or CI point at a copy of the data elsewhere.
DATA_DIR = Path(os.environ.get("ISBI2012_DIR", REPO_ROOT.parent / "shared" / "data" / "isbi2012-train"))
SPLITS: dict[str, range] = {"train": range(0, 22), "val": range(22, 26), "test": range(26, 30)}


@dataclass(frozen=True)
class BlurParams:
    """One synthetic blur; see the module docstring for each family's meaning and ranges."""

    family: BlurFamily
    sigma_px: float  # Gaussian-equivalent sigma of the PSF in px (major axis; for tilted: the largest)
    anisotropy: float = 1.0  # sigma_major / sigma_minor
    angle_deg: float = 0.0  # major-axis angle (astigmatic) or direction of the blur gradient (tilted)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"BlurParams.family={self.family!r}; use one of {FAMILIES}")
        if not (math.isfinite(self.sigma_px) and self.sigma_px >= 0.0):
            raise ValueError(f"BlurParams.sigma_px={self.sigma_px}; must be a finite value >= 0")
        if not (math.isfinite(self.anisotropy) and self.anisotropy >= 1.0):
            raise ValueError(f"BlurParams.anisotropy={self.anisotropy}; must be >= 1 (major / minor)")


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8/uint16 (H, W) -> float32 in [0, 1] scaled by the dtype's full range."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / 65535.0
    raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")


def _supersampled(psf, half: int) -> np.ndarray:
    """Integrate a continuous PSF psf(x, y) over each pixel of a (2*half+1)^2 grid, normalised to 1."""
    n = 2 * half + 1
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - 0.5
    coords = (np.arange(n)[:, None] - half + offsets[None, :]).ravel()
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    fine = psf(xs, ys)
    kernel = fine.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).sum(axis=(1, 3))
    return kernel / kernel.sum()


def psf_kernel(params: BlurParams) -> np.ndarray:
    """2-D PSF of a uniform blur: float64, odd square size, sums to 1 (centre pixel = optical axis)."""
    if params.family == "tilted":
        raise ValueError("psf_kernel: a tilted blur varies across the field and has no single PSF")
    s = float(params.sigma_px)
    if s < 1e-3:
        return np.ones((1, 1))
    if params.family == "disk":
        radius = 2.0 * s
        half = max(1, math.ceil(radius))
        return _supersampled(lambda x, y: (x * x + y * y <= radius * radius).astype(np.float64), half)
    if params.family == "gaussian":
        sx, sy, theta = s, s, 0.0
    else:  # astigmatic
        sx, sy, theta = s, s / params.anisotropy, math.radians(params.angle_deg)
    half = max(1, math.ceil(3.5 * s))
    c, si = math.cos(theta), math.sin(theta)

    def gauss(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u = c * x + si * y  # along the major axis
        v = -si * x + c * y
        # Floor on the minor sigma so a very thin PSF still integrates smoothly over the supersamples.
        return np.exp(-0.5 * ((u / max(sx, 0.05)) ** 2 + (v / max(sy, 0.05)) ** 2))

    return _supersampled(gauss, half)


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    if kernel.shape == (1, 1):
        return image.copy()
    return cv2.filter2D(image, cv2.CV_32F, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def apply_blur(image: np.ndarray, params: BlurParams) -> np.ndarray:
    """Blur a float32 image in [0, 1] (H, W); returns float32 (H, W), reflect-padded at the borders."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"apply_blur: expected a 2-D image, got shape {image.shape}")
    if params.family != "tilted":
        return _convolve(image, psf_kernel(params))
    return tilted_blur(
        image,
        params.sigma_px,
        params.angle_deg,
        _TILTED_LEVELS,
        lambda unit, sigma: _convolve(unit, psf_kernel(BlurParams("gaussian", sigma))),
    )


def add_sem_noise(
    image: np.ndarray, rng: np.random.Generator, photons_per_unit: float, read_sigma: float
) -> np.ndarray:
    """Poisson-Gaussian detector noise on a float image in [0, 1]; returns float32 (not clipped)."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    counts = rng.poisson(image.astype(np.float64) * photons_per_unit)
    noisy = counts / photons_per_unit + rng.normal(0.0, read_sigma, size=image.shape)
    return noisy.astype(np.float32)


def quantize(image: np.ndarray, dtype: type[np.integer] | np.dtype = np.uint8) -> np.ndarray:
    """Float image in [0, 1] -> uint8 or uint16 (rounded, clipped to the full range)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ValueError(f"quantize: dtype {dtype} unsupported; use uint8 or uint16")
    full = float(np.iinfo(dtype).max)
    return np.clip(np.rint(np.asarray(image, dtype=np.float64) * full), 0, full).astype(dtype)


def blur_with_noise(
    tile: np.ndarray, params: BlurParams | None, noise_sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """A uint8/uint16 tile blurred by `params` (None: not blurred), plus Gaussian noise of std noise_sigma
    (fraction of full scale), re-quantised to its own dtype: a rig's noise on top of a real tile."""
    image = to_unit_float(tile) if params is None else apply_blur(to_unit_float(tile), params)
    image = image + rng.normal(0.0, noise_sigma, size=image.shape).astype(np.float32)
    return quantize(image, tile.dtype)


def sample_blur(
    rng: np.random.Generator, family: str | None = None, sigma_range: tuple[float, float] = (0.5, 6.0)
) -> BlurParams:
    """Draw one blur: family uniform over FAMILIES (unless given), sigma log-uniform in sigma_range."""
    family = family if family is not None else str(rng.choice(FAMILIES))
    if family not in FAMILIES:
        raise ValueError(f"sample_blur: family {family!r}; use one of {FAMILIES}")
    lo, hi = sigma_range
    if not 0.0 < lo <= hi:
        raise ValueError(f"sample_blur: sigma_range {sigma_range} must satisfy 0 < low <= high")
    sigma = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if family == "astigmatic":
        return BlurParams("astigmatic", sigma, float(rng.uniform(*ANISOTROPY_RANGE)), float(rng.uniform(0.0, 180.0)))
    if family == "tilted":
        return BlurParams("tilted", sigma, 1.0, float(rng.uniform(0.0, 360.0)))
    return BlurParams(family, sigma)  # type: ignore[arg-type]


def synthesize(
    sharp: np.ndarray,
    params: BlurParams | None,
    rng: np.random.Generator,
    noise: bool = True,
    dtype: type[np.integer] | np.dtype = np.uint8,
) -> np.ndarray:
    """Sharp uint8/uint16 tile (H, W) -> blurred (params None: not blurred), noisy, quantised tile.

    Noise strength is drawn from PHOTONS_RANGE (log-uniform) and READ_SIGMA_RANGE per call.
    """
    image = to_unit_float(np.asarray(sharp))
    if params is not None:
        image = apply_blur(image, params)
    if noise:
        photons = float(math.exp(rng.uniform(math.log(PHOTONS_RANGE[0]), math.log(PHOTONS_RANGE[1]))))
        image = add_sem_noise(image, rng, photons, float(rng.uniform(*READ_SIGMA_RANGE)))
    return quantize(image, dtype)


def load_split(split: Literal["train", "val", "test"]) -> list[Path]:
    """Paths of the fixed split of isbi2012-train (train 0-21, val 22-25, test 26-29); checks they exist."""
    if split not in SPLITS:
        raise ValueError(f"load_split: split {split!r}; use one of {tuple(SPLITS)}")
    paths = [DATA_DIR / f"{i}.png" for i in SPLITS[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"isbi2012-train images missing: {missing[:3]}...; expected under {DATA_DIR} "
            "(set ISBI2012_DIR to another copy)"
        )
    return paths


def load_image(path: Path) -> np.ndarray:
    """Read one dataset image as uint8/uint16 (H, W)."""
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.ndim != 2:
        raise ValueError(f"{path}: not a readable 2-D grayscale image")
    return pixels


def dihedral_tiles(split: Literal["train", "val", "test"]) -> list[np.ndarray]:
    """Every image of `split` in its 8 rotations/mirrors (rot90 k = 0..3, each unmirrored then mirrored)."""
    tiles = []
    for path in load_split(split):
        image = load_image(path)
        for k in range(4):
            rotated = np.rot90(image, k)
            tiles += [np.ascontiguousarray(rotated), np.ascontiguousarray(rotated[:, ::-1])]
    return tiles
