"""How the Gaussian baseline's sigma was chosen, and the model card's before / after figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from models import metrics
from models.data import (
    SHARED_CT,
    TRAIN_SERIES,
    load_series,
)
from models.evaluate.cases import simulate_slices
from models.evaluate.common import EVAL_SEED, Log
from models.evaluate.methods import OnnxDenoiser
from models.evaluate.regions import body_slices, bounding_box, pick_slices, window_for
from node.pixels import model_input


def tune_gaussian(log: Log) -> float:
    """The Gaussian sigma (mm) with the best windowed PSNR on the training series at 25 %.

    PSNR in each series' own window, not HU RMSE, which blurred bone edges would dominate.
    """
    grid = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
    scores: dict[float, list[float]] = {s: [] for s in grid}
    for name in TRAIN_SERIES:
        series = load_series(SHARED_CT / name)
        indices = pick_slices(body_slices(series.hu, series.keep), 3)
        low = simulate_slices(series, indices, 0.25, EVAL_SEED)
        width, level = window_for(name)
        for j, i in enumerate(indices):
            for s in grid:
                out = ndi.gaussian_filter(model_input(low[j], series.keep[i]), s / series.pixel_mm)
                box = bounding_box(metrics.body_mask(series.hu[i], series.keep[i]))
                scores[s].append(metrics.psnr_windowed(out[box], series.hu[i][box], width, level))
        log(f"tune: {name} done")
    mean = {s: float(np.mean(v)) for s, v in scores.items()}
    for s, v in mean.items():
        log(f"  sigma {s:g} mm: mean windowed PSNR {v:.2f} dB")
    return max(mean, key=mean.get)


def save_figures(folder: Path, model: OnnxDenoiser, log: Log) -> None:
    """Before / after / difference PNGs at 25 % dose, 240 px crops at full resolution.

    Soft tissue: a held-out head slice (brain window).  Lung: the only lungs in the data are
    in the chest *training* series, so that figure shows a slice the model was trained on.
    Panels: 25 % dose input, model (strength 1), full dose, model minus input (what the model
    removed; mid-grey is zero, window +-diff_hu/2).
    """
    folder.mkdir(parents=True, exist_ok=True)
    cases = (
        ("soft-tissue", "head-toshiba-aquilion", 0.55, (80.0, 40.0), 100.0),
        ("lung", "chest-siemens-sensation64", 0.5, (1500.0, -600.0), 400.0),
    )
    titles = ("25 % dose", "model", "full dose", "model - input")
    for label, name, where, (width, level), diff_hu in cases:
        series = load_series(SHARED_CT / name)
        i = int(round(where * (len(series.hu) - 1)))
        low = simulate_slices(series, [i], 0.25, EVAL_SEED)[0]
        keep = series.keep[i]
        model.measure_series(low[None], keep[None])
        out = np.where(keep, low, model(low, keep))
        rows, cols = np.nonzero(metrics.body_mask(series.hu[i], keep))
        cy, cx = (rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2
        box = (slice(max(cy - 120, 0), cy + 120), slice(max(cx - 120, 0), cx + 120))
        panels = [
            metrics.window(low[box], width, level),
            metrics.window(out[box], width, level),
            metrics.window(series.hu[i][box], width, level),
            metrics.window((out - low)[box], diff_hu, 0.0),
        ]
        strip = np.concatenate(
            [np.pad(p, ((0, 0), (0, 4)), constant_values=1) for p in panels], axis=1
        )
        image = Image.fromarray((strip * 255).round().astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for k, title in enumerate(titles):
            draw.rectangle((k * 244, 0, k * 244 + 6 * len(title) + 4, 12), fill=0)
            draw.text((k * 244 + 2, 0), title, fill=255)
        path = folder / f"{label}.png"
        image.save(path, optimize=True)
        log(f"{path}: {name} slice {i}, {path.stat().st_size // 1024} KB")
