"""BlurNet: a small patch CNN that estimates the defocus PSF of one 64x64 EM patch.

Input (N, 1, 64, 64) float32 in [0, 1]; output (N, 5) = [log(sigma + 0.5), log variance of that
(the net's own uncertainty: high on blank or noise-only patches), log anisotropy, cos 2θ, sin 2θ].
Per-patch standardisation is part of the network so the runtime only cuts and scales patches, and a
dark or low-contrast patch looks the same to the filters as a bright one.
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUTS = ("log_sigma", "log_var", "log_anisotropy", "cos2theta", "sin2theta")
LOG_OFFSET = 0.5  # output 0 = log(sigma + LOG_OFFSET): finite at 0 px; the sidecar tells the runtime


class ConvBlock(nn.Sequential):
    """3x3 convolution, batch norm (folded away at export), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class BlurNet(nn.Module):
    """Full-resolution first layer (focus lives in the finest detail), then stride-2 stages.

    Receptive field ~ 60 px, enough to see a PSF of sigma 6-8 px; ~4 M multiply-adds per patch.
    """

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 48, 64), eps: float = 2e-3) -> None:
        super().__init__()
        self.eps = eps
        layers = [ConvBlock(1, widths[0], 1)]
        layers += [ConvBlock(a, b, 2) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(widths[-1] + 1, 64), nn.ReLU(inplace=True), nn.Linear(64, 5))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        mean = patches.mean(dim=(2, 3), keepdim=True)
        std = patches.std(dim=(2, 3), keepdim=True)
        x = (patches - mean) / (std + self.eps)
        pooled = self.features(x).mean(dim=(2, 3))
        # log contrast lets the head tell "smooth because blank" from "smooth because blurred".
        log_contrast = torch.log(std.flatten(1) + self.eps)
        out = self.head(torch.cat([pooled, log_contrast], dim=1))
        log_var = out[:, 1:2].clamp(-8.0, 8.0)
        return torch.cat([out[:, :1], log_var, out[:, 2:]], dim=1)
