"""Noise in flat soft tissue, before and after denoising: what the node reports per job.

A radiologist and an admin need to see, series by series, what the denoiser did, without a
full-dose reference.  The measure is the global noise level of Christianson et al. (AJR 2015,
"Automated technique to measure noise in clinical CT examinations"): the standard deviation
in a small window (about 5 mm) around every soft-tissue pixel (0-100 HU there, -50 to 150
HU here, see SOFT_TISSUE_HU), and the mode of their histogram.  Most soft tissue is flat
at that scale, so the mode is the noise of flat tissue while edges and texture sit in the
histogram's tail.  The same pixels are measured in the input and in the output, so the two
figures compare like with like.

The window is small, so noise grain coarser than the window is partly missed; the figure is
an index for comparing before and after on one series, not an absolute noise that compares
scanners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, minimum_filter, uniform_filter

#: Soft tissue (HU) whose local standard deviation is measured.  Christianson's band is
#: 0-100 HU; it is widened here because water (0 HU: phantoms, fluid, bladder) sat on its
#: edge, so half of a flat water region fell out of the mask and how much did depended on
#: the noise itself.  Fat (-100 HU) and bone stay out.
SOFT_TISSUE_HU = (-50.0, 150.0)
#: Side of the local window in mm (odd number of pixels, at least 5).
WINDOW_MM = 5.0
#: A slice needs this many soft-tissue pixels away from edges for a figure.
MIN_PIXELS = 2000
#: Bins of the local-SD histogram whose mode is the noise.
HISTOGRAM_BINS = 200
#: What ImageComments and the job say where a slice or series has no flat soft tissue.
NOT_MEASURABLE = "denoised: noise not measurable (no flat soft tissue)"


@dataclass(frozen=True)
class NoiseFigure:
    """Noise (HU) in flat soft tissue of one slice or series, before and after denoising."""

    before_hu: float
    after_hu: float
    #: Soft-tissue pixels (slice) or measurable slices (series) behind the figure.
    support: int

    @property
    def drop(self) -> float:
        """The relative drop, 0.4 for 40 % less noise."""
        return 1.0 - self.after_hu / self.before_hu if self.before_hu > 0 else 0.0

    def comment(self) -> str:
        """One line for ImageComments and the job: what a radiologist reads in any viewer."""
        return (
            f"denoised: noise {self.before_hu:.0f} -> {self.after_hu:.0f} HU "
            f"in flat soft tissue ({self.drop:.0%} less)"
        )


def slice_comment(figure: NoiseFigure | None) -> str:
    """ImageComments of a derived slice: its own figure, or that it has none."""
    return figure.comment() if figure is not None else NOT_MEASURABLE


def pixel_size_mm(pixel_spacing: object) -> float:
    """The mean pixel size of a PixelSpacing value; 1 mm where the header has none usable."""
    try:
        sizes = [float(v) for v in pixel_spacing]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return 1.0
    usable = [v for v in sizes if np.isfinite(v) and v > 0]
    return float(np.mean(usable)) if usable else 1.0


def parse_noise_range(text: str | None) -> tuple[float, float] | None:
    """The model's trained input-noise range from its ONNX metadata (``"3-60"``, HU), or None.

    A model without the entry (or with one that does not parse) is not checked.
    """
    if not text:
        return None
    low, sep, high = text.partition("-")
    try:
        bounds = (float(low), float(high))
    except ValueError:
        return None
    return bounds if sep and 0 <= bounds[0] < bounds[1] else None


def noise_warnings(
    figure: NoiseFigure | None, warn_drop: float, trained: tuple[float, float] | None
) -> list[str]:
    """What an operator should be told about a series' noise figure (the series is still sent).

    No warning where nothing was measurable: the job says "not measurable" instead.
    """
    if figure is None:
        return []
    warnings = []
    if figure.drop < warn_drop:
        warnings.append(
            f"noise dropped by {figure.drop:.0%} only ({figure.before_hu:.0f} -> "
            f"{figure.after_hu:.0f} HU in flat soft tissue), less than the expected {warn_drop:.0%}"
        )
    if trained is not None and not trained[0] <= figure.before_hu <= trained[1]:
        warnings.append(
            f"input noise {figure.before_hu:.0f} HU lies outside what the model was trained on "
            f"({trained[0]:g}-{trained[1]:g} HU): check the result"
        )
    return warnings


def window_pixels(pixel_mm: float) -> int:
    """The local window's side in pixels for this pixel size: odd, at least 5."""
    side = max(5, int(round(WINDOW_MM / max(pixel_mm, 1e-3))))
    return side + 1 - side % 2


def soft_tissue_mask(hu: np.ndarray, keep: np.ndarray, side: int) -> np.ndarray:
    """Soft-tissue pixels whose whole window is soft tissue, judged on a lightly smoothed image
    so the noise itself does not punch holes in the mask."""
    smooth = gaussian_filter(hu.astype(np.float32), sigma=1.0)
    low, high = SOFT_TISSUE_HU
    tissue = (smooth >= low) & (smooth <= high) & ~keep
    # a square erosion as a separable minimum filter: the same mask, twice as fast
    eroded: np.ndarray = minimum_filter(tissue.view(np.uint8), side, mode="constant") > 0
    return eroded


def local_sd(hu: np.ndarray, side: int) -> np.ndarray:
    """Standard deviation of every ``side`` x ``side`` window, unbiased.

    In float32 (half the time of float64: it runs for every slice in the worker's writer
    stage), centred on the soft-tissue band so that the squares stay small: within the
    band the result is within 0.001 HU of float64's.
    """
    x = hu.astype(np.float32) - np.float32(sum(SOFT_TISSUE_HU) / 2)
    mean = uniform_filter(x, side, mode="nearest")
    mean_sq = uniform_filter(x * x, side, mode="nearest")
    n = side * side
    variance = np.clip(mean_sq - mean * mean, 0.0, None) * np.float32(n / (n - 1))
    sd: np.ndarray = np.sqrt(variance)
    return sd


def histogram_mode(values: np.ndarray) -> float:
    """The most common value of a local-SD sample (a smoothed histogram's peak)."""
    top = float(np.percentile(values, 99))
    if top <= 0:
        return 0.0
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, top))
    smoothed = gaussian_filter(counts.astype(np.float64), sigma=2.0, mode="constant")
    peak = int(np.argmax(smoothed))
    return float((edges[peak] + edges[peak + 1]) / 2)


def measure_slice(
    before_hu: np.ndarray, after_hu: np.ndarray, keep: np.ndarray, pixel_mm: float
) -> NoiseFigure | None:
    """Noise of one slice before and after, or None where it has too little flat soft tissue."""
    side = window_pixels(pixel_mm)
    mask = soft_tissue_mask(before_hu, keep, side)
    support = int(mask.sum())
    if support < MIN_PIXELS:
        return None
    before = histogram_mode(local_sd(before_hu, side)[mask])
    after = histogram_mode(local_sd(after_hu, side)[mask])
    return NoiseFigure(before_hu=before, after_hu=after, support=support)


def summarise_series(slices: list[NoiseFigure | None]) -> NoiseFigure | None:
    """The series' figure: medians over its measurable slices; None when none is measurable."""
    measured = [s for s in slices if s is not None]
    if not measured:
        return None
    return NoiseFigure(
        before_hu=float(np.median([s.before_hu for s in measured])),
        after_hu=float(np.median([s.after_hu for s in measured])),
        support=len(measured),
    )
