"""Training patches: low-dose input, target and loss mask, drawn at random on the device.

Two sources of noise: the projection-domain simulation of each training series at fixed
doses (``low``, the series' own scanner texture, non-stationary like real CT), and noise of a
random texture and level synthesised in the image domain on the full-dose slices
(``models.grain``: other kernels, pixel sizes and doses from 5 % up, thick slices).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from models.grain import GrainBank
from node.pixels import FILL_HU

#: Synthetic inserts (PatchSampler._inserts): the ring is air; the edge has a partial-volume
#: blur of this sigma.
INSERT_RING_HU = -1000.0
INSERT_EDGE_SIGMA_PX = 0.7


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian (radius ``int(truncate * sigma + 0.5)``), normalised."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def gaussian_blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [N, H, W] with edge replication (scipy's mode="nearest")."""
    r = kernel.numel() // 2
    x = images[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


class PatchSampler:
    """Random training patches (input, target, loss mask) with dose, scale, flips and turns.

    The series are stacked once on the training device and each batch is one gather there,
    so a GPU never waits for the CPU.  The random numbers come from a seeded CPU generator:
    a seed draws the same patches on every machine.  ``profiles`` are the measured radial
    NPS (models.grain.phantom_profiles) that grain patches may take their texture from, and
    ``real_profiles`` those of real low-dose series (models.grain.real_profiles), drawn with
    probability ``grain_real_prob`` among measured textures; each series may carry its
    full-dose noise std as ``native_hu`` (else ``native_noise_hu``).
    """

    def __init__(
        self,
        data: list[dict],
        config: dict,
        device: torch.device | str = "cpu",
        seed: int = 0,
        profiles: list[np.ndarray] | None = None,
        real_profiles: list[np.ndarray] | None = None,
    ) -> None:
        if len({s["full"].shape[1:] for s in data}) != 1:
            raise ValueError("the training series must share one slice size")
        self.size, self.batch = int(config["patch"]), int(config["batch"])
        self.device = torch.device(device)
        self.doses = torch.tensor([float(d) for d in config["doses"]], device=self.device)
        weights = torch.tensor(config["dose_weights"], dtype=torch.float64)
        self.dose_weights = weights / weights.sum()
        self.keep_extra = float(config.get("keep_extra_noise") or 0.0)
        self.scale_prob = float(config.get("scale_prob", 0.0))
        self.scale_range = tuple(float(v) for v in config.get("scale_range", (1.0, 1.0)))
        self.kernel = gaussian_kernel(float(config.get("scale_sigma", 1.0))).to(self.device)
        self.insert_prob = float(config.get("insert_prob", 0.0))
        self.insert_radius = tuple(float(v) for v in config.get("insert_radius_px", (6, 30)))
        self.insert_ring = tuple(float(v) for v in config.get("insert_ring_px", (0, 30)))
        self.insert_hu = tuple(float(v) for v in config.get("insert_hu", (-100, 250)))
        self.edge_kernel = gaussian_kernel(INSERT_EDGE_SIGMA_PX).to(self.device)
        self.zoom_prob = float(config.get("zoom_prob", 0.0))
        self.zoom_range = tuple(float(v) for v in config.get("zoom_range", (1.0, 1.0)))
        # the source window of a zoomed patch: wide enough for the smallest zoom, and centred
        # on the patch's own pixels (same parity as the patch)
        window = math.ceil(self.size / min(self.zoom_range[0], 1.0))
        self.window = window + (window - self.size) % 2
        self.generator = torch.Generator().manual_seed(seed)
        counts = [s["full"].shape[0] for s in data]
        self.counts = torch.tensor(counts)
        self.offsets = torch.tensor(np.cumsum([0, *counts[:-1]]))
        self.grain_prob = float(config.get("grain_prob", 0.0))
        self.grain_dose = tuple(float(v) for v in config.get("grain_dose", (0.05, 0.9)))
        self.grain_level = tuple(float(v) for v in config.get("grain_level", (0.6, 2.5)))
        self.grain_tilt = float(config.get("grain_tilt", 0.4))
        self.slab_prob = float(config.get("slab_prob", 0.0))
        self.slab_max = int(config.get("slab_max", 3))
        self.grain = GrainBank(config, list(profiles or []), self.device, real_profiles)
        default_native = float(config.get("native_noise_hu", 10.0))
        self.native = torch.cat(
            [
                torch.full((n,), float(s.get("native_hu") or default_native))
                for n, s in zip(counts, data, strict=True)
            ]
        ).to(self.device)
        self.first = torch.cat(
            [torch.full((n,), int(o)) for n, o in zip(counts, self.offsets.tolist(), strict=True)]
        )
        self.last = torch.cat(
            [
                torch.full((n,), int(o + n - 1))
                for n, o in zip(counts, self.offsets.tolist(), strict=True)
            ]
        )
        self.full = self._stack([s["full"] for s in data])
        self.keep = self._stack([s["keep"] for s in data])
        self.low = torch.stack(
            [self._stack([s["low"][float(d)] for s in data]) for d in config["doses"]]
        )
        self._span = torch.arange(self.size, device=self.device)

    def _stack(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrays)).to(self.device)

    def _crop(
        self,
        stack: torch.Tensor,
        lead: tuple[torch.Tensor, ...],
        ys: torch.Tensor,
        xs: torch.Tensor,
        size: int | None = None,
    ) -> torch.Tensor:
        """``stack[lead..., y:y+S, x:x+S]`` for every patch at once (one gather); S is the
        patch size unless given."""
        span = self._span if size is None else torch.arange(size, device=self.device)
        rows = (ys.to(self.device)[:, None] + span)[:, :, None]
        cols = (xs.to(self.device)[:, None] + span)[:, None, :]
        return stack[tuple(i.to(self.device)[:, None, None] for i in lead) + (rows, cols)]

    def _zoom(
        self,
        chosen: torch.Tensor,
        zoom: torch.Tensor,
        places: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        patches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target, input and mask with the chosen patches resampled by ``zoom`` (output
        pixels per source pixel) about their centres, bilinear, input and target alike.

        The network's noise removal depends on the size of the grain in pixels, which pixel
        spacing and kernel set: 2.2.0 removed 54 % of the held-out head's noise at 25 % dose
        but 25 % once the head was resampled by 1.3 or 0.6, and the phantom (0.45 mm pixels,
        coarse grain) got most (44 %) at 0.7.  Zoomed patches teach it other grain sizes;
        the shipped model does not use them (they made it alter thin air channels on
        full-dose input: models/TRAINING_LOG.md).
        """
        index, dose, ys, xs = places
        target, inp, mask = (a.clone() for a in patches)
        pick = chosen.nonzero().squeeze(1)
        h, w = self.full.shape[1:]
        q, margin = self.window, (self.window - self.size) // 2
        wy = (ys[pick] - margin).clamp(0, h - q)
        wx = (xs[pick] - margin).clamp(0, w - q)
        sources = torch.stack(
            [
                self._crop(self.full, (index[pick],), wy, wx, q),
                self._crop(self.low, (dose[pick], index[pick]), wy, wx, q),
                self._crop(self.keep, (index[pick],), wy, wx, q).to(target.dtype),
            ],
            dim=1,
        )
        theta = torch.zeros(len(pick), 2, 3, device=self.device)
        scale = self.size / (zoom[pick].to(self.device) * q)
        theta[:, 0, 0], theta[:, 1, 1] = scale, scale
        grid = F.affine_grid(theta, [len(pick), 3, self.size, self.size], align_corners=False)
        out = F.grid_sample(sources, grid, mode="bilinear", align_corners=False)
        target[pick], inp[pick], mask[pick] = out[:, 0], out[:, 1], out[:, 2] < 0.5
        return target, inp, mask

    def _places(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slice and corner of each patch; mostly-air patches are kept only 5 % of the time."""
        g, n = self.generator, 2 * self.batch
        h, w = self.full.shape[1:]
        found: list[torch.Tensor] = []
        while sum(len(f) for f in found) < self.batch:
            series = torch.randint(len(self.counts), (n,), generator=g)
            index = self.offsets[series] + (torch.rand(n, generator=g) * self.counts[series]).long()
            ys = torch.randint(h - self.size + 1, (n,), generator=g)
            xs = torch.randint(w - self.size + 1, (n,), generator=g)
            lucky = torch.rand(n, generator=g) < 0.05
            body = (self._crop(self.full, (index,), ys, xs) > -900).float().mean(dim=(1, 2))
            accept = (body.cpu() >= 0.2) | lucky
            found.append(torch.stack([index, ys, xs])[:, accept])
        index, ys, xs = torch.cat(found, dim=1)[:, : self.batch]
        return index, ys, xs

    def _uniform(self, n: int, bounds: tuple[float, float]) -> torch.Tensor:
        lo, hi = bounds
        return (lo + (hi - lo) * torch.rand(n, generator=self.generator)).to(self.device)

    def _log_uniform(self, n: int, bounds: tuple[float, float]) -> torch.Tensor:
        """Factors drawn log-uniformly in ``bounds`` (on the CPU, like every draw)."""
        lo, hi = np.log(bounds[0]), np.log(bounds[1])
        return torch.exp(lo + (hi - lo) * torch.rand(n, generator=self.generator)).float()

    def _inserts(
        self, inp: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, d: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and target with a uniform disc, most in a ring of air, in some patches.

        Phantom inserts and small structures surrounded by air are missing from patient
        series, and a network trained on patients alone leaves them noisy (a 100 HU disc of
        20 px radius in an air ring: 0 % noise removed; the same disc in brain: 24 %).  Inside
        the insert the input carries the patch's own simulated extra noise ``e`` where it is,
        and both input and target carry full-dose-like noise: ``e`` turned by 180 degrees
        (another place, so independent of it) and scaled to the full-dose variance, which is
        d / (1 - d) times the extra variance at dose ``d`` (per patch).  The edge has a
        partial-volume blur.
        """
        b, p = target.shape[0], self.size
        chosen = (torch.rand(b, generator=self.generator) < self.insert_prob).to(self.device)
        cy, cx = self._uniform(b, (0, p - 1)), self._uniform(b, (0, p - 1))
        radius = self._uniform(b, self.insert_radius)
        outer = radius + self._uniform(b, self.insert_ring)
        inside_hu = self._uniform(b, self.insert_hu)
        k = (slice(None), None, None)
        yy = self._span.to(target.dtype)[None, :, None]
        xx = self._span.to(target.dtype)[None, None, :]
        r = torch.sqrt((yy - cy[k]) ** 2 + (xx - cx[k]) ** 2)
        content = torch.where(r < radius[k], inside_hu[k], torch.full_like(r, INSERT_RING_HU))
        content = gaussian_blur(content, self.edge_kernel)
        weight = gaussian_blur((r < outer[k]).to(target.dtype), self.edge_kernel)
        weight = torch.where(chosen[k] & mask, weight, torch.zeros_like(weight))
        extra = (inp - target) / (1.0 - self.keep_extra)
        full_like = torch.sqrt(torch.where(d < 1, d / (1 - d).clamp(min=1e-6), 0.0))
        native = full_like[k] * extra.flip(-1, -2)
        inp = inp + weight * (content + native + extra - inp)
        target = target + weight * (content + native + self.keep_extra * extra - target)
        return inp, target

    def _slab(
        self, index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, thickness: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-dose patches averaged over ``thickness`` neighbouring slices of their series
        (a thick-slice reconstruction), and the pixels inside the field of view in all."""
        total = torch.zeros(len(index), self.size, self.size, device=self.device)
        inside = torch.ones_like(total, dtype=torch.bool)
        # the slab starts early enough to end inside the series
        start = torch.maximum(
            torch.minimum(index, self.last[index] - thickness + 1), self.first[index]
        )
        for j in range(self.slab_max):
            layer = torch.minimum(start + j, self.last[index])
            used = (j < thickness).to(self.device)[:, None, None]
            crop = self._crop(self.full, (layer,), ys, xs)
            total = total + torch.where(used, crop, torch.zeros_like(crop))
            inside &= ~(used & self._crop(self.keep, (layer,), ys, xs))
        return total / thickness.to(self.device)[:, None, None], inside

    def _grain(
        self,
        places: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        patches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        dose_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input, target, mask and dose with noise of a random texture in some patches.

        The chosen patches' input is their full-dose patch (or a thick slab of it) plus
        :class:`models.grain.GrainBank` noise at a dose drawn log-uniformly in grain_dose:
        the extra std is the series' own full-dose noise times ``sqrt(1 / d - 1)``, times a
        log-uniform factor for sharper or smoother kernels, with a linear tilt across the
        patch (real noise is not stationary).  The target is the full-dose patch.
        """
        index, ys, xs = places
        target, inp, mask = patches
        g, b, p = self.generator, len(index), self.size
        chosen = (torch.rand(b, generator=g) < self.grain_prob).to(self.device)
        lo, hi = (math.log(v) for v in self.grain_dose)
        dose = torch.exp(self._uniform(b, (lo, hi)))
        level = self._log_uniform(b, self.grain_level).to(self.device)
        thick = torch.where(
            torch.rand(b, generator=g) < self.slab_prob,
            torch.randint(2, self.slab_max + 1, (b,), generator=g),
            torch.ones(b, dtype=torch.long),
        )
        tilt = self._uniform(b, (-self.grain_tilt, self.grain_tilt))
        angle = self._uniform(b, (0.0, 2 * math.pi))
        noise = self.grain.draw(b, p, g)
        full, inside = self._slab(index, ys, xs, thick)
        ramp = (self._span.to(full.dtype) - (p - 1) / 2) / p
        k = (slice(None), None, None)
        field = 1 + tilt[k] * (
            torch.cos(angle)[k] * ramp[None, :, None] + torch.sin(angle)[k] * ramp[None, None, :]
        )
        sigma = self.native[index.to(self.device)] * level * torch.sqrt(1 / dose - 1)
        mask_new = mask & inside
        fill = torch.tensor(FILL_HU, device=self.device)
        noisy = torch.where(mask_new, full + sigma[k] * field * noise, fill)
        full = torch.where(mask_new, full, fill)
        c = chosen[k]
        return (
            torch.where(c, noisy, inp),
            torch.where(c, full, target),
            torch.where(c, mask_new, mask),
            torch.where(chosen, dose, dose_value),
        )

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch: input and target [B, 1, P, P] in HU, loss mask (body pixels) as float."""
        g, b = self.generator, self.batch
        index, ys, xs = self._places()
        dose = torch.multinomial(self.dose_weights, b, replacement=True, generator=g)
        scaled = torch.rand(b, generator=g) < self.scale_prob
        factor = self._log_uniform(b, self.scale_range)
        turns = torch.randint(4, (b,), generator=g)
        flips = torch.randint(2, (b,), generator=g).bool()

        target = self._crop(self.full, (index,), ys, xs)
        inp = self._crop(self.low, (dose, index), ys, xs)
        mask = ~self._crop(self.keep, (index,), ys, xs)
        if self.zoom_prob:
            zoomed = torch.rand(b, generator=g) < self.zoom_prob
            zoom = self._log_uniform(b, self.zoom_range)
            if zoomed.any():
                target, inp, mask = self._zoom(
                    zoomed, zoom, (index, dose, ys, xs), (target, inp, mask)
                )
        dose_value = self.doses[dose.to(self.device)]
        if self.grain_prob:
            inp, target, mask, dose_value = self._grain(
                (index, ys, xs), (target, inp, mask), dose_value
            )
        if self.keep_extra:
            # Aim at a full-dose look, not below it: the best estimate of the full-dose image
            # also removes most of its grain (a plastic texture); keeping a fraction of the
            # extra noise in the target lands the output near full-dose noise instead.
            low_dose = (dose_value < 1)[:, None, None]
            target = torch.where(low_dose, target + self.keep_extra * (inp - target), target)
        if scaled.any():
            # Quieter scanners: shrink the detail (noise and fine contrast) around a smooth
            # local mean, so the model sees noise levels below those of the training series.
            k = factor.to(self.device)[:, None, None]
            chosen = scaled.to(self.device)[:, None, None]
            smooth = gaussian_blur(target, self.kernel)
            fill = torch.tensor(FILL_HU, device=self.device)
            inp = torch.where(chosen, torch.where(mask, smooth + k * (inp - smooth), fill), inp)
            target = torch.where(
                chosen, torch.where(mask, smooth + k * (target - smooth), fill), target
            )
        if self.insert_prob:
            inp, target = self._inserts(inp, target, mask, dose_value)
        out = []
        for a in (inp, target, mask.float()):
            a = a.clone()
            for t in range(1, 4):
                turn = (turns == t).to(self.device)
                a[turn] = torch.rot90(a[turn], t, dims=(1, 2))
            flip = flips.to(self.device)
            a[flip] = a[flip].flip(-1)
            out.append(a[:, None])
        return out[0], out[1], out[2]
