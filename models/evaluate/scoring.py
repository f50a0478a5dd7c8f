"""Scoring a method on a case: fidelity, noise, HU bias, MTF, NPS, the ideal denoiser."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from models import metrics
from models.evaluate.cases import Case
from models.evaluate.common import GAUSSIAN_SIGMA_MM, ROI_PX, STRENGTHS, Log, Method
from models.evaluate.methods import (
    IDEAL,
    IDEAL_FIGURES,
    REFERENCE,
    OnnxDenoiser,
    bm3d_denoise,
    bm3d_seconds,
    gaussian,
    measure_series,
    run_method,
)
from models.evaluate.observer import cho_inputs, cho_outputs, cho_score, method_rois
from models.evaluate.regions import bounding_box, crop, mean_mtf, measured_noise
from node.pixels import blend, model_input


def score(case: Case, output: np.ndarray, reference_input: np.ndarray) -> dict[str, float]:
    """Every image-quality figure of one method's output on one condition."""
    width, level = case.window
    psnr, ssim, rmse = [], [], []
    for i in range(len(output)):
        body = metrics.body_mask(case.full[i], case.keep[i])
        box = bounding_box(body)
        psnr.append(metrics.psnr_windowed(output[i][box], case.full[i][box], width, level))
        ssim.append(metrics.ssim_windowed(output[i][box], case.full[i][box], width, level))
        rmse.append(metrics.rmse_hu(output[i], case.full[i], body))
    result = {
        "psnr_db": float(np.mean(psnr)),
        "ssim": float(np.mean(ssim)),
        "rmse_hu": float(np.sqrt(np.mean(np.square(rmse)))),
    }
    if case.rois:
        rois, before = crop(output, case.rois), crop(reference_input, case.rois)
        noise, noise_in = metrics.roi_noise(rois).mean(), metrics.roi_noise(before).mean()
        f, nps = metrics.radial_nps(metrics.nps_2d(rois, case.pixel_mm), case.pixel_mm)
        f, nps_in = metrics.radial_nps(metrics.nps_2d(before, case.pixel_mm), case.pixel_mm)
        peak, peak_in = metrics.nps_peak_frequency(f, nps), metrics.nps_peak_frequency(f, nps_in)
        bias = metrics.roi_mean(rois) - metrics.roi_mean(crop(case.full, case.rois))
        result |= {
            "noise_hu": float(noise),
            "noise_reduction_pct": metrics.noise_reduction_percent(noise, noise_in),
            "hu_bias": float(bias.mean()),
            "nps_peak_per_mm": peak,
            "nps_peak_shift_pct": 100.0 * (peak / peak_in - 1.0),
            "nps_mean_per_mm": metrics.nps_mean_frequency(f, nps),
        }
    if case.edges:
        mtf50, mtf10 = mean_mtf(output, case.edges, case.pixel_mm)
        full50, _ = mean_mtf(case.full, case.edges, case.pixel_mm)
        result |= {
            "mtf50_per_mm": mtf50,
            "mtf10_per_mm": mtf10,
            "mtf50_vs_full_pct": 100.0 * (mtf50 / full50 - 1.0),
        }
    return result


@dataclass
class RepeatedScans:
    """The uniform ROIs of two noise realisations of one input, before and after a method."""

    inputs: tuple[np.ndarray, np.ndarray]
    outputs: tuple[np.ndarray, np.ndarray]
    pixel_mm: float
    #: peak frequency of the inputs' noise-alone NPS, what every strength's peak is compared to
    input_peak: float

    @classmethod
    def of(
        cls, method: Method, case: Case, condition: str, first_output: np.ndarray, local: bool
    ) -> RepeatedScans:
        """Both realisations through ``method``; ``first_output`` is its whole-slice output of
        the first (``local`` methods are rerun on ROIs for both, so both are made alike)."""
        low, repeat = case.inputs[condition], case.repeats[condition]
        inputs = (crop(low, case.rois), crop(repeat, case.rois))
        if local:
            first = method_rois(method, low, case.keep, case.rois, local=True)
        else:
            first = crop(first_output, case.rois)
        second = method_rois(method, repeat, case.keep, case.rois, local)
        f, before = metrics.repeated_scan_nps(*inputs, case.pixel_mm)
        peak_in = metrics.nps_peak_frequency(f, before)
        return cls(inputs, (first, second), case.pixel_mm, peak_in)

    def texture(self, strength: float) -> dict[str, float]:
        """Peak of the noise-alone NPS after the method, and its shift from the input's."""
        blended = (blend(i, o, strength) for i, o in zip(self.inputs, self.outputs, strict=True))
        f, after = metrics.repeated_scan_nps(*blended, self.pixel_mm)
        peak = metrics.nps_peak_frequency(f, after)
        return {
            "nps_noise_peak_per_mm": peak,
            "nps_noise_shift_pct": 100.0 * (peak / self.input_peak - 1.0),
        }


#: Resampling factors (output pixels per input pixel) of the grain-size check: the same
#: noise with a finer (< 1) or coarser (> 1) grain in pixels, as other pixel spacings and
#: reconstruction kernels give it.
GRAIN_ZOOMS = (0.7, 1.0, 1.4)


def grain_sizes(case: Case, method: Method, condition: str) -> dict[str, float]:
    """Noise removed (%) in the uniform ROIs when the input is first resampled by each of
    GRAIN_ZOOMS: a denoiser that knows only its training scanners' grain falls off fast
    (2.2.0 on the head at 25 % dose: 54 % as it is, 25 % at 1.3 or 0.6)."""
    low = case.inputs[condition]
    removed = {}
    for zoom in GRAIN_ZOOMS:
        resampled = np.stack(
            [
                ndi.zoom(model_input(s, k), zoom, order=1)
                for s, k in zip(low, case.keep, strict=True)
            ]
        )
        measure_series(method, resampled, np.zeros(resampled.shape, bool))
        denoised = np.stack([method(s, np.zeros(s.shape, bool)) for s in resampled])
        rois = [(i, round(y * zoom), round(x * zoom)) for i, y, x in case.rois]
        size = round(ROI_PX * zoom)
        before = metrics.roi_noise(crop(resampled, rois, size)).mean()
        after = metrics.roi_noise(crop(denoised, rois, size)).mean()
        removed[f"{zoom:g}"] = float(metrics.noise_reduction_percent(after, before))
    return removed


def methods_for(case: Case, condition: str, model: OnnxDenoiser | None) -> dict[str, Method]:
    """The methods to compare on one condition; BM3D's sigma from the input's own ROIs."""
    sigma = measured_noise(case.inputs[condition], case.keep, case.rois)
    found: dict[str, Method] = {
        "input": lambda hu, keep: hu,
        f"Gaussian {GAUSSIAN_SIGMA_MM:g} mm": lambda hu, keep: gaussian(hu, keep, case.pixel_mm),
        f"BM3D (sigma {sigma:.1f} HU)": lambda hu, keep: bm3d_denoise(hu, keep, sigma),
    }
    if model is not None:
        found["model"] = model
    return found


def ideal_output(case: Case, condition: str) -> np.ndarray | None:
    """An image as close to the reference, in mean square, as the best possible denoiser's.

    The reference is full dose F = S + Nf and the input X = F + Ne, with noise of one texture
    (the simulation shapes it so).  Knowing S, the estimate of F closest in mean square is
    S + w (Nf + Ne), w = var(Nf) / (var(Nf) + var(Ne)): part of the reference's own noise is
    in the input and can be kept, the rest cannot be known.  Its error w Ne - (1 - w) Nf is
    built here on F, with ``case.full_noise`` standing in for Nf, so PSNR and RMSE are that
    denoiser's; SSIM is at least its (this image varies more than that output, which lowers
    SSIM's penalty).  No denoiser, knowing less than S, is closer to the reference.
    """
    if case.full_noise is None or condition not in case.inputs:
        return None
    low = case.inputs[condition]
    extra = low - case.full
    var_full = measured_noise(case.full, case.keep, case.rois) ** 2
    var_extra = measured_noise(extra, case.keep, case.rois) ** 2
    w = var_full / (var_full + var_extra)
    return np.where(case.keep, low, case.full + w * extra - (1.0 - w) * case.full_noise)


def evaluate_case(case: Case, model: OnnxDenoiser | None, log: Log) -> dict[str, dict]:
    """Run every method on every condition of a case; returns condition -> method -> figures.

    BM3D takes seconds per slice: its detectability is scored at 25 % dose only, on ROIs, and
    its time per slice is one uncached run (its outputs are cached).
    """
    results: dict[str, dict] = {}
    first = next(iter(case.inputs.values()))
    bm3d_time = bm3d_seconds(first[0], case.keep[0], measured_noise(first, case.keep, case.rois))
    for condition, low in case.inputs.items():
        results[condition] = {}
        cho = case.cho.get(condition)
        if model is not None:  # one factor for every image of the condition: its input's
            model.measure_series(low, case.keep)
        for method_name, method in methods_for(case, condition, model).items():
            out, seconds = run_method(method, low, case.keep)
            slow = "BM3D" in method_name
            seconds = bm3d_time if slow else seconds
            with_cho = cho is not None and (condition == "25%" or not slow)
            cho_out = cho_outputs(method, cho, local=slow) if with_cho else None
            repeated = (
                RepeatedScans.of(method, case, condition, out, local=slow)
                if condition in case.repeats
                else None
            )
            variants = (
                {f"model s={s:g}": s for s in STRENGTHS}
                if method_name == "model"
                else {method_name: 1.0}
            )
            for name, strength in variants.items():
                figures = score(case, blend(low, out, strength), low)
                if repeated is not None:
                    figures |= repeated.texture(strength)
                if cho_out is not None:
                    figures |= cho_score(case, cho, blend(cho_inputs(cho), cho_out, strength))
                figures["seconds_per_slice"] = seconds
                results[condition][name] = figures
            log(f"{case.name} {condition}: {method_name} done ({seconds:.2f} s/slice)")
        if condition != "full dose":
            results[condition][REFERENCE] = score(case, case.full, low)
            ideal = ideal_output(case, condition)
            if ideal is not None:
                figures = score(case, ideal, low)
                results[condition][IDEAL] = {k: figures[k] for k in IDEAL_FIGURES}
    return results
