"""Validation by series: noise removal on the Catphan modules, lesion contrast kept on them
and on real low-dose patient series.

Checkpoints and settings are chosen here, never on the held-out series (models.data).  Each
Catphan slice (a centre crop) gets, with fixed seeds, noise of each texture in TEXTURES at
each configured dose below 1: the extra std is the slice's own measured full-dose noise
times ``sqrt(1 / d - 1)``; its error is the mean absolute error against the full-dose slice,
inside the field of view, averaged over textures, per dose.

The Catphan modules are uniform plastic: on them more removal is always better, and a
checkpoint that erased fine anatomy with fine grain scored best (issue #17, session 9: held
out, 3 mm lesions kept 65-75 % against 2.2.0's 75-80 %).  So the selection score adds the
contrast lost by small discs (LESION_DIAMETERS_MM at LESION_CONTRAST_HU, the evaluation's
``--lesions`` method) planted in flat tissue of the Catphan inputs at LESION_DOSE (every
texture) and of real low-dose patient slices (REAL_LOWDOSE_VALIDATION: real anatomy around
them, real noise): ``score = mean MAE + lesion_weight * contrast lost (%)``.  The contrast
lost pools the discs of both sources as ``validation_lesion_pooling`` says (session 12: the
60 real discs weigh as much as the 216 Catphan ones, or the worse source counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from models import metrics
from models.data import (
    REAL_LOWDOSE_VALIDATION,
    SHARED_CT,
    SHARED_LOWDOSE,
    VALIDATION_SERIES,
    load_series,
)
from models.evaluate.lesions import lesion_centres
from models.evaluate.regions import body_slices, pick_slices
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
#: The lesions of the score: the sizes most at risk, at a contrast in the issue's 5-20 HU.
LESION_DIAMETERS_MM = (3.0, 5.0)
LESION_CONTRAST_HU = 10.0
LESION_DOSE = 0.25
#: Discs per diameter and slice; slices per real low-dose series.
LESIONS_PER_SLICE, REAL_SLICES = 3, 2
#: Score per percentage point of lesion contrast lost (HU): 4 points cost 1 HU of MAE,
#: about what the grain run gained on the Catphan MAE (6.04 -> 5.05 HU) while it lost
#: 4-5 points on the 3-5 mm lesions.
DEFAULT_LESION_WEIGHT = 0.25
LESION_LOST = "lesion_lost"


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
        out.append(
            {
                "name": name,
                "full": full,
                "mask": mask,
                "inputs": inputs,
                "pixel_mm": series.pixel_mm,
            }
        )
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


@dataclass
class LesionSet:
    """Inputs without and with planted discs [N, 1, H, W]; ``labels`` numbers the discs'
    pixels 1..K (0 elsewhere) and ``planted`` is each disc's mean planted HU [K]."""

    name: str
    plain: torch.Tensor
    with_discs: torch.Tensor
    labels: torch.Tensor
    planted: torch.Tensor


def plant_discs(
    images: np.ndarray, keep: np.ndarray, pixel_mm: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Discs of every LESION_DIAMETERS_MM (partial-volume edges) in flat soft tissue of each
    slice [N, H, W], far apart; returns the discs' image and their labels (1..K)."""
    discs = np.zeros(images.shape, np.float64)
    labels = np.zeros(images.shape, np.int64)
    yy, xx = np.indices(images.shape[1:])
    largest = max(LESION_DIAMETERS_MM) / 2 / pixel_mm
    count = LESIONS_PER_SLICE * len(LESION_DIAMETERS_MM)
    for i, image in enumerate(images):
        centres = lesion_centres(image, keep[i], largest, count, rng)
        for j, centre in enumerate(centres):
            radius = LESION_DIAMETERS_MM[j % len(LESION_DIAMETERS_MM)] / 2 / pixel_mm
            discs[i] = metrics.add_disc(discs[i], centre, radius, LESION_CONTRAST_HU)
            inside = np.hypot(yy - centre[0], xx - centre[1]) <= radius
            labels[i][inside] = labels.max() + 1
    return discs, labels


def lesion_set(name: str, plain: torch.Tensor, discs: np.ndarray, labels: np.ndarray) -> LesionSet:
    """A LesionSet of ``plain`` [N, 1, H, W] plus ``discs`` [N, H, W]."""
    discs_t = torch.from_numpy(discs.astype(np.float32))[:, None]
    labels_t = torch.from_numpy(labels)[:, None]
    k = int(labels.max()) + 1
    sums = torch.bincount(labels_t.reshape(-1), discs_t.reshape(-1), minlength=k)
    sizes = torch.bincount(labels_t.reshape(-1), minlength=k).clamp(min=1)
    return LesionSet(name, plain, plain + discs_t, labels_t, (sums / sizes)[1:])


def build_lesions(config: dict, catphan: list[dict]) -> list[LesionSet]:
    """Discs in the Catphan inputs at LESION_DOSE (every texture) and in REAL_SLICES real
    low-dose slices of each ``validation_lesion_series`` (default REAL_LOWDOSE_VALIDATION)."""
    rng = np.random.default_rng(VALIDATION_SEED + 7)
    out = []
    for series in catphan:
        full = series["full"][:, 0].numpy()
        keep = ~series["mask"][:, 0].numpy()
        discs, labels = plant_discs(full, keep, series["pixel_mm"], rng)
        for (name, value, dose), noisy in series["inputs"].items():
            if dose == LESION_DOSE:
                out.append(lesion_set(f"{series['name']} {name} {value:g}", noisy, discs, labels))
    for name in config.get("validation_lesion_series", REAL_LOWDOSE_VALIDATION):
        if name not in REAL_LOWDOSE_VALIDATION:
            raise ValueError(f"{name} is not a real low-dose validation series")
        series = load_series(SHARED_LOWDOSE / name)
        chosen = pick_slices(body_slices(series.hu, series.keep), REAL_SLICES)
        hu = np.where(series.keep, np.float32(FILL_HU), series.hu)[chosen]
        discs, labels = plant_discs(hu, series.keep[chosen], series.pixel_mm, rng)
        out.append(lesion_set(name, torch.from_numpy(hu)[:, None], discs, labels))
    return out


@torch.no_grad()
def lesion_contrast_kept(
    model: torch.nn.Module, lesions: list[LesionSet], device: torch.device
) -> dict[str, float]:
    """Mean contrast kept (%) of the discs of the Catphan inputs and of the real slices,
    ``mean over the disc of (D(input + discs) - D(input)) / planted``, and the percentage
    points lost over all of them (LESION_LOST)."""
    model.eval()
    kept: dict[str, list[torch.Tensor]] = {"catphan": [], "real": []}
    for s in lesions:
        difference = model(s.with_discs.to(device)) - model(s.plain.to(device))
        flat = s.labels.reshape(-1).to(device)
        k = len(s.planted) + 1
        sums = torch.bincount(flat, difference.reshape(-1).double(), minlength=k)[1:]
        sizes = torch.bincount(flat, minlength=k)[1:].clamp(min=1)
        source = "real" if s.name in REAL_LOWDOSE_VALIDATION else "catphan"
        kept[source].append(100.0 * (sums / sizes).cpu() / s.planted.double())
    model.train()
    out = {f"lesion_kept_{k}": float(torch.cat(v).mean()) for k, v in kept.items() if v}
    every = torch.cat([torch.cat(v) for v in kept.values() if v])
    out[LESION_LOST] = 100.0 - float(every.mean())
    return out


#: How the points lost by the discs of the two sources (Catphan inputs, real low-dose
#: slices) are pooled in the score (config key ``validation_lesion_pooling``):
#: ``discs`` (the default, sessions 10-11): the mean over all discs, so the 216 Catphan discs
#: outweigh the 60 real ones 3.6 to 1; ``sources``: the mean over the two sources of each
#: source's mean points lost; ``worst``: the larger of the two sources' points lost.
LESION_POOLINGS = ("discs", "sources", "worst")


def lesion_points_lost(found: dict[str, float], pooling: str = "discs") -> float:
    """Percentage points of lesion contrast lost, pooled over the sources as ``pooling``
    says (LESION_POOLINGS); 0 where no lesion was measured."""
    if pooling not in LESION_POOLINGS:
        raise ValueError(f"validation_lesion_pooling {pooling!r}: one of {LESION_POOLINGS}")
    if LESION_LOST not in found:
        return 0.0
    if pooling == "discs":
        return found[LESION_LOST]
    lost = [100.0 - v for k, v in found.items() if k.startswith("lesion_kept_")]
    return float(np.mean(lost)) if pooling == "sources" else float(max(lost))


def selection_score(
    found: dict[str, float],
    lesion_weight: float = DEFAULT_LESION_WEIGHT,
    pooling: str = "discs",
) -> float:
    """Lower is better: mean MAE over doses (HU) plus ``lesion_weight`` HU per percentage
    point of lesion contrast lost (where measured), pooled over the sources by ``pooling``."""
    errors = [v for k, v in found.items() if not k.startswith("lesion")]
    return float(np.mean(errors)) + lesion_weight * lesion_points_lost(found, pooling)


def config_score(found: dict[str, float], config: dict) -> float:
    """:func:`selection_score` with the config's ``validation_lesion_weight`` (none: 0) and
    ``validation_lesion_pooling`` (none: ``discs``, as every config before session 12)."""
    weight = float(config.get("validation_lesion_weight") or 0.0)
    return selection_score(found, weight, str(config.get("validation_lesion_pooling", "discs")))
