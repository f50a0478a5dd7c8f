"""The ideal-denoiser row: built without the noise-free image, it must score as the denoiser
that knows it does (PSNR, RMSE) or better (SSIM), and no other blend of the input may beat it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from models import metrics
from models.evaluate.cases import Case
from models.evaluate.scoring import ideal_output

SHAPE = (3, 160, 160)
WINDOW = (400.0, 50.0)


def _noise(rng: np.random.Generator, std: float) -> np.ndarray:
    """CT-like correlated noise of one texture, scaled to ``std`` HU."""
    grain = ndi.gaussian_filter(rng.normal(0.0, 1.0, SHAPE), (0, 1.2, 1.2))
    return grain * (std / grain.std())


def _truth() -> np.ndarray:
    """Noise-free 'anatomy': a 40 HU body with brighter and darker blocks, air around."""
    truth = np.full(SHAPE, -1000.0)
    truth[:, 16:144, 16:144] = 40.0
    truth[:, 24:56, 90:130] = 120.0
    truth[:, 100:130, 30:60] = -80.0
    return truth


def _case(
    truth: np.ndarray, full_noise: np.ndarray, extra: np.ndarray, stand_in: np.ndarray
) -> Case:
    full = truth + full_noise
    rois = [(i, y, x) for i in range(SHAPE[0]) for y, x in ((60, 24), (60, 60), (100, 90))]
    case = Case(
        "synthetic",
        full,
        np.zeros(SHAPE, bool),
        0.5,
        WINDOW,
        {"25%": full + extra},
        rois,
        "none",
        [],
    )
    case.full_noise = stand_in
    return case


def _mse(image: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean((image - reference) ** 2))


def _ssim(images: np.ndarray, references: np.ndarray) -> float:
    pairs = zip(images, references, strict=True)
    return float(np.mean([metrics.ssim_windowed(i, r, *WINDOW) for i, r in pairs]))


def test_the_stand_in_scores_as_the_denoiser_that_knows_the_noise_free_image() -> None:
    rng = np.random.default_rng(7)
    truth, nf, ne, stand_in = _truth(), _noise(rng, 3.0), _noise(rng, 6.0), _noise(rng, 3.0)
    case = _case(truth, nf, ne, stand_in)
    built = ideal_output(case, "25%")
    assert built is not None
    w = 9.0 / (9.0 + 36.0)
    knowing = truth + w * (nf + ne)
    full = case.full
    # the error of the best estimate: (1 - w) var(Nf) = 7.2 HU^2
    assert abs(_mse(knowing, full) - 7.2) < 0.4
    assert abs(_mse(built, full) / _mse(knowing, full) - 1.0) < 0.05
    assert _ssim(built, full) >= _ssim(knowing, full)
    # other weights of the input's noise, even knowing the noise-free image, are further off
    for k in (w - 0.15, w + 0.15, 1.0):
        assert _mse(truth + k * (nf + ne), full) > _mse(knowing, full) * 1.05


def test_no_row_without_a_stand_in_or_the_condition() -> None:
    rng = np.random.default_rng(8)
    case = _case(_truth(), _noise(rng, 3.0), _noise(rng, 6.0), _noise(rng, 3.0))
    assert ideal_output(case, "10%") is None
    case.full_noise = None
    assert ideal_output(case, "25%") is None
