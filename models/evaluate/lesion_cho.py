"""Small low-contrast lesions: the CHO d' for every kind, input against each method.

    python -m models.evaluate --lesions [--slices 2]     (beside the contrast kept)

Issue #17 asks that a denoiser keep the inserted lesions detectable: "CHO d' for them not
below the input's".  On the held-out slices of the contrast check (``lesions``), at 25 % dose:

- Places: the observer reads ROIs of 2 * ceil(ROI_RADII disc radii) + 1 px, and, as for
  the main evaluation's CHO, only where such a square is uniform in the full-dose image
  (regions.UniformMaps' rule; up to PLACES_PER_SLICE per slice and kind, 1.5 half-ROIs
  apart).  The contrast check's places need flat tissue only a few pixels around the disc;
  their ROIs hold skull, air and edges of 30-300 HU std, which the observer would have to
  learn from a dozen places, and d' then measures the anatomy, not the noise.
- LESION_REALISATIONS independent realisations of each slice (the first is the contrast
  check's); in realisation r a place carries a disc when (place number + r) is even, as in
  ``cases.cho_set``, so every place is signal-present in half the realisations and
  signal-absent (same place, no disc) in the other half, each time with its own noise.  The
  discs are added to the simulated slice, as the contrast check adds them.
- Every method runs on whole slices, as in the node.  The observer knows the background as
  the main CHO does, the quadratic surface fitted to the full-dose ROI (the same for both
  classes), and faces all of the noise, the full-dose grain included.
- The observer is ``observer``'s CHO (6 Laguerre-Gauss channels 2.5 radii wide, two-fold
  cross-validated Hotelling template), one per kind over both series, with the radius in
  pixels averaged over the slices.  Standard errors: a paired bootstrap (every method on
  the same resampled ROIs), for d' and for d' minus the input's.

Target per kind: d' not below the input's, judged as the main evaluation judges its CHO
target: the two d' as reported, to two decimals; the bootstrap standard error of the
difference is printed beside it, so that a miss smaller than it reads as what it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models import metrics
from models.evaluate.cases import simulate_slices
from models.evaluate.common import Log
from models.evaluate.lesions import (
    LESION_CONTRASTS_HU,
    LESION_DIAMETERS_MM,
    LESION_DOSE,
    LESION_SEED,
    Denoiser,
    Site,
    lesion_kind,
    lesion_sites,
)
from models.evaluate.methods import measure_series
from models.evaluate.observer import channel_responses, paired_bootstrap
from models.evaluate.regions import UniformMaps

#: Noise realisations per slice (even: each place is present in half of them).
LESION_REALISATIONS = 16
#: Places per slice and kind, at most: with 2 slices of 2 series, up to 48 x 16 ROIs.
PLACES_PER_SLICE = 12
#: Half the ROI's side, in disc radii (the main CHO: 16 px for a 5 mm disc of ~5 px radius).
ROI_RADII = 3.0
BOOTSTRAP_RESAMPLES = 500
#: Fewer ROIs of either class than this and a kind gets no d' (a 6-channel covariance from
#: half of them, two-fold cross-validation).
MIN_ROIS_PER_CLASS = 20
INPUT = "input (25 %)"


@dataclass
class ChoSlice:
    """One slice of the lesion CHO: full-dose image, untouchable pixels, disc places per
    diameter (mm) and independent low-dose realisations without discs."""

    full: np.ndarray
    keep: np.ndarray
    pixel_mm: float
    centres: dict[float, list[tuple[int, int]]]
    lows: list[np.ndarray]


@dataclass
class KindRois:
    """The background-subtracted ROIs of one lesion kind, per method, and their class."""

    rois: dict[str, np.ndarray]  # method -> [K, n, n]
    present: np.ndarray  # [K] bool
    radius_px: float


def realisation_seed(r: int) -> int:
    """Seed of realisation ``r``: 0 is the contrast check's, so its simulation is reused."""
    return LESION_SEED + 1000 * r


def roi_half(pixels_mm: list[float], diameter_mm: float) -> int:
    """Half the ROI side (px) of one kind: ROI_RADII disc radii, averaged over the slices."""
    return math.ceil(ROI_RADII * float(np.mean([diameter_mm / 2 / p for p in pixels_mm])))


def uniform_places(
    full: np.ndarray, keep: np.ndarray, half: int, count: int = PLACES_PER_SLICE
) -> list[list[tuple[int, int]]]:
    """Per slice of a series' stack ``[n, H, W]``: up to ``count`` centres of the flattest
    ``2 half + 1`` px squares by the main CHO's rule (regions.UniformMaps: within -200..300 HU
    with a 4 px margin, full-dose std at most 1.5 x the stack's floor), 1.5 ``half`` apart
    (no disc reaches another's ROI)."""
    maps = UniformMaps.of(full, keep, 2 * half + 1)
    spacing, out = math.ceil(1.5 * half), []
    for std, ok in zip(maps.std, maps.ok, strict=True):
        ok = ok.copy()
        ok[: half + 4] = ok[-half - 4 :] = False
        ok[:, : half + 4] = ok[:, -half - 4 :] = False
        out.append(maps.flattest(std, ok, spacing, count))
    return out


def cho_slices(sites: list[Site], realisations: int = LESION_REALISATIONS) -> list[ChoSlice]:
    """The lesion sites with their uniform places per diameter (the floor pooled over each
    series' sites) and their independent realisations (simulated once, cached)."""
    pixels = [site.series.pixel_mm for site in sites]
    places: dict[int, dict[float, list[tuple[int, int]]]] = {}
    for name in dict.fromkeys(site.series.name for site in sites):
        group = [k for k, site in enumerate(sites) if site.series.name == name]
        full = np.stack([sites[k].full for k in group])
        keep = np.stack([sites[k].keep for k in group])
        for d in LESION_DIAMETERS_MM:
            found = uniform_places(full, keep, roi_half(pixels, d))
            for k, centres in zip(group, found, strict=True):
                places.setdefault(k, {})[d] = centres
    out = []
    for k, site in enumerate(sites):
        lows = [site.low] + [
            simulate_slices(site.series, [site.index], LESION_DOSE, realisation_seed(r))[0]
            for r in range(1, realisations)
        ]
        out.append(ChoSlice(site.full, site.keep, site.series.pixel_mm, places[k], lows))
    return out


def around(image: np.ndarray, centres: list[tuple[int, int]], half: int) -> np.ndarray:
    """The ``[K, 2 half + 1, 2 half + 1]`` squares of ``image`` centred on ``centres``."""
    return np.stack([image[y - half : y + half + 1, x - half : x + half + 1] for y, x in centres])


def _inside(shape: tuple[int, ...], centre: tuple[int, int], half: int) -> bool:
    return all(half <= c < n - half for c, n in zip(centre, shape, strict=True))


def kind_rois(
    slices: list[ChoSlice], diameter_mm: float, contrast_hu: float, methods: dict[str, Denoiser]
) -> KindRois:
    """Every method's ROIs of one lesion kind over all slices and realisations."""
    pixels = [s.pixel_mm for s in slices]
    half = roi_half(pixels, diameter_mm)
    mean_radius = float(np.mean([diameter_mm / 2 / p for p in pixels]))
    rois: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    present: list[bool] = []
    for s in slices:
        for method in methods.values():
            measure_series(method, np.stack(s.lows), np.stack([s.keep] * len(s.lows)))
        radius = diameter_mm / 2 / s.pixel_mm
        centres = [c for c in s.centres[diameter_mm] if _inside(s.full.shape, c, half)]
        if not centres:
            continue
        full = around(s.full, centres, half)
        background = full - metrics.detrend(full)
        for r, low in enumerate(s.lows):
            signal = [(p + r) % 2 == 0 for p in range(len(centres))]
            image = low.astype(np.float64)
            for centre in (c for c, on in zip(centres, signal, strict=True) if on):
                image = metrics.add_disc(image, centre, radius, contrast_hu)
            image = image.astype(np.float32)
            for name, method in methods.items():
                rois[name].append(around(method(image, s.keep), centres, half) - background)
            present += signal
    empty = np.empty((0, 2 * half + 1, 2 * half + 1), np.float32)
    stacked = {name: np.concatenate(found) if found else empty for name, found in rois.items()}
    return KindRois(stacked, np.array(present, bool), mean_radius)


def kind_dprimes(
    found: KindRois, reference: str, resamples: int = BOOTSTRAP_RESAMPLES
) -> dict[str, dict[str, float]]:
    """Per method: AUC, d', its SE, d' minus the ``reference``'s and that difference's SE
    (paired bootstrap), and how many ROIs of each class."""
    responses = {
        name: channel_responses(rois, found.radius_px) for name, rois in found.rois.items()
    }
    figures = paired_bootstrap(responses, found.present, reference, resamples)
    counts = {"present": float(found.present.sum()), "absent": float((~found.present).sum())}
    return {name: f | counts for name, f in figures.items()}


def lesion_cho(
    methods: dict[str, Denoiser], slices: int, series_names: tuple[str, ...], log: Log
) -> dict[str, dict[str, dict[str, float]]]:
    """Per lesion kind, per method (the input first): the CHO figures of :func:`kind_dprimes`."""
    chosen = cho_slices(list(lesion_sites(slices, series_names)))
    log(f"lesion CHO: {len(chosen)} slices x {LESION_REALISATIONS} realisations ready")
    everything: dict[str, Denoiser] = {INPUT: lambda hu, keep: hu, **methods}
    out = {}
    for diameter in LESION_DIAMETERS_MM:
        for contrast in LESION_CONTRASTS_HU:
            kind = lesion_kind(diameter, contrast)
            found = kind_rois(chosen, diameter, contrast, everything)
            if min(found.present.sum(), (~found.present).sum()) < MIN_ROIS_PER_CLASS:
                log(f"lesion CHO: {kind}: {len(found.present)} ROIs, too few for the observer")
                continue
            out[kind] = kind_dprimes(found, INPUT)
            log(f"lesion CHO: {kind} done")
    return out


def met(figures: dict[str, float], reference: dict[str, float]) -> bool:
    """The target: d' not below the reference's, both as reported (two decimals), as the
    main evaluation judges its CHO target (report.TARGETS)."""
    return round(figures["dprime"], 2) >= round(reference["dprime"], 2)


def cho_markdown(found: dict[str, dict[str, dict[str, float]]]) -> str:
    """d' (SE) per kind and method, each method's difference from the input (SE), verdicts."""
    kinds = list(found)
    methods = [m for m in found[kinds[0]] if m != INPUT]
    lines = [
        "CHO d' (bootstrap SE); for each method also d' minus the input's (paired bootstrap SE)",
        "",
        f"| lesion | ROIs present + absent | {INPUT} | "
        + " | ".join(f"{m} | {m} − input" for m in methods)
        + " |",
        "|---|---:|---:|" + "---:|---:|" * len(methods),
    ]
    for kind in kinds:
        rows = found[kind]
        cells = [f"{rows[INPUT]['dprime']:.2f} ({rows[INPUT]['dprime_se']:.2f})"]
        for m in methods:
            cells.append(f"{rows[m]['dprime']:.2f} ({rows[m]['dprime_se']:.2f})")
            cells.append(f"{rows[m]['delta']:+.2f} ({rows[m]['delta_se']:.2f})")
        counts = f"{rows[INPUT]['present']:.0f} + {rows[INPUT]['absent']:.0f}"
        lines.append(f"| {kind} | {counts} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in methods:
        missed = [
            f"{k} ({found[k][m]['delta']:+.2f}, SE {found[k][m]['delta_se']:.2f})"
            for k in kinds
            if not met(found[k][m], found[k][INPUT])
        ]
        verdict = "met for every kind" if not missed else "MISSED for " + ", ".join(missed)
        lines.append(f"- {m}: CHO d' not below the input's: {verdict}")
    return "\n".join(lines)
