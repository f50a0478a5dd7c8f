"""No-reference check on real low-dose CT: noise in flat soft tissue before and after.

    python -m models.evaluate --real-noise

The real low-dose series (models.data.REAL_LOWDOSE_HELDOUT, the attenuation CT of PET/CT)
have no full-dose reference, so the check measures what the method did to each slice:

- noise: the median, over FLAT_BLOCK_PX squares wholly inside flat soft tissue, of the
  detrended std (models.metrics.roi_noise), in the input and in the output on the same
  squares; its drop in %.  Flat soft tissue: -150..250 HU after a light smoothing, at least
  3 px from anything else, and among the flatter half of such pixels (smoothed gradient).
  A slice with fewer than MIN_BLOCKS squares is not measurable: excluded and counted.
- where the removed part (input - output) sits: its RMS on edges (the 10 % of body pixels
  with the steepest smoothed gradient) over its RMS in flat soft tissue.  A denoiser removes
  noise, which is everywhere; a ratio well above 1 means it removes structure.

Targets (issue #17): median drop >= 50 %, no slice below 30 %, edge / flat <= 1.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from models import metrics
from models.data import SHARED_LOWDOSE, load_series
from models.evaluate.methods import measure_series

FLAT_BLOCK_PX, MIN_BLOCKS = 12, 4
SOFT_TISSUE_HU = (-150.0, 250.0)
EDGE_QUANTILE = 0.9
SMOOTH_PX = 3.0
#: Smoothed gradient (HU per px) below which soft tissue counts as flat: noise of 50 HU
#: smoothed by SMOOTH_PX stays well below it, a fat / muscle border (150 HU) well above.
FLAT_GRADIENT_HU_PX = 5.0

Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]


def regions(hu: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat soft tissue and edge pixels of one slice (see the module docstring)."""
    smooth = ndi.gaussian_filter(hu.astype(np.float64), SMOOTH_PX)
    gradient = np.hypot(*np.gradient(smooth))
    lo, hi = SOFT_TISSUE_HU
    tissue = (smooth > lo) & (smooth < hi) & ~keep & (gradient < FLAT_GRADIENT_HU_PX)
    flat = ndi.binary_erosion(tissue, iterations=3)
    body = metrics.body_mask(hu, keep)
    edges = body & (gradient >= np.quantile(gradient[body], EDGE_QUANTILE)) if body.any() else body
    return flat, edges


def flat_blocks(flat: np.ndarray) -> list[tuple[int, int]]:
    """Corners of FLAT_BLOCK_PX squares wholly inside ``flat`` (half-overlapping grid)."""
    b = FLAT_BLOCK_PX
    return [
        (y, x)
        for y in range(0, flat.shape[0] - b + 1, b // 2)
        for x in range(0, flat.shape[1] - b + 1, b // 2)
        if flat[y : y + b, x : x + b].all()
    ]


def block_noise(image: np.ndarray, blocks: list[tuple[int, int]]) -> float:
    """Median detrended std of ``image`` over the blocks."""
    b = FLAT_BLOCK_PX
    rois = np.stack([image[y : y + b, x : x + b] for y, x in blocks])
    return float(np.median(metrics.roi_noise(rois)))


def slice_figures(hu: np.ndarray, keep: np.ndarray, out: np.ndarray) -> dict[str, float] | None:
    """Noise before / after (HU), its drop (%), and the removed part's edge / flat RMS ratio;
    None when the slice has no measurable flat soft tissue."""
    flat, edges = regions(hu, keep)
    blocks = flat_blocks(flat)
    if len(blocks) < MIN_BLOCKS or not edges.any():
        return None
    before, after = block_noise(hu, blocks), block_noise(out, blocks)
    removed = hu.astype(np.float64) - out
    rms_flat = math.sqrt(float(np.mean(removed[flat] ** 2)))
    rms_edges = math.sqrt(float(np.mean(removed[edges] ** 2)))
    return {
        "noise_before_hu": before,
        "noise_after_hu": after,
        "drop_percent": metrics.noise_reduction_percent(after, before),
        "edge_over_flat": rms_edges / rms_flat if rms_flat > 0 else math.inf,
    }


def real_noise_check(
    method: Denoiser, series_names: tuple[str, ...], log: Callable[[str], None]
) -> dict[str, dict]:
    """Per series: the measured slices' figures and the count of slices not measurable."""
    results = {}
    for name in series_names:
        series = load_series(SHARED_LOWDOSE / name)
        figures, excluded = [], 0
        measure_series(method, series.hu, series.keep)
        for hu, keep in zip(series.hu, series.keep, strict=True):
            out = np.where(keep, hu, method(hu, keep))
            found = slice_figures(hu, keep, out)
            if found is None:
                excluded += 1
            else:
                figures.append(found)
        results[name] = {"slices": figures, "excluded": excluded}
        log(f"real noise: {name}: {len(figures)} slices measured, {excluded} not measurable")
    return results


def summary(results: dict[str, dict]) -> dict[str, float]:
    """The targets' figures over every measured slice of every series."""
    rows = [f for r in results.values() for f in r["slices"]]
    drops = np.array([f["drop_percent"] for f in rows])
    ratios = np.array([f["edge_over_flat"] for f in rows])
    return {
        "slices": float(len(rows)),
        "excluded": float(sum(r["excluded"] for r in results.values())),
        "median_drop_percent": float(np.median(drops)) if len(rows) else math.nan,
        "min_drop_percent": float(drops.min()) if len(rows) else math.nan,
        "slices_below_30_percent": float((drops < 30).sum()),
        "median_edge_over_flat": float(np.median(ratios)) if len(rows) else math.nan,
        "median_noise_before_hu": float(np.median([f["noise_before_hu"] for f in rows]))
        if rows
        else math.nan,
        "median_noise_after_hu": float(np.median([f["noise_after_hu"] for f in rows]))
        if rows
        else math.nan,
    }


def real_noise_markdown(results: dict[str, dict], method_name: str) -> str:
    """Per series and overall, with the targets' verdicts."""
    lines = [
        f"| series ({method_name}) | slices measured / not measurable | noise before -> after "
        "(HU, median) | drop median / min (%) | removed part edge / flat (median) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = summary({name: r})
        lines.append(
            f"| {name} | {s['slices']:.0f} / {s['excluded']:.0f} | "
            f"{s['median_noise_before_hu']:.1f} -> {s['median_noise_after_hu']:.1f} | "
            f"{s['median_drop_percent']:.1f} / {s['min_drop_percent']:.1f} | "
            f"{s['median_edge_over_flat']:.2f} |"
        )
    s = summary(results)
    lines.append(
        f"| **all** | {s['slices']:.0f} / {s['excluded']:.0f} | "
        f"{s['median_noise_before_hu']:.1f} -> {s['median_noise_after_hu']:.1f} | "
        f"{s['median_drop_percent']:.1f} / {s['min_drop_percent']:.1f} | "
        f"{s['median_edge_over_flat']:.2f} |"
    )
    verdicts = [
        ("median drop >= 50 %", s["median_drop_percent"] >= 50),
        (
            f"no slice below 30 % ({s['slices_below_30_percent']:.0f} are)",
            s["slices_below_30_percent"] == 0,
        ),
        ("removed part at edges <= 1.2 x flat (median)", s["median_edge_over_flat"] <= 1.2),
    ]
    lines.append("")
    lines.extend(f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in verdicts)
    return "\n".join(lines)
