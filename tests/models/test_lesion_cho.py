"""The CHO d' of the inserted lesions (models.evaluate.lesion_cho), on synthetic slices:
flat tissue with a faint full-dose grain and independent realisations of correlated noise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from models import metrics
from models.evaluate.lesion_cho import (
    INPUT,
    ChoSlice,
    KindRois,
    cho_markdown,
    kind_dprimes,
    kind_rois,
    met,
    uniform_places,
)

SIZE, PIXEL_MM, REALISATIONS = 160, 0.5, 10


def _slice(noise_hu: float = 20.0, seed: int = 0) -> ChoSlice:
    """25 places for 3 mm discs, 9 for 10 mm ones (and one too near the edge for a ROI)."""
    rng = np.random.default_rng(seed)
    full = (40.0 + ndi.gaussian_filter(rng.normal(0.0, 4.0, (SIZE, SIZE)), 0.7)).astype(np.float32)
    grain = (ndi.gaussian_filter(rng.normal(0, 1, full.shape), 0.8) for _ in range(REALISATIONS))
    lows = [full + (noise_hu * g).astype(np.float32) for g in grain]
    small = [(y, x) for y in range(20, SIZE - 19, 30) for x in range(20, SIZE - 19, 30)]
    large = [(y, x) for y in range(32, SIZE - 31, 48) for x in range(32, SIZE - 31, 48)]
    centres = {3.0: small, 10.0: [*large, (5, 80)]}
    return ChoSlice(full, np.zeros(full.shape, bool), PIXEL_MM, centres, lows)


def _figures(
    diameter: float, contrast: float, methods: dict | None = None, noise_hu: float = 20.0
) -> dict[str, dict[str, float]]:
    everything = {INPUT: lambda hu, keep: hu, **(methods or {})}
    found = kind_rois([_slice(noise_hu)], diameter, contrast, everything)
    return kind_dprimes(found, INPUT, resamples=200)


def test_every_place_is_present_in_half_the_realisations_and_the_rois_fit() -> None:
    found = kind_rois([_slice()], 10.0, 10.0, {INPUT: lambda hu, keep: hu})
    assert isinstance(found, KindRois)
    # the place 5 px from the edge has no room for a 2 * 30 + 1 px ROI: dropped
    assert found.rois[INPUT].shape == (9 * REALISATIONS, 61, 61)
    assert found.present.sum() == (~found.present).sum() == 9 * REALISATIONS // 2
    # present ROIs carry the disc on top of the same places' absent ROIs: +10 HU at the centre
    centre = found.rois[INPUT][:, 30, 30]
    gap = centre[found.present].mean() - centre[~found.present].mean()
    assert gap == pytest.approx(10.0, abs=3.0)


def test_places_are_uniform_squares_apart_from_each_other_and_from_bone() -> None:
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:200, :200]
    hu = np.where(np.hypot(yy - 100, xx - 100) < 95, 40.0, -1000.0)
    hu = hu + np.where(np.hypot(yy - 100, xx - 140) < 15, 900.0, 0.0)  # a bone
    hu = hu + np.where(np.hypot(yy - 60, xx - 60) < 30, 25.0 * (yy % 6 < 3), 0.0)  # texture
    hu = (hu + rng.normal(0.0, 3.0, hu.shape)).astype(np.float32)
    (places,) = uniform_places(hu[None], np.zeros((1, *hu.shape), bool), half=9, count=20)
    assert 5 <= len(places) <= 20
    for i, (y, x) in enumerate(places):
        assert np.hypot(y - 100, x - 140) > 15 + 9  # the ROI keeps clear of the bone
        assert np.hypot(y - 60, x - 60) > 30  # and of the textured patch
        assert np.hypot(y - 100, x - 100) < 95 - 9  # and of the air
        assert all(max(abs(y - v), abs(x - u)) >= 14 for v, u in places[i + 1 :])


def test_bigger_and_higher_contrast_discs_are_easier_to_detect() -> None:
    faint, strong = _figures(3.0, 5.0)[INPUT], _figures(3.0, 20.0)[INPUT]
    small, large = _figures(3.0, 10.0)[INPUT], _figures(10.0, 10.0)[INPUT]
    assert strong["dprime"] > faint["dprime"] + 3 * strong["dprime_se"]
    assert large["dprime"] > small["dprime"] + 3 * small["dprime_se"]
    assert faint["auc"] < small["auc"] < strong["auc"] <= 1.0


def test_without_a_disc_the_classes_cannot_be_told_apart() -> None:
    none = _figures(3.0, 0.0)[INPUT]
    assert abs(none["dprime"]) < max(3 * none["dprime_se"], 0.5)
    assert none["auc"] == pytest.approx(0.5, abs=0.15)


def test_a_median_that_erases_small_discs_lowers_dprime_below_the_inputs() -> None:
    methods = {"median 15 px": lambda hu, keep: ndi.median_filter(hu, 15)}
    found = _figures(3.0, 10.0, methods, noise_hu=20.0)
    erased, reference = found["median 15 px"], found[INPUT]
    assert erased["dprime"] < reference["dprime"] - 3 * erased["delta_se"]
    assert erased["delta"] == pytest.approx(erased["dprime"] - reference["dprime"])
    assert not met(erased, reference)


def test_a_method_that_leaves_the_image_alone_ties_the_input_exactly() -> None:
    found = _figures(3.0, 10.0, {"copy": lambda hu, keep: hu.copy()})
    copy, reference = found["copy"], found[INPUT]
    assert copy["dprime"] == reference["dprime"]
    assert copy["delta"] == 0.0 and copy["delta_se"] == 0.0
    assert met(copy, reference)
    # the bootstrap's SE is of the size the Gaussian-score formula gives
    formula = metrics.dprime_standard_error(reference["dprime"], 125, 125)
    assert 0.5 * formula < reference["dprime_se"] < 2.5 * formula
    assert (reference["present"], reference["absent"]) == (125, 125)


def test_the_report_judges_each_kind_to_two_decimals_and_shows_the_se() -> None:
    def row(dprime: float, delta: float) -> dict[str, float]:
        return {"dprime": dprime, "dprime_se": 0.2, "delta": delta, "delta_se": 0.1}

    found = {
        "3 mm / 5 HU": {INPUT: row(1.004, 0.0), "m": row(0.996, -0.008)},
        "10 mm / 20 HU": {INPUT: row(5.0, 0.0), "m": row(4.5, -0.5)},
    }
    for rows in found.values():
        for figures in rows.values():
            figures |= {"present": 80.0, "absent": 80.0}
    text = cho_markdown(found)
    assert "| 3 mm / 5 HU | 80 + 80 | 1.00 (0.20) | 1.00 (0.20) | -0.01 (0.10) |" in text
    assert "- m: CHO d' not below the input's: MISSED for 10 mm / 20 HU (-0.50, SE 0.10)" in text
