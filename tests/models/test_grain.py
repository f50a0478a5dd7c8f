"""Noise of many textures (models.grain) and the sampler's patches that carry it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from models.data import CTSeries  # noqa: E402
from models.grain import (  # noqa: E402
    NPS_BINS,
    WINDOWS,
    analytic_nps,
    measure_nps,
    radial_frequency,
    shaped_noise,
    stretched_profile,
)
from models.sampler import PatchSampler  # noqa: E402


def _neighbour_correlation(noise: torch.Tensor) -> float:
    a, b = noise[..., :, :-1].reshape(-1), noise[..., :, 1:].reshape(-1)
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _mean_frequency(nps: torch.Tensor, radius: torch.Tensor) -> float:
    return float((nps * radius).sum() / nps.sum())


def test_a_smooth_window_at_a_low_cutoff_gives_a_coarser_grain_of_unit_variance() -> None:
    radius = radial_frequency(64)
    windows = torch.tensor([WINDOWS.index("ramp"), WINDOWS.index("hann")])
    nps = analytic_nps(radius, windows, torch.tensor([0.5, 0.2]))
    noise = shaped_noise(nps.repeat_interleave(8, dim=0), torch.Generator().manual_seed(0))
    sharp, smooth = noise[:8], noise[8:]
    assert float(sharp.std()) == pytest.approx(1.0, rel=0.05)
    assert float(smooth.std()) == pytest.approx(1.0, rel=0.1)
    assert _neighbour_correlation(smooth) > 0.7 > _neighbour_correlation(sharp)


def test_smaller_pixels_stretch_a_measured_profile_to_lower_frequencies() -> None:
    radius = radial_frequency(64)
    profile = torch.ones(2, NPS_BINS)
    nps = stretched_profile(profile, radius, torch.tensor([1.0, 0.5]))
    assert _mean_frequency(nps[1], radius) == pytest.approx(
        _mean_frequency(nps[0], radius) / 2, rel=0.1
    )
    assert float(nps[1][radius > 0.26].max()) == 0.0


def test_the_nps_of_white_noise_in_a_water_disc_is_flat_with_its_std() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    water = (yy - 128) ** 2 + (xx - 128) ** 2 < 110**2
    hu = np.where(water, 0.0, -1000.0) + np.where(water, rng.normal(0, 5.0, (4, 256, 256)), 0)
    series = CTSeries("water", hu.astype(np.float32), np.zeros(hu.shape, bool), [])
    profile, std = measure_nps(series)
    assert std == pytest.approx(5.0, rel=0.1)
    assert profile.sum() == pytest.approx(1.0)
    assert profile[2:].max() / profile[2:].min() < 1.5


def _two_series() -> list[dict]:
    """Two series whose slices are flat at 0, 30, 60 HU and 1000, 1030, 1060 HU."""
    out = []
    for base in (0.0, 1000.0):
        full = np.stack([np.full((32, 32), base + 30.0 * i, np.float32) for i in range(3)])
        out.append({"full": full, "keep": np.zeros(full.shape, bool), "low": {0.5: full.copy()}})
    return out


def _config(**overrides: object) -> dict:
    config = {"patch": 16, "batch": 64, "doses": [0.5], "dose_weights": [1.0], "grain_prob": 1.0}
    return config | overrides


def test_grain_patches_carry_noise_on_their_full_dose_target() -> None:
    x, y, m = PatchSampler(_two_series(), _config(native_noise_hu=4.0), seed=0).draw()
    assert m.all()
    assert set(torch.unique(y).tolist()) <= {0.0, 30.0, 60.0, 1000.0, 1030.0, 1060.0}
    per_patch = (x - y).std(dim=(1, 2, 3))
    # 4 HU x level 0.6..2.5 x sqrt(1 / d - 1) for d in 5..90 %
    assert float(per_patch.min()) > 0.5 and float(per_patch.max()) < 60.0
    assert float(per_patch.max()) > 3 * float(per_patch.min())


def test_thick_slabs_average_neighbouring_slices_of_one_series() -> None:
    config = _config(slab_prob=1.0, slab_max=3)
    _, y, _ = PatchSampler(_two_series(), config, seed=0).draw()
    values = set(torch.unique(torch.round(y, decimals=3)).tolist())
    # two slices: 15 or 45; three: 30; never across series, never a slice twice
    assert values <= {15.0, 30.0, 45.0, 1015.0, 1030.0, 1045.0}
    assert values & {15.0, 45.0, 1015.0, 1045.0} and values & {30.0, 1030.0}
