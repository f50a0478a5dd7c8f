"""The denoising CNN: a small residual U-Net that works at half resolution and below.

Why this shape: the node must denoise a 512x512 slice in <= 0.3 s on two CPU cores.  A
pixel-unshuffle (space-to-depth) by 2 first moves the work to 256x256, and a three-level
U-Net (24/48/96 channels) does most of it at 1/4 and 1/8 resolution, about 4.5 GMAC per
512x512 slice and 0.35 M parameters.  The network predicts the noise (residual) and subtracts
it; its last layer starts at zero so an untrained network is the identity.

Noise-level normalisation: scanners differ several-fold in noise (3 to 20 HU at full dose in
the shared series), and a network that sees only HU learns "noise below the training series'
full-dose level means full dose".  So the graph estimates the local noise level itself (a
robust high-pass estimate on 2x2-binned tissue pixels, lung to soft tissue, in 8x8 cells
smoothed over about 40 px), feeds the network the detail in units of that level plus its
logarithm, and scales the predicted residual by it: the same network serves a quiet head
scanner and a noisy chest one.

Contract (the worker relies on it): input float32 [N, 1, H, W] in HU, output the same shape in
HU.  Normalisation is inside the network; any H and W work because the input is padded
(replicate) to a multiple of 8 inside the graph and the output is cropped back.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: HU scale of the normalised input; noise level (HU) at which the log-level channel is zero.
HU_SCALE = 1000.0
LEVEL_REFERENCE = 10.0
#: Soft-tissue window of the second input channel (centre, half width), HU.
SOFT_CENTRE, SOFT_HALF = 40.0, 200.0
#: Pixels that take part in the noise estimate (HU): lung to soft tissue; no air (often clipped
#: at -1024 by the scanner, so noiseless), no filled field-of-view border, no bone.
ESTIMATE_RANGE = (-950.0, 350.0)
#: E|L| / sigma of the 3x3 high-pass L below for white noise (6 * sqrt(2 / pi)).
HIGHPASS_GAIN = 4.787
#: Cell (px) and smoothing (cells) of the noise map; floor of the noise level (HU).
NOISE_CELL, NOISE_SMOOTH, NOISE_FLOOR = 8, 5, 0.5
#: The estimate runs on 2x2-binned pixels: reconstruction kernels differ so much that a
#: full-resolution high-pass misses most of a smooth kernel's noise.
CELL_BINNED = NOISE_CELL // 2
#: Weight (in cells) of the image-wide level where a neighbourhood has little soft tissue.
GLOBAL_PRIOR = 0.25
#: Clip of the noise-normalised detail channel.
DETAIL_CLIP = 6.0


def _cell_level(high: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Mean of ``high`` over ``inside`` pixels per cell, smoothed; sparse cells lean on all."""
    sums = F.avg_pool2d(high * inside, CELL_BINNED)
    counts = F.avg_pool2d(inside, CELL_BINNED)
    pad = NOISE_SMOOTH // 2
    sums = F.avg_pool2d(sums, NOISE_SMOOTH, stride=1, padding=pad, count_include_pad=False)
    counts = F.avg_pool2d(counts, NOISE_SMOOTH, stride=1, padding=pad, count_include_pad=False)
    total = counts.sum(dim=(2, 3), keepdim=True).clamp(min=1e-3)
    image_wide = sums.sum(dim=(2, 3), keepdim=True) / total
    return ((sums + GLOBAL_PRIOR * image_wide) / (counts + GLOBAL_PRIOR)).clamp(min=NOISE_FLOOR)


def noise_map(x: torch.Tensor) -> torch.Tensor:
    """Local noise level (HU) of padded HU ``x`` [N, 1, H, W] on a grid of NOISE_CELL cells.

    Immerkaer's high-pass (a 3x3 second difference) of the 2x2-binned image, averaged over
    tissue pixels whose 3x3 neighbourhood is tissue too, so the edges of bone and air do not
    count as noise; a second pass clips values above three times the first estimate (small
    vessels, tissue borders).
    Cells with little tissue lean on the image-wide level.
    """
    x = F.avg_pool2d(x, 2)
    kernel = x.new_tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]).view(1, 1, 3, 3)
    high = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel).abs() / HIGHPASS_GAIN
    lo, hi = ESTIMATE_RANGE
    outside = ((x < lo) | (x > hi)).to(x.dtype)
    inside = 1.0 - F.max_pool2d(outside, 3, stride=1, padding=1)
    first = F.interpolate(_cell_level(high, inside), scale_factor=CELL_BINNED, mode="nearest")
    return _cell_level(torch.minimum(high, 3.0 * first), inside)


def _block(cin: int, cout: int, n: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DenoiseUNet(nn.Module):
    """Residual U-Net on pixel-unshuffled input; HU in, HU out."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.widths = widths
        self.unshuffle = nn.PixelUnshuffle(2)
        self.enc1 = _block(3 * 4 + 1, w1)
        self.down2 = nn.Sequential(nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.ReLU(True))
        self.enc2 = _block(w2, w2, 1)
        self.down3 = nn.Sequential(nn.Conv2d(w2, w3, 3, stride=2, padding=1), nn.ReLU(True))
        self.enc3 = _block(w3, w3, 2)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = _block(2 * w2, w2, 2)
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = _block(2 * w1, w1, 2)
        self.head = nn.Conv2d(w1, 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        """Denoised HU of the same shape as ``hu`` [N, 1, H, W]."""
        h, w = hu.shape[-2], hu.shape[-1]
        pad_h = (8 - h % 8) % 8
        pad_w = (8 - w % 8) % 8
        x = F.pad(hu, (0, pad_w, 0, pad_h), mode="replicate")
        level = noise_map(x)
        level_half = F.interpolate(level, scale_factor=NOISE_CELL // 2, mode="nearest")
        level_full = F.interpolate(level, scale_factor=NOISE_CELL, mode="nearest")
        wide = torch.clamp(x, -1100.0, 3000.0) / HU_SCALE
        soft = torch.clamp((x - SOFT_CENTRE) / SOFT_HALF, -1.5, 1.5)
        local_mean = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1, padding=0)
        detail = torch.clamp((x - local_mean) / level_full, -DETAIL_CLIP, DETAIL_CLIP)
        z = self.unshuffle(torch.cat([wide, soft, detail], dim=1))
        z = torch.cat([z, torch.log(level_half / LEVEL_REFERENCE)], dim=1)
        e1 = self.enc1(z)
        e2 = self.enc2(self.down2(e1))
        e3 = self.enc3(self.down3(e2))
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        noise = self.shuffle(self.head(d1)) * level_full
        return (x - noise)[:, :, :h, :w]


def build(config: dict | None = None) -> DenoiseUNet:
    """The network described by a training config's ``model`` section."""
    widths = tuple((config or {}).get("widths", (24, 48, 96)))
    return DenoiseUNet(widths)  # type: ignore[arg-type]


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters, for the log and the model card."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
