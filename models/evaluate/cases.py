"""One case: a full-dose stack, its low-dose versions, its regions and its CHO disc set."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from models import metrics
from models.data import (
    SHARED_CT,
    CTSeries,
    load_series,
)
from models.evaluate.common import (
    CHO_SIMULATIONS,
    CHO_UNIFORM_PX,
    DISC_CONTRAST_HU,
    DISC_DIAMETER_MM,
    EVAL_SEED,
    INPUT_VERSION,
    REPEAT_SEED,
    ROI_PX,
    STAND_IN_DOSE,
    STAND_IN_SEED,
    Log,
    _cached,
)
from models.evaluate.regions import (
    Edge,
    UniformMaps,
    body_slices,
    crop,
    find_edges,
    measured_noise,
    pick_slices,
    window_for,
)
from models.simulate import series_calibration


@dataclass
class Case:
    """What every method is run on and judged against for one series."""

    name: str
    full: np.ndarray  # [n, H, W] HU, the reference
    keep: np.ndarray  # [n, H, W] untouchable
    pixel_mm: float
    window: tuple[float, float]
    inputs: dict[str, np.ndarray]  # condition ("25%", "full dose", "pair") -> [n, H, W]
    rois: list[tuple[int, int, int]]
    edge_kind: str
    edges: list[Edge]
    cho: dict[str, ChoSet] = field(default_factory=dict)
    #: condition -> a second noise realisation of ``inputs[condition]``, for the noise-alone NPS
    repeats: dict[str, np.ndarray] = field(default_factory=dict)
    #: [n, H, W] noise with the full-dose image's std and texture, independent of it and of the
    #: inputs: what the ideal-denoiser row needs in place of the reference's unknown own noise
    full_noise: np.ndarray | None = None


@dataclass
class ChoSet:
    """Simulated slices with discs at some uniform positions, for one dose."""

    slices: np.ndarray  # [m, H, W] low-dose HU
    keep: np.ndarray  # [m, H, W]
    #: per ROI [K, ROI_PX, ROI_PX], what the observer knows of the background: the quadratic
    #: surface fitted to the full-dose ROI without a disc (level and slow trends, no noise),
    #: so every method's reader sees all of the noise its image carries
    background: np.ndarray
    rois: list[tuple[int, int, int]]  # into ``slices``
    present: np.ndarray  # bool per ROI


def simulate_slices(series: CTSeries, indices: list[int], dose: float, seed: int) -> np.ndarray:
    """The chosen slices of a shared series at ``dose``, with the series' calibration."""
    cal = series_calibration(series)

    def make() -> np.ndarray:
        return np.stack(
            [
                cal.simulate(
                    series.hu[i],
                    series.keep[i],
                    dose,
                    np.random.default_rng([seed, int(round(dose * 1000)), i]),
                    series.pixel_mm,
                )
                for i in indices
            ]
        )

    return _cached(f"{series.name}|{indices}|{dose}|{seed}|{INPUT_VERSION}", make)


def cho_set(
    series: CTSeries, rois: list[tuple[int, int, int]], dose: float, realisations: int
) -> ChoSet:
    """Discs inserted at uniform positions of full-dose slices, then the dose simulation.

    For realisation r, positions with (position number + r) even get a disc: every position is
    signal-present in half the realisations, and each simulated slice serves both classes.
    """
    radius = DISC_DIAMETER_MM / 2 / series.pixel_mm
    by_slice: dict[int, list[tuple[int, int]]] = {}
    for i, y, x in rois:
        by_slice.setdefault(i, []).append((y, x))
    plan = [(i, r) for i in by_slice for r in range(realisations)]
    out_rois, present = [], []
    for k, (i, r) in enumerate(plan):
        for p, (y, x) in enumerate(by_slice[i]):
            out_rois.append((k, y, x))
            present.append((p + r) % 2 == 0)

    def make() -> np.ndarray:
        cal = series_calibration(series)
        slices = []
        for i, r in plan:
            image = series.hu[i].copy()
            for p, (y, x) in enumerate(by_slice[i]):
                if (p + r) % 2 == 0:
                    centre = (y + (ROI_PX - 1) / 2, x + (ROI_PX - 1) / 2)
                    image = metrics.add_disc(image, centre, radius, DISC_CONTRAST_HU)
            rng = np.random.default_rng([EVAL_SEED + 1, i, r, int(round(dose * 1000))])
            slices.append(cal.simulate(image, series.keep[i], dose, rng, series.pixel_mm))
        return np.stack(slices)

    disc = f"{DISC_DIAMETER_MM}mm|{DISC_CONTRAST_HU}HU"
    key = f"cho|{series.name}|{rois}|{dose}|{realisations}|{disc}|{INPUT_VERSION}"
    stack = _cached(key, make)
    index = [i for i, _ in plan]
    full = crop(series.hu[index], out_rois)
    background = full - metrics.detrend(full)
    return ChoSet(stack, series.keep[index], background, out_rois, np.array(present))


def series_case(name: str, slices: int, doses: tuple[float, ...], cho_rois: int, log: Log) -> Case:
    """Load a shared series, pick slices and regions, simulate the low-dose inputs.

    The evaluated slices are evenly spaced over those with uniform ROIs (brain, inserts),
    where noise, bias, texture and detectability can be measured at all.
    """
    series = load_series(SHARED_CT / name)
    maps = UniformMaps.of(series.hu, series.keep)
    all_rois = maps.rois()
    indices = pick_slices(
        sorted({i for i, _, _ in all_rois}) or body_slices(series.hu, series.keep), slices
    )
    full, keep = series.hu[indices], series.keep[indices]
    rois = [(indices.index(i), y, x) for i, y, x in all_rois if i in indices]
    edge_kind, edges = find_edges(full, keep)
    log(f"{name}: slices {indices}, {len(rois)} uniform ROIs, {len(edges)} {edge_kind}")
    inputs, repeats = {}, {}
    for dose in doses:
        label = "full dose" if dose == 1 else f"{dose * 100:g}%"
        inputs[label] = full if dose == 1 else simulate_slices(series, indices, dose, EVAL_SEED)
        if dose < 1 and rois:
            repeats[label] = simulate_slices(series, indices, dose, REPEAT_SEED)
        log(f"{name}: {label} input ready{' (two noise realisations)' if label in repeats else ''}")
    full_noise = None
    if rois and any(dose < 1 for dose in doses):
        stand_in = simulate_slices(series, indices, STAND_IN_DOSE, STAND_IN_SEED) - full
        scale = measured_noise(full, keep, rois) / measured_noise(stand_in, keep, rois)
        full_noise = stand_in * scale
    case = Case(
        name,
        full,
        keep,
        series.pixel_mm,
        window_for(name),
        inputs,
        rois,
        edge_kind,
        edges,
        repeats=repeats,
        full_noise=full_noise,
    )
    if cho_rois:
        positions = cho_positions(
            UniformMaps.of(series.hu, series.keep, CHO_UNIFORM_PX), 2 * cho_rois
        )
        per_slice = len(positions) / max(len({i for i, _, _ in positions}), 1)
        realisations = min(
            max(2, math.ceil(2 * cho_rois / max(len(positions), 1))),
            max(2, int(CHO_SIMULATIONS / len(positions) * per_slice)),
        )
        for dose in doses:
            if dose < 1 and positions:
                label = f"{dose * 100:g}%"
                case.cho[label] = cho_set(series, positions, dose, realisations)
                log(
                    f"{name}: CHO {label}: {len(positions)} positions x {realisations} "
                    "realisations simulated"
                )
    return case


def cho_positions(maps: UniformMaps, wanted: int) -> list[tuple[int, int, int]]:
    """Disc positions (ROI corners) 3/4 ROI apart, from the slices richest in them.

    Slices are taken until there are ``wanted / 4`` positions, so each slice is simulated
    a few times rather than many slices once (the simulation is the slow part).
    """
    candidates = maps.rois(spacing=ROI_PX * 3 // 4, per_slice=16)
    counts: dict[int, int] = {}
    for i, _, _ in candidates:
        counts[i] = counts.get(i, 0) + 1
    chosen: list[int] = []
    for i in sorted(counts, key=lambda k: (-counts[k], k)):
        if sum(counts[c] for c in chosen) >= wanted / 4:
            break
        chosen.append(i)
    return [r for r in candidates if r[0] in chosen]


def pair_case(low_dir: Path, full_dir: Path, slices: int, log: Log) -> Case:
    """Any two DICOM series of the same slices: a real low-dose scan and its full-dose one."""
    low, full = load_series(low_dir), load_series(full_dir)
    if low.hu.shape != full.hu.shape:
        raise ValueError(f"series differ in shape: {low.hu.shape} vs {full.hu.shape}")
    keep_all = full.keep | low.keep
    maps = UniformMaps.of(full.hu, keep_all)
    all_rois = maps.rois()
    indices = pick_slices(
        sorted({i for i, _, _ in all_rois}) or body_slices(full.hu, keep_all), slices
    )
    f, k = full.hu[indices], keep_all[indices]
    rois = [(indices.index(i), y, x) for i, y, x in all_rois if i in indices]
    edge_kind, edges = find_edges(f, k)
    ds = pydicom.dcmread(full.paths[0], stop_before_pixels=True)
    text = f"{full_dir.name} {ds.get('BodyPartExamined', '')} {ds.get('SeriesDescription', '')}"
    log(f"pair: slices {indices}, {len(rois)} uniform ROIs, {len(edges)} {edge_kind}")
    return Case(
        full_dir.name,
        f,
        k,
        full.pixel_mm,
        window_for(text),
        {"pair": low.hu[indices], "full dose": f},
        rois,
        edge_kind,
        edges,
    )
