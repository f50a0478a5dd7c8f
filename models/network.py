"""The denoising CNN: a small residual U-Net that works at half resolution and below.

Why this shape: the node must denoise a 512x512 slice in <= 0.3 s on two CPU cores.  A
pixel-unshuffle (space-to-depth) by 2 first moves the work to 256x256, and a three-level
U-Net (24/48/96 channels) does most of it at 1/4 and 1/8 resolution, about 4.5 GMAC per
512x512 slice and 0.35 M parameters.  The network predicts the noise (residual) in HU and
subtracts it, so full-dose input is left almost unchanged; its last layer starts at zero so an
untrained network is the identity.

Contract (the worker relies on it): input float32 [N, 1, H, W] in HU, output the same shape in
HU.  Normalisation is inside the network; any H and W work because the input is padded
(replicate) to a multiple of 8 inside the graph and the output is cropped back.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: HU scale of the normalised input and of the predicted noise.
HU_SCALE = 1000.0
NOISE_SCALE = 100.0
#: Soft-tissue window of the second input channel (centre, half width), HU.
SOFT_CENTRE, SOFT_HALF = 40.0, 200.0


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
        self.enc1 = _block(2 * 4, w1)
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
        wide = torch.clamp(x, -1100.0, 3000.0) / HU_SCALE
        soft = torch.clamp((x - SOFT_CENTRE) / SOFT_HALF, -1.5, 1.5)
        z = self.unshuffle(torch.cat([wide, soft], dim=1))
        e1 = self.enc1(z)
        e2 = self.enc2(self.down2(e1))
        e3 = self.enc3(self.down3(e2))
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        noise = self.shuffle(self.head(d1)) * NOISE_SCALE
        return (x - noise)[:, :, :h, :w]


def build(config: dict | None = None) -> DenoiseUNet:
    """The network described by a training config's ``model`` section."""
    widths = tuple((config or {}).get("widths", (24, 48, 96)))
    return DenoiseUNet(widths)  # type: ignore[arg-type]


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters, for the log and the model card."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
