"""DeblurNet: a small NAFNet-style U-Net (Chen et al., "Simple Baselines for Image Restoration", 2022).

Kept from NAFNet: LayerNorm2d, depthwise 3x3 convolutions, SimpleGate instead of activations, the
feed-forward half of each block, per-block learned residual scales, strided-conv down / PixelShuffle up,
a global residual (the network predicts the correction to its input).
Dropped: Simplified Channel Attention. Its global average pool makes every output pixel depend on the
whole input, so a patch would restore differently from the same pixels inside a 2400 x 2400 tile
(the train/test mismatch NAFNet's authors fix with TLC); without it the network is local, and tiled
inference equals whole-image inference up to the blended patch borders.

Added (``noise_map=True``): a fixed, local noise-level channel (`NoiseLevelMap`) beside the pixels.
Without it the network hedged between noise levels: on clean tiles it smoothed like on noisy ones.

Added (``psf_planes=True``, deblur v3): the blur detector's estimate as extra input planes
(`appliance.restoration.psf_planes`: known flag, tile sigma, local sigma from the region map, astigmatism vector),
concatenated to the pixels at the intro convolution. The planes are per-pixel functions of the tile
position, so cutting them with the pixels keeps tiled inference exact; all-zero planes (known = 0) are
the blind path, trained alongside.

Input: float32 (N, 1 + n_planes, H, W): channel 0 the pixels on the scale of
`appliance.restoration.intensity.to_model_scale`, then the planes in `PLANE_NAMES` order (none for a blind model).
Output: float32 (N, 1, H, W). H and W must be multiples of 2 ** len(enc_blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from appliance.noise import IMMERKAER_L2_NORM, IMMERKAER_MASK
from appliance.restoration.psf_planes import PLANE_NAMES

TILE_SIDE_PX = 2400  # the MultiSEM tile the GFLOP figure is quoted for


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel (N, C, H, W)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            # Mixed-precision training: statistics in fp32 (bf16 keeps 8 mantissa bits). Exported
            # programs (traced in fp32, no autocast) never take this branch, so they carry no casts.
            return self._normalise(x.float()).to(x.dtype)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class SimpleGate(nn.Module):
    """Split channels in two halves and multiply them: NAFNet's replacement for GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """Spatial mixing (1x1 -> depthwise 3x3 -> gate -> 1x1) then a gated feed-forward, both residual."""

    def __init__(self, channels: int, expand: int = 2) -> None:
        super().__init__()
        hidden = channels * expand
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.conv3 = nn.Conv2d(hidden // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, hidden, 1)
        self.conv5 = nn.Conv2d(hidden // 2, channels, 1)
        self.gate = SimpleGate()
        # Zero-initialised residual scales: every block starts as the identity (stable early training).
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.gate(self.conv2(self.conv1(self.norm1(x)))))
        x = x + y * self.beta
        y = self.conv5(self.gate(self.conv4(self.norm2(x))))
        return x + y * self.gamma


class NoiseLevelMap(nn.Module):
    """Local noise level: log of the mean |second difference| over a `window` x `window` box.

    The operator is Immerkaer's (1996) noise estimator, scaled to unit L2 norm, so on white noise of std s
    the box mean is s * sqrt(2 / pi). Blur removes the image's own second differences, so on a soft tile
    the map reads mostly noise. It is local (radius window // 2 + 1 px): tiled inference stays exact.
    Fixed weights, no parameters; the log is centred on a typical level (e^-4 ~ 0.018 on the model scale).
    """

    def __init__(self, window: int = 21) -> None:
        super().__init__()
        kernel = torch.from_numpy(IMMERKAER_MASK) / IMMERKAER_L2_NORM  # appliance.noise: one operator
        self.register_buffer("kernel", kernel[None, None], persistent=False)
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.window
        energy = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel).abs()
        energy = F.avg_pool2d(energy, (1, w), stride=1, padding=(0, w // 2), count_include_pad=False)
        energy = F.avg_pool2d(energy, (w, 1), stride=1, padding=(w // 2, 0), count_include_pad=False)
        return torch.log(energy + 1e-3) + 4.0


class DeblurNet(nn.Module):
    """U-Net of NAFBlocks: `width` channels at full resolution, doubled at each of the encoder levels."""

    def __init__(
        self,
        width: int = 16,
        enc_blocks: tuple[int, ...] = (1, 1, 2),
        middle_blocks: int = 2,
        dec_blocks: tuple[int, ...] = (1, 1, 1),
        noise_map: bool = False,
        psf_planes: bool = False,
    ) -> None:
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(f"enc_blocks {enc_blocks} and dec_blocks {dec_blocks} need the same length")
        self.noise_map = NoiseLevelMap() if noise_map else None
        self.plane_count = len(PLANE_NAMES) if psf_planes else 0
        self.input_channels = 1 + self.plane_count
        self.intro = nn.Conv2d(self.input_channels + (1 if noise_map else 0), width, 3, padding=1)
        self.ending = nn.Conv2d(width, 1, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        channels = width
        for count in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(channels) for _ in range(count)]))
            self.downs.append(nn.Conv2d(channels, channels * 2, 2, stride=2))
            channels *= 2
        self.middle = nn.Sequential(*[NAFBlock(channels) for _ in range(middle_blocks)])
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for count in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(channels, channels * 2, 1, bias=False), nn.PixelShuffle(2)))
            channels //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(channels) for _ in range(count)]))
        self.size_multiple = 2 ** len(enc_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x[:, :1] if self.plane_count else x
        stacked = [pixels]
        if self.noise_map is not None:
            stacked.append(self.noise_map(pixels))
        if self.plane_count:
            stacked.append(x[:, 1:])
        features = self.intro(stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1))
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            features = encoder(features)
            skips.append(features)
            features = down(features)
        features = self.middle(features)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips), strict=True):
            features = decoder(up(features) + skip)
        return pixels + self.ending(features)


def conv_gflop(model: nn.Module, height: int, width: int) -> float:
    """GFLOP (2 x multiply-adds of every convolution) for one (1, C, height, width) input.

    Counted on a small probe with forward hooks and scaled by area: every layer is convolutional, so the
    cost is linear in the pixel count. Elementwise work (norms, gates) is left out (< 5 %).
    """
    probe_side = 8 * getattr(model, "size_multiple", 1)
    macs = [0]

    def count(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        macs[0] += output.numel() * (module.in_channels // module.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        channels = getattr(model, "input_channels", 1)
        with torch.inference_mode():
            model(torch.zeros(1, channels, probe_side, probe_side))
    finally:
        for hook in hooks:
            hook.remove()
    return 2.0 * macs[0] * (height * width) / (probe_side * probe_side) / 1e9
