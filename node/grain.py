"""Noise grain in pixels: measured per series, and matched to the model's by resampling.

The model removes noise well only where the noise grain, in pixels, is close to the grain it
was trained on: a sharper kernel or larger pixels make the grain finer, a smoother kernel or
smaller pixels coarser, and a factor of 1.5 either way took 2.2.0 from about 60 % of the
noise removed to about 10 % (MODEL_CARD.md, "Grain checks").  So the grain is measured, as
the mean radial frequency of the noise power spectrum of flat soft tissue (cycles per
pixel), and the slices are resampled by the factor that brings it to the model's own
(``noise_grain`` in the model's metadata) before the model; what the model removed is
resampled back and taken from the original slice, so nothing but the removed noise passes
through the resampling.  White noise reads about 0.34, 2.2.0's grain 0.205.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from node.noise import SOFT_TISSUE_HU

#: Side of the square blocks whose power spectra are averaged.
BLOCK_PX = 32
#: Tissue is told on the slice smoothed by this (px), so that strong noise does not punch
#: holes in it (at 10 % dose a sharp kernel's noise reaches 100 HU).
MASK_SMOOTHING_PX = 2.0
#: Of the blocks wholly in soft tissue, the flattest share is kept (anatomy adds power).
FLATTEST_SHARE = 0.5
#: A series needs this many blocks for a grain figure.
MIN_BLOCKS = 4
#: Slices of a series measured, spread over it.
SAMPLE_SLICES = 8
#: The resampling factor stays within these bounds, rounded to ZOOM_STEP.
ZOOM_RANGE = (0.5, 2.5)
ZOOM_STEP = 0.05


def block_spectra(hu: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Power spectra ``[K, BLOCK_PX, BLOCK_PX]`` of the flattest soft-tissue blocks of a slice
    (each detrended by a plane and Hann-windowed); none where the slice has no such block."""
    smooth = gaussian_filter(hu.astype(np.float32), sigma=MASK_SMOOTHING_PX)
    low, high = SOFT_TISSUE_HU
    tissue = (smooth >= low) & (smooth <= high) & ~keep
    b = BLOCK_PX
    corners = [
        (y, x)
        for y in range(0, hu.shape[0] - b + 1, b // 2)
        for x in range(0, hu.shape[1] - b + 1, b // 2)
        if tissue[y : y + b, x : x + b].all()
    ]
    if not corners:
        return np.empty((0, b, b))
    blocks = np.stack([hu[y : y + b, x : x + b] for y, x in corners]).astype(np.float64)
    grid = np.mgrid[0:b, 0:b].reshape(2, -1) / (b - 1) - 0.5
    design = np.column_stack([np.ones(b * b), *grid])
    flat = blocks.reshape(len(blocks), -1).T
    coefficients, *_ = np.linalg.lstsq(design, flat, rcond=None)
    residual = (flat - design @ coefficients).T.reshape(blocks.shape)
    flattest = np.argsort(residual.std(axis=(1, 2)))[: max(1, int(len(blocks) * FLATTEST_SHARE))]
    window = np.outer(np.hanning(b), np.hanning(b))
    spectra: np.ndarray = np.abs(np.fft.fft2(residual[flattest] * window)) ** 2
    return spectra


def mean_frequency(spectra: np.ndarray) -> float | None:
    """The power-weighted mean radial frequency (cycles per pixel) of block spectra, above
    the lowest rings (what a plane leaves of anatomy) and up to 0.5; None with too few."""
    if len(spectra) < MIN_BLOCKS:
        return None
    b = spectra.shape[-1]
    fy, fx = np.meshgrid(np.fft.fftfreq(b), np.fft.fftfreq(b), indexing="ij")
    radius = np.hypot(fy, fx)
    ring = (radius >= 1.5 / b) & (radius <= 0.5)
    power = spectra.mean(axis=0)[ring]
    total = float(power.sum())
    return float((radius[ring] * power).sum() / total) if total > 0 else None


def sample_indices(count: int) -> list[int]:
    """Which of ``count`` slices the grain is measured on: SAMPLE_SLICES spread evenly."""
    if count <= 0:
        return []
    steps = max(1, SAMPLE_SLICES - 1)
    return sorted({round(k * (count - 1) / steps) for k in range(SAMPLE_SLICES)})


def series_grain(slices: Sequence[tuple[np.ndarray, np.ndarray]]) -> float | None:
    """The grain of a series from some of its slices, given as (HU, untouchable mask)."""
    spectra = [block_spectra(hu, keep) for hu, keep in slices]
    return mean_frequency(np.concatenate(spectra) if spectra else np.empty((0, 1, 1)))


def grain_zoom(measured: float | None, model_grain: float | None) -> float:
    """The resampling factor that brings a measured grain to the model's (above 1: the slice
    is enlarged, its grain was finer); 1 where either is unknown."""
    if measured is None or model_grain is None:
        return 1.0
    factor = float(np.clip(measured / model_grain, *ZOOM_RANGE))
    return round(round(factor / ZOOM_STEP) * ZOOM_STEP, 2)


def zoom_warnings(factor: float) -> list[str]:
    """What an operator should be told of a series' factor: one at a limit of ZOOM_RANGE
    means the grain lay beyond what resampling brings to the model's."""
    if factor not in ZOOM_RANGE:
        return []
    return [
        f"noise grain outside what resampling brings to the model's (slices resampled "
        f"x{factor:.2f}, the limit): check the result"
    ]


def denoise_resampled(
    run: Callable[[np.ndarray], np.ndarray], hu: np.ndarray, factor: float
) -> np.ndarray:
    """``run`` (slices ``[N, H, W]`` in, denoised out) on the slices resampled by ``factor``;
    the part it removed, resampled back, is taken from ``hu``."""
    if factor == 1.0:
        return run(hu)
    shape = hu.shape[1:]
    scaled_shape = tuple(max(8, int(round(n * factor))) for n in shape)
    scaled = np.stack([_resample(s, scaled_shape) for s in hu])
    removed = scaled - run(scaled)
    back = np.stack([_resample(r, shape) for r in removed])
    denoised: np.ndarray = (hu - back).astype(np.float32)
    return denoised


def _resample(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``image`` resampled to ``shape`` by a cubic spline, low-passed first when shrinking."""
    factors = [n / m for n, m in zip(shape, image.shape, strict=True)]
    source = image.astype(np.float32)
    if min(factors) < 1:
        source = gaussian_filter(source, sigma=[max(0.0, (1 / f - 1) / 2) for f in factors])
    resampled: np.ndarray = zoom(source, factors, order=3, mode="nearest", grid_mode=True)
    return resampled
