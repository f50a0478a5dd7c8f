"""The evaluation's noise-alone NPS: two noise realisations through the same method."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from models.evaluate.cases import Case
from models.evaluate.common import ROI_PX
from models.evaluate.regions import crop
from models.evaluate.scoring import GRAIN_ZOOMS, RepeatedScans, grain_sizes

PIXEL_MM = 0.5


def _case(rng: np.random.Generator) -> Case:
    """Two slices of smooth 'anatomy' with two independent realisations of coarse noise."""
    shape = (2, 128, 128)
    anatomy = 40.0 + 240.0 * ndi.gaussian_filter(rng.normal(0, 1, shape), (0, 8, 8))
    noise = [ndi.gaussian_filter(rng.normal(0, 10, shape), (0, 1.0, 1.0)) for _ in range(2)]
    first, second = (anatomy + n for n in noise)
    rois = [(i, y, x) for i in range(2) for y in (16, 48, 80) for x in (16, 48, 80)]
    case = Case(
        "synthetic",
        anatomy,
        np.zeros(shape, bool),
        PIXEL_MM,
        (400.0, 40.0),
        {"25%": first},
        rois,
        "none",
        [],
    )
    case.repeats["25%"] = second
    return case


def test_the_input_has_no_shift_and_a_blur_moves_the_noise_peak_down() -> None:
    case = _case(np.random.default_rng(0))
    low = case.inputs["25%"]
    untouched = RepeatedScans.of(lambda hu, keep: hu, case, "25%", low, local=False)
    assert untouched.texture(1.0)["nps_noise_shift_pct"] == 0.0
    # a local (ROI-wise) run of the identity is the identity too
    local = RepeatedScans.of(lambda hu, keep: hu, case, "25%", low, local=True)
    assert np.array_equal(local.outputs[0], crop(low, case.rois, ROI_PX))

    def blur(hu: np.ndarray, keep: np.ndarray) -> np.ndarray:
        return ndi.gaussian_filter(hu, 1.5)

    blurred = np.stack([blur(s, None) for s in low])
    scans = RepeatedScans.of(blur, case, "25%", blurred, local=False)
    full = scans.texture(1.0)["nps_noise_shift_pct"]
    half = scans.texture(0.5)["nps_noise_shift_pct"]
    assert full < -20.0
    assert full < half <= 0.0


def test_a_fixed_blur_removes_less_of_a_coarser_grain() -> None:
    """The grain-size check: the same input resampled finer / as is / coarser before a blur of
    fixed pixel width, which removes most of a fine grain and least of a coarse one."""
    case = _case(np.random.default_rng(1))

    def blur(hu: np.ndarray, keep: np.ndarray) -> np.ndarray:
        return ndi.gaussian_filter(hu, 1.5)

    removed = grain_sizes(case, blur, "25%")
    assert list(removed) == [f"{z:g}" for z in GRAIN_ZOOMS]
    finer, as_is, coarser = removed.values()
    assert finer > as_is > coarser + 5.0
    assert grain_sizes(case, lambda hu, keep: hu, "25%") == dict.fromkeys(removed, 0.0)
