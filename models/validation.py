"""Validation by series: the Catphan modules with noise of several textures and doses.

Checkpoints and settings are chosen here, never on the held-out series (models.data).  Each
validation slice (a centre crop) gets, with fixed seeds, noise of each texture in TEXTURES
at each configured dose below 1: the extra std is the slice's own measured full-dose noise
times ``sqrt(1 / d - 1)``.  The score is the mean absolute error against the full-dose slice,
inside the field of view, averaged over textures, per dose.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.data import SHARED_CT, VALIDATION_SERIES, load_series
from models.grain import (
    WATER_PHANTOMS,
    WINDOWS,
    analytic_nps,
    measure_nps,
    phantom_profiles,
    radial_frequency,
    shaped_noise,
    stretched_profile,
)
from node.pixels import FILL_HU

#: Analytic textures (window, cutoff in cycles/px) and measured ones (phantom, pixel scale).
ANALYTIC_TEXTURES = (("ramp", 0.5), ("shepp-logan", 0.35), ("hann", 0.25))
MEASURED_TEXTURES = ((WATER_PHANTOMS[1], 1.0), (WATER_PHANTOMS[2], 0.7), (WATER_PHANTOMS[0], 1.4))
VALIDATION_SEED = 20261207


def texture_nps(size: int, texture: tuple[str, float]) -> torch.Tensor:
    """The [1, size, size] NPS shape of one named texture."""
    radius = radial_frequency(size)
    name, value = texture
    if name in WINDOWS:
        window = torch.tensor([WINDOWS.index(name)])
        return analytic_nps(radius, window, torch.tensor([value]))
    profile = torch.tensor(phantom_profiles((name,))[name], dtype=torch.float32)[None]
    return stretched_profile(profile, radius, torch.tensor([value]))


def build_validation(config: dict) -> list[dict]:
    """Per validation series: full-dose crops, their mask and the noisy inputs by texture and
    dose, as CPU tensors [N, 1, C, C]."""
    crop = int(config["val_crop"])
    out = []
    for i, name in enumerate(config.get("validation_series", VALIDATION_SERIES)):
        if name not in VALIDATION_SERIES:
            raise ValueError(f"{name} is not a validation series")
        series = load_series(SHARED_CT / name)
        _, native = measure_nps(series)
        n, h, w = series.hu.shape
        y0, x0 = (h - crop) // 2, (w - crop) // 2
        window = (slice(None), slice(y0, y0 + crop), slice(x0, x0 + crop))
        full = torch.from_numpy(series.hu[window].copy())[:, None]
        mask = ~torch.from_numpy(series.keep[window].copy())[:, None]
        full = torch.where(mask, full, torch.tensor(FILL_HU))
        inputs = {}
        for t, texture in enumerate(ANALYTIC_TEXTURES + MEASURED_TEXTURES):
            nps = texture_nps(crop, texture).expand(n, crop, crop)
            for dose in (float(d) for d in config["doses"] if float(d) < 1):
                g = torch.Generator().manual_seed(VALIDATION_SEED + 1000 * i + 10 * t)
                noise = shaped_noise(nps.contiguous(), g)[:, None]
                sigma = native * math.sqrt(1 / dose - 1)
                inputs[(texture[0], texture[1], dose)] = torch.where(
                    mask, full + sigma * noise, full
                )
        out.append({"name": name, "full": full, "mask": mask, "inputs": inputs})
    return out


@torch.no_grad()
def validate_by_series(
    model: torch.nn.Module, val: list[dict], device: torch.device
) -> dict[str, float]:
    """Mean absolute error (HU, field of view) per dose, over series and textures."""
    model.eval()
    errors: dict[str, list[float]] = {}
    for series in val:
        full, mask = series["full"].to(device), series["mask"].to(device)
        for (_, _, dose), noisy in series["inputs"].items():
            pred = model(noisy.to(device))
            errors.setdefault(f"{dose:g}", []).append(float((pred - full).abs()[mask].mean()))
    model.train()
    return {dose: float(np.mean(v)) for dose, v in errors.items()}
