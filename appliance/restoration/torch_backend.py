"""torch backend of the deblur model: the exported program, and on a GPU whole tiles kept on the device.

Imported only when the torch backend is chosen (torch is the optional `train` extra, not a runtime
dependency). On CUDA a tile never visits host numpy between upload and download: intensity window,
padding, the network (fp16/bf16, channels_last) and the conversion back to uint8/uint16 run on the GPU,
because at 25.4 tiles/s the host-side blend of a 2400 x 2400 tile alone would use most of the budget.
The network is local (no global pooling), so one whole-tile pass equals overlapped tiling (tested).
A PSF-aware model (`psf_planes=True`) gets its planes built on the device from each tile's PsfEstimate
(`appliance.restoration.psf_planes_torch`): a few numbers per tile cross the bus, not 5 x H x W floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from appliance.restoration.intensity import HIGH_PERCENTILE, LOW_PERCENTILE, SUBSAMPLE
from appliance.restoration.psf_planes import PsfEstimate
from appliance.restoration.psf_planes_torch import psf_planes_for_estimates

# Largest batch x height x width sent through the network at once on a GPU (fp16 peak ~0.5 KB/px).
MAX_PIXELS_PER_CALL = 48_000_000


class TorchDeblur:
    """The exported deblur program on one device, in one floating-point dtype."""

    def __init__(
        self,
        program_path: Path,
        size_multiple: int,
        device: str,
        dtype: torch.dtype,
        compact_transfers: bool = True,
        compile_network: bool = False,
        psf_planes: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        if not program_path.is_file():
            raise FileNotFoundError(
                f"{program_path}: the torch backend needs the exported program; run `python -m models.deblur.export`"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.size_multiple = size_multiple
        self.psf_planes = psf_planes  # the program takes (N, 1 + planes, H, W): see appliance.restoration.psf_planes
        self._module = torch.export.load(str(program_path)).module().to(device=self.device, dtype=dtype)
        self._channels_last = self.device.type == "cuda"
        if self._channels_last:
            self._module = self._module.to(memory_format=torch.channels_last)
        # Tiles cross the bus in their own width (uint8: 1 B/px, uint16: 2 B/px) through pinned host
        # buffers; False keeps the int32 round trip (4 B/px each way), measured against it in
        # bench/gpu_suite.py.
        self._compact = compact_transfers
        # Fuses the norm/gate element-wise ops; costs a compile per new input shape, so a compiled network
        # takes one tile per call (a batch of another size would compile again). compile_mode: torch.compile's
        # mode (None = its default).
        self._compiled = compile_network
        if compile_network:
            self._module = torch.compile(self._module, dynamic=False, mode=compile_mode)

    def _network(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.dtype)
        if self._channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self._module(batch).float()

    @torch.inference_mode()
    def run_patches(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) on the model scale (C = 1, or 1 + planes) -> (N, 1, H, W); the `run_tiled`
        batch function (a compiled network takes its patches one at a time)."""
        inputs = torch.from_numpy(batch).to(self.device, non_blocking=True)
        if self._compiled:
            return torch.cat([self._network(inputs[i : i + 1]) for i in range(len(inputs))]).cpu().numpy()
        return self._network(inputs).cpu().numpy()

    @torch.inference_mode()
    def restore_tiles(
        self, tiles: Sequence[np.ndarray], margin: int, estimates: Sequence[PsfEstimate | None] | None = None
    ) -> list[np.ndarray]:
        """Whole same-shape uint8/uint16 tiles (H, W) -> restored tiles, same shape and dtype.

        margin: reflect padding (px) around each tile, as in tiled inference (`DeblurConfig.patch_overlap`).
        estimates: per tile, the detector's PSF estimate (None = blind planes); used by a PSF-aware model
        only, whose planes are built on the device and reflect-padded with the pixels (as `run_tiled`
        cuts them); None for all tiles when not given.
        """
        if estimates is not None and len(estimates) != len(tiles):
            raise ValueError(f"restore_tiles: {len(tiles)} tiles but {len(estimates)} estimates")
        height, width = tiles[0].shape
        dtype = tiles[0].dtype
        full = float(np.iinfo(dtype).max)
        per_call = max(1, MAX_PIXELS_PER_CALL // ((height + 2 * margin) * (width + 2 * margin)))
        if self._compiled:
            per_call = 1
        restored: list[np.ndarray] = []
        for first in range(0, len(tiles), per_call):
            stack = np.stack(tiles[first : first + per_call])
            pixels = self._upload(stack)
            low, high = _intensity_window(pixels)
            scale = (high - low)[:, None, None]
            image = ((pixels - low[:, None, None]) / scale)[:, None]
            if self.psf_planes:
                chunk = estimates[first : first + per_call] if estimates is not None else [None] * len(stack)
                image = torch.cat([image, psf_planes_for_estimates(height, width, chunk, self.device)], dim=1)
            pad_bottom = -(height + 2 * margin) % self.size_multiple
            pad_right = -(width + 2 * margin) % self.size_multiple
            padded = F.pad(image, (margin, margin + pad_right, margin, margin + pad_bottom), mode="reflect")
            out = self._network(padded)[:, 0, margin : margin + height, margin : margin + width]
            out = torch.clamp(torch.round(out * scale + low[:, None, None]), 0.0, full)
            restored += list(self._download(out, dtype))
        return restored

    def _upload(self, stack: np.ndarray) -> torch.Tensor:
        """(N, H, W) uint8/uint16 host tiles -> float32 (N, H, W) on the device, exact."""
        if not self._compact:
            # torch has no uint16 arithmetic: widen on the host, convert on the device.
            host = torch.from_numpy(stack if stack.dtype == np.uint8 else stack.astype(np.int32))
            return host.to(self.device, non_blocking=True).float()
        # uint16 travels as its int16 bit pattern and is unwrapped on the device.
        bits = stack if stack.dtype == np.uint8 else stack.view(np.int16)
        staged = torch.empty(bits.shape, dtype=_TORCH_INT[bits.dtype], pin_memory=self.device.type == "cuda")
        staged.numpy()[...] = bits
        device = staged.to(self.device, non_blocking=True)
        if stack.dtype == np.uint8:
            return device.float()
        return (device.to(torch.int32) & 0xFFFF).float()

    def _download(self, out: torch.Tensor, dtype: np.dtype) -> np.ndarray:
        """Rounded, clamped float (N, H, W) on the device -> (N, H, W) host array of integer `dtype`."""
        if not self._compact:
            return out.to(torch.int32).cpu().numpy().astype(dtype)
        if dtype == np.uint8:
            return out.to(torch.uint8).cpu().numpy()
        # v - 32768 fits int16; its bits XOR the sign bit are v as uint16.
        shifted = (out.to(torch.int32) - 32768).to(torch.int16).cpu().numpy()
        return shifted.view(np.uint16) ^ np.uint16(0x8000)


_TORCH_INT = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16}


def _intensity_window(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile (low, high) exactly as `appliance.restoration.intensity.intensity_window`, computed on the device."""
    sample = pixels[:, ::SUBSAMPLE, ::SUBSAMPLE].reshape(pixels.shape[0], -1)
    q = torch.tensor([LOW_PERCENTILE / 100.0, HIGH_PERCENTILE / 100.0], device=pixels.device)
    low, high = torch.quantile(sample, q, dim=1)
    return low, torch.where(high <= low, low + 1.0, high)


def cuda_dtypes() -> list[torch.dtype]:
    """Reduced-precision dtypes to try on this GPU, fastest first (bf16 only where supported)."""
    dtypes = [torch.float16]
    if torch.cuda.is_bf16_supported():
        dtypes.append(torch.bfloat16)
    return dtypes
