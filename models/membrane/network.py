"""MembraneUNet: a small U-Net (Ronneberger et al. 2015) that maps an EM tile to membrane probability.

Input: float32 (N, 1, H, W) on the model scale of `appliance.restoration.intensity` (the tile's 0.1-99.9 % window
mapped to [0, 1]); H and W multiples of `size_multiple` (2^downsamplings). `forward` returns logits
(training uses BCE with logits, which is stable); `probability` applies the sigmoid.
No global pooling or attention: every output pixel sees a bounded neighbourhood, so overlapped tiling
(`appliance.restoration.tiling.run_tiled`) matches whole-image inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU (the U-Net paper's unit, plus BN)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class MembraneUNet(nn.Module):
    """U-Net with `len(channels) - 1` downsamplings; channels[0] is the width at full resolution.

    channels: per resolution level, full resolution first; the last entry is the bottleneck (middle).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 64)) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"MembraneUNet: channels {tuple(channels)} needs at least 2 levels")
        self.channels = tuple(int(c) for c in channels)
        encoder_in = (1, *self.channels[:-2])
        self.encoders = nn.ModuleList(ConvBlock(i, o) for i, o in zip(encoder_in, self.channels[:-1], strict=True))
        self.pool = nn.MaxPool2d(2)
        self.middle = ConvBlock(self.channels[-2], self.channels[-1])
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(self.channels[level + 1], self.channels[level], 2, stride=2)
            for level in reversed(range(len(self.channels) - 1))
        )
        self.decoders = nn.ModuleList(
            ConvBlock(2 * self.channels[level], self.channels[level])
            for level in reversed(range(len(self.channels) - 1))
        )
        self.head = nn.Conv2d(self.channels[0], 1, 1)

    @property
    def size_multiple(self) -> int:
        """H and W of an input must be multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) model-scale pixels -> (N, 1, H, W) membrane logits."""
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.middle(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) model-scale pixels -> (N, 1, H, W) membrane probability in [0, 1]."""
        return torch.sigmoid(self.forward(x))
