"""Small low-contrast lesions: how much of their contrast survives denoising.

    python -m models.evaluate --lesions [--slices 2]

The fear (issue #17): a denoiser that erases a tiny early tumour along with the noise.
Discs of LESION_DIAMETERS_MM at LESION_CONTRASTS_HU, with partial-volume edges, are placed
in flat soft tissue of held-out full-dose slices, up to LESIONS_PER_SLICE of each kind per
slice, far apart.  The 25 % dose slice is simulated without them and the discs are added to
it: the simulation only adds noise, and a 5-20 HU change in attenuation changes that noise
by well under 1 %, so this is the slice simulated with the lesions, while both images share
one noise realisation.  Then

    contrast kept = mean over the disc of (D(low + discs) - D(low)) / mean of the disc

in which the noise cancels except where the method treats it differently because of the
lesion.  Target: >= 90 % for every kind.  The CHO d' of every kind, on the same slices
over independent noise realisations (at uniform places of its own), is in ``lesion_cho``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from models import metrics
from models.data import SHARED_CT, CTSeries, load_series
from models.evaluate.cases import simulate_slices
from models.evaluate.common import EVAL_SEED, Log
from models.evaluate.methods import measure_series
from models.evaluate.regions import body_slices, pick_slices
from models.evaluate.texture import flat_tissue

LESION_DIAMETERS_MM = (3.0, 5.0, 10.0)
LESION_CONTRASTS_HU = (5.0, 10.0, 20.0)
LESIONS_PER_SLICE = 4
LESION_DOSE = 0.25
LESION_SEED = EVAL_SEED + 20
#: Flat tissue kept around each disc (px) and the gap between two discs (in radii).
MARGIN_PX, SPACING_RADII = 3, 6.0

Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]


def lesion_centres(
    full: np.ndarray, keep: np.ndarray, radius_px: float, count: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Up to ``count`` centres whose disc (plus MARGIN_PX) lies in flat soft tissue, at least
    SPACING_RADII radii apart, drawn at random among the places that fit."""
    room = ndi.distance_transform_edt(flat_tissue(full, keep))
    places = np.argwhere(room >= radius_px + MARGIN_PX)
    chosen: list[tuple[int, int]] = []
    for y, x in places[rng.permutation(len(places))]:
        if all(np.hypot(y - cy, x - cx) >= SPACING_RADII * radius_px for cy, cx in chosen):
            chosen.append((int(y), int(x)))
            if len(chosen) == count:
                break
    return chosen


def contrast_kept(
    low: np.ndarray,
    keep: np.ndarray,
    method: Denoiser,
    centres: list[tuple[int, int]],
    radius_px: float,
    contrast_hu: float,
) -> list[float]:
    """Per disc: the share (%) of its contrast (partial volume included) that is in
    D(low + discs) - D(low), over the disc's pixels."""
    with_discs = low.astype(np.float64)
    for centre in centres:
        with_discs = metrics.add_disc(with_discs, centre, radius_px, contrast_hu)
    discs = with_discs - low
    difference = method(with_discs.astype(np.float32), keep) - method(low, keep)
    yy, xx = np.indices(low.shape)
    kept = []
    for cy, cx in centres:
        inside = np.hypot(yy - cy, xx - cx) <= radius_px
        kept.append(100.0 * float(difference[inside].mean()) / float(discs[inside].mean()))
    return kept


@dataclass
class Site:
    """One held-out slice of the lesion checks with the contrast check's disc places, per
    diameter (mm)."""

    series: CTSeries
    index: int  # slice of ``series``
    low: np.ndarray  # at LESION_DOSE, the LESION_SEED realisation, without discs
    centres: dict[float, list[tuple[int, int]]]

    @property
    def full(self) -> np.ndarray:
        return np.asarray(self.series.hu[self.index])

    @property
    def keep(self) -> np.ndarray:
        return np.asarray(self.series.keep[self.index])

    def radius_px(self, diameter_mm: float) -> float:
        return diameter_mm / 2 / self.series.pixel_mm


def lesion_sites(slices: int, series_names: tuple[str, ...]) -> Iterator[Site]:
    """``slices`` body slices per series, simulated at LESION_DOSE, with up to
    LESIONS_PER_SLICE places per diameter for the contrast check, drawn from one LESION_SEED
    generator in a fixed order (the CHO reads the same slices, at places of its own)."""
    rng = np.random.default_rng(LESION_SEED)
    for series_name in series_names:
        series = load_series(SHARED_CT / series_name)
        chosen = pick_slices(body_slices(series.hu, series.keep), slices)
        lows = simulate_slices(series, chosen, LESION_DOSE, LESION_SEED)
        for low, index in zip(lows, chosen, strict=True):
            full, keep = series.hu[index], series.keep[index]
            centres = {
                diameter: lesion_centres(
                    full, keep, diameter / 2 / series.pixel_mm, LESIONS_PER_SLICE, rng
                )
                for diameter in LESION_DIAMETERS_MM
            }
            yield Site(series, index, low, centres)


def lesion_kind(diameter_mm: float, contrast_hu: float) -> str:
    """The name of a lesion kind, as the reports list it: "3 mm / 5 HU"."""
    return f"{diameter_mm:g} mm / {contrast_hu:g} HU"


def lesion_check(
    methods: dict[str, Denoiser], slices: int, series_names: tuple[str, ...], log: Log
) -> dict[str, dict[str, list[float]]]:
    """Per method, per lesion kind ("3 mm / 5 HU"): contrast kept (%) of every disc placed."""
    out: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    for site in lesion_sites(slices, series_names):
        for method in methods.values():
            measure_series(method, site.low[None], site.keep[None])
        for diameter, centres in site.centres.items():
            radius = site.radius_px(diameter)
            for contrast in LESION_CONTRASTS_HU:
                kind = lesion_kind(diameter, contrast)
                for name, method in methods.items():
                    found = contrast_kept(site.low, site.keep, method, centres, radius, contrast)
                    out[name].setdefault(kind, []).extend(found)
        log(f"lesions: {site.series.name} slice {site.index} done")
    return out


def lesion_markdown(found: dict[str, dict[str, list[float]]]) -> str:
    """Mean (and lowest) contrast kept per method and lesion kind; the 90 % verdict."""
    methods = list(found)
    kinds = list(next(iter(found.values())))
    lines = [
        "| lesion | discs | " + " | ".join(f"{m}: mean (min) %" for m in methods) + " |",
        "|---|---:|" + "---|" * len(methods),
    ]
    for kind in kinds:
        cells = [f"{np.mean(found[m][kind]):.1f} ({np.min(found[m][kind]):.1f})" for m in methods]
        lines.append(f"| {kind} | {len(found[methods[0]][kind])} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in methods:
        missed = [k for k in kinds if np.mean(found[m][k]) < 90.0]
        verdict = "met" if not missed else "MISSED for " + ", ".join(missed)
        lines.append(f"- {m}: contrast kept >= 90 % for every kind: {verdict}")
    return "\n".join(lines)
