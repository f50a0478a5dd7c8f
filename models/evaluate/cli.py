"""The command line: ``python -m models.evaluate`` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import models.evaluate
from models.data import (
    HELDOUT_SERIES,
    REAL_LOWDOSE_HELDOUT,
    REAL_LOWDOSE_VALIDATION,
    VALIDATION_SERIES,
    cache_dir,
)
from models.evaluate import lesion_cho, lesions, real_noise, texture
from models.evaluate.cases import pair_case, series_case
from models.evaluate.common import (
    DEFAULT_MODEL,
    DISC_CONTRAST_HU,
    DISC_DIAMETER_MM,
    DOSES,
    GAUSSIAN_SIGMA_MM,
    ROI_PX,
    Log,
)
from models.evaluate.figures import save_figures, tune_gaussian
from models.evaluate.methods import OnnxDenoiser
from models.evaluate.report import check_targets, markdown
from models.evaluate.scoring import evaluate_case, grain_sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.evaluate",
        description=models.evaluate.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX model")
    parser.add_argument("--no-model", action="store_true", help="baselines only")
    parser.add_argument("--low", type=Path, help="low-dose DICOM series folder (pair mode)")
    parser.add_argument("--full", type=Path, help="full-dose DICOM series folder (pair mode)")
    parser.add_argument("--out", type=Path, help="results folder (default: in the cache dir)")
    parser.add_argument("--quick", action="store_true", help="2 slices, 25 %% dose, small CHO")
    parser.add_argument("--slices", type=int, default=6, help="slices per series (default 6)")
    parser.add_argument(
        "--cho-rois",
        type=int,
        default=120,
        help="CHO images per class and dose, at least (default 120; 0: no CHO)",
    )
    parser.add_argument("--tune-gaussian", action="store_true", help="choose the Gaussian sigma")
    parser.add_argument("--figures", type=Path, help="write the model card's PNGs there")
    parser.add_argument(
        "--texture-grid",
        action="store_true",
        help="only the texture grid (models.evaluate.texture) on --slices held-out slices",
    )
    parser.add_argument(
        "--real-noise",
        action="store_true",
        help="only the no-reference check on the held-out real low-dose series",
    )
    parser.add_argument(
        "--lesions",
        action="store_true",
        help="only the small-lesion checks (contrast kept, CHO d') on --slices slices per series",
    )
    parser.add_argument(
        "--split",
        choices=("held-out", "validation"),
        default="held-out",
        help="series of --texture-grid / --real-noise: held out (reporting) or validation "
        "(choosing between candidates)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    if args.tune_gaussian:
        log(f"best Gaussian sigma: {tune_gaussian(log):g} mm")
        return 0
    if args.figures and args.no_model:
        parser.error("--figures needs the model")
    model = None if args.no_model else OnnxDenoiser(args.model)
    if args.figures:
        save_figures(args.figures, model, log)
        return 0
    if args.texture_grid or args.real_noise or args.lesions:
        if model is None:
            parser.error("--texture-grid, --real-noise and --lesions need the model")
        out = args.out or cache_dir() / "evaluation-grain"
        series = GRAIN_SPLITS[args.split]
        checks = (args.texture_grid, args.real_noise, args.lesions)
        grain_checks(model, args.slices, series, checks, out, log)
        return 0
    if (args.low is None) != (args.full is None):
        parser.error("--low and --full go together")
    slices, doses, cho_rois = args.slices, DOSES, args.cho_rois
    if args.quick:
        slices, doses, cho_rois = 2, (0.25,), min(cho_rois, 24)
    if args.low:
        cases = [pair_case(args.low, args.full, slices, log)]
    else:
        cases = [series_case(name, slices, doses, cho_rois, log) for name in HELDOUT_SERIES]
    results = {
        "model": model.name if model else "baselines only",
        "model_path": str(args.model),
        "setup": (
            f"{slices} slices per series; uniform ROIs {ROI_PX} px; discs "
            f"{DISC_DIAMETER_MM:g} mm / {DISC_CONTRAST_HU:g} HU; Gaussian "
            f"{GAUSSIAN_SIGMA_MM:g} mm; onnxruntime CPU, 2 threads"
        ),
        "cases": {
            c.name: {
                "window": c.window,
                "slices": len(c.full),
                "rois": len(c.rois),
                "edges": f"{len(c.edges)} {c.edge_kind}",
                "cho_rois": {k: len(v.rois) for k, v in c.cho.items()},
            }
            for c in cases
        },
        "series": {c.name: evaluate_case(c, model, log) for c in cases},
    }
    if model is not None:
        seconds = np.array(model.seconds)
        grain_condition = "pair" if args.low else "25%"
        results["grain"] = {
            c.name: grain_sizes(c, model, grain_condition)
            for c in cases
            if c.rois and grain_condition in c.inputs
        }
        results["model_seconds_per_slice_median"] = float(np.median(seconds))
        results["model_seconds_per_512_slice"] = _time_512(model)
        results["targets"] = check_targets(results) if not args.low else []
    else:
        results["targets"] = []
    results["wall_seconds"] = time.perf_counter() - start
    out = args.out or cache_dir() / ("evaluation-quick" if args.quick else "evaluation")
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report)
    print(report)
    for series, target, verdict, reference, ideal in results["targets"]:
        print(f"{verdict:5s} {series}: {target}; full dose itself: {reference}; ideal: {ideal}")
    if model is not None:
        log(f"model: {results['model_seconds_per_512_slice']:.3f} s per 512x512 slice on CPU")
    log(f"results in {out}")
    return 0


def _time_512(model: OnnxDenoiser, repeats: int = 5) -> float:
    """Median CPU seconds for one 512 x 512 slice (after a warm-up call)."""
    hu = np.random.default_rng(0).normal(40.0, 20.0, (512, 512)).astype(np.float32)
    keep = np.zeros(hu.shape, dtype=bool)
    model(hu, keep)
    model.seconds.clear()
    for _ in range(repeats):
        model(hu, keep)
    return float(np.median(model.seconds))


#: The series of the grain checks per split: (full-dose series, real low-dose series).
GRAIN_SPLITS = {
    "held-out": (HELDOUT_SERIES, REAL_LOWDOSE_HELDOUT),
    "validation": (VALIDATION_SERIES, REAL_LOWDOSE_VALIDATION),
}


def grain_checks(
    model: OnnxDenoiser,
    slices: int,
    series: tuple[tuple[str, ...], tuple[str, ...]],
    checks: tuple[bool, bool, bool],
    out: Path,
    log: Log,
) -> None:
    """The texture grid, the real-noise check and / or the lesion check (``checks``) for
    ``model`` on the given full-dose and real low-dose series; markdown and JSON in ``out``."""
    grid, real, lesion = checks
    out.mkdir(parents=True, exist_ok=True)
    if grid:
        cells = texture.texture_grid(model, model.name, slices, log, series[0])
        report = texture.grid_markdown(cells, model.name)
        (out / "texture_grid.md").write_text(report + "\n")
        (out / "texture_grid.json").write_text(
            json.dumps({f"{k[0]} x{k[1]:g} {k[2]:.0%}": v for k, v in cells.items()}, indent=1)
        )
        print(report)
    if real:
        sections = []
        for name, method in ((model.name, model), (texture.GAUSSIAN, texture.gaussian_px)):
            found = real_noise.real_noise_check(method, series[1], log)
            sections.append(real_noise.real_noise_markdown(found, name))
            (out / f"real_noise_{len(sections)}.json").write_text(json.dumps(found, indent=1))
        report = "\n\n".join(sections)
        (out / "real_noise.md").write_text(report + "\n")
        print(report)
    if lesion:
        methods = {model.name: model, texture.GAUSSIAN: texture.gaussian_px}
        found = lesions.lesion_check(methods, slices, series[0], log)
        cho = lesion_cho.lesion_cho(methods, slices, series[0], log)
        report = lesions.lesion_markdown(found) + "\n\n" + lesion_cho.cho_markdown(cho)
        (out / "lesions.md").write_text(report + "\n")
        (out / "lesions.json").write_text(json.dumps(found, indent=1))
        (out / "lesions_cho.json").write_text(json.dumps(cho, indent=1))
        print(report)
    log(f"results in {out}")
