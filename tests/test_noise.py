"""The per-job noise figure: the mode of local standard deviations in flat soft tissue."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from node.noise import (
    NOT_MEASURABLE,
    NoiseFigure,
    measure_slice,
    noise_warnings,
    parse_noise_range,
    pixel_size_mm,
    slice_comment,
    summarise_series,
    window_pixels,
)


def _disc_slice(sigma: float, seed: int = 0, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Water-like tissue (40 HU, with a 90 HU half) in air, white noise of ``sigma`` HU."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.42 * size) ** 2
    clean = np.where(inside, np.where(xx < size / 2, 40.0, 90.0), -1000.0)
    noisy = clean + np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
    return clean.astype(np.float32), noisy.astype(np.float32)


@pytest.mark.parametrize("sigma", [8.0, 20.0])
def test_white_noise_is_measured_in_flat_tissue_despite_an_edge(sigma: float) -> None:
    clean, noisy = _disc_slice(sigma)
    keep = np.zeros_like(noisy, dtype=bool)
    figure = measure_slice(noisy, clean, keep, pixel_mm=1.0)
    assert figure is not None
    # the mode of a 5x5 sample SD of white noise sits within a few % of sigma
    assert figure.before_hu == pytest.approx(sigma, rel=0.08)
    assert figure.after_hu < 0.05 * sigma
    assert figure.drop > 0.9


def test_smoothing_lowers_the_figure_by_what_it_removes() -> None:
    _, noisy = _disc_slice(20.0, seed=1)
    keep = np.zeros_like(noisy, dtype=bool)
    mild = gaussian_filter(noisy, 0.7)
    strong = gaussian_filter(noisy, 1.5)
    mild_figure = measure_slice(noisy, mild, keep, 1.0)
    strong_figure = measure_slice(noisy, strong, keep, 1.0)
    assert mild_figure is not None and strong_figure is not None
    assert 0.2 < mild_figure.drop < strong_figure.drop < 0.95


def test_untouchable_pixels_and_bone_are_not_soft_tissue() -> None:
    _, noisy = _disc_slice(20.0)
    bone = noisy + 900.0
    assert measure_slice(bone, bone, np.zeros_like(bone, dtype=bool), 1.0) is None
    assert measure_slice(noisy, noisy, np.ones_like(noisy, dtype=bool), 1.0) is None


def test_window_follows_pixel_size_and_stays_odd() -> None:
    assert window_pixels(1.0) == 5
    assert window_pixels(0.5) == 11
    assert window_pixels(0.29) == 17
    assert window_pixels(3.0) == 5


def test_series_figure_is_the_median_of_measurable_slices() -> None:
    slices = [NoiseFigure(20.0, 10.0, 5000), None, NoiseFigure(30.0, 12.0, 4000)]
    series = summarise_series(slices)
    assert series == NoiseFigure(25.0, 11.0, 2)
    assert summarise_series([None, None]) is None
    assert series.comment() == "denoised: noise 25 -> 11 HU in flat soft tissue (56% less)"


def test_flat_water_at_zero_hu_is_measurable() -> None:
    """Water sits at 0 HU: with noise, half of it falls below 0 and must still count."""
    yy, xx = np.mgrid[:256, :256]
    inside = (yy - 128) ** 2 + (xx - 128) ** 2 < 100**2
    clean = np.where(inside, 0.0, -1000.0)
    noisy = clean + np.random.default_rng(3).normal(0.0, 40.0, clean.shape)
    figure = measure_slice(noisy, clean, np.zeros_like(inside), pixel_mm=0.8)
    assert figure is not None
    assert figure.before_hu == pytest.approx(40.0, rel=0.1)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3-60", (3.0, 60.0)),
        ("2.5-40.5", (2.5, 40.5)),
        (None, None),
        ("", None),
        ("60-3", None),
        ("lots", None),
        ("5", None),
    ],
)
def test_trained_range_from_model_metadata(
    text: str | None, expected: tuple[float, float] | None
) -> None:
    assert parse_noise_range(text) == expected


def test_warns_when_the_drop_is_small_or_the_input_noise_is_untrained() -> None:
    good = NoiseFigure(before_hu=20.0, after_hu=10.0, support=5)
    weak = NoiseFigure(before_hu=20.0, after_hu=17.0, support=5)
    loud = NoiseFigure(before_hu=80.0, after_hu=30.0, support=5)
    assert noise_warnings(good, 0.2, (3.0, 60.0)) == []
    assert noise_warnings(good, 0.2, None) == []
    [drop] = noise_warnings(weak, 0.2, (3.0, 60.0))
    assert "15%" in drop and "20%" in drop
    [untrained] = noise_warnings(loud, 0.2, (3.0, 60.0))
    assert "80 HU" in untrained and "3-60" in untrained
    assert noise_warnings(loud, 0.2, None) == []
    assert len(noise_warnings(NoiseFigure(80.0, 79.0, 3), 0.2, (3.0, 60.0))) == 2


def test_nothing_measurable_gives_no_warning_and_says_so() -> None:
    assert noise_warnings(None, 0.2, (3.0, 60.0)) == []
    assert slice_comment(None) == NOT_MEASURABLE
    figure = NoiseFigure(before_hu=21.0, after_hu=10.0, support=4000)
    assert slice_comment(figure) == "denoised: noise 21 -> 10 HU in flat soft tissue (52% less)"


def test_pixel_size_from_the_header() -> None:
    assert pixel_size_mm([0.5, 0.7]) == pytest.approx(0.6)
    assert pixel_size_mm(None) == 1.0
    assert pixel_size_mm(["x", "y"]) == 1.0
    assert pixel_size_mm([0.0, -1.0]) == 1.0
