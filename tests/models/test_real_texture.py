"""Real low-dose noise texture in training: the split, the neighbouring-slice NPS and its
share among the sampler's measured textures (models.data, models.grain)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from models.data import (  # noqa: E402
    REAL_LOWDOSE_HELDOUT,
    REAL_LOWDOSE_TRAIN,
    REAL_LOWDOSE_VALIDATION,
    SHARED_LOWDOSE,
    CTSeries,
)
from models.grain import (  # noqa: E402
    DIFF_PATCH,
    NPS_BINS,
    NPS_PATCH,
    WINDOWS,
    GrainBank,
    _difference_power,
    analytic_nps,
    low_bins_capped,
    measure_difference_nps,
    measure_nps,
    radial_frequency,
    radial_profile,
    real_profiles,
    shaped_noise,
)


def test_the_real_low_dose_splits_are_disjoint_and_keep_ten_held_out() -> None:
    splits = (REAL_LOWDOSE_TRAIN, REAL_LOWDOSE_VALIDATION, REAL_LOWDOSE_HELDOUT)
    names = [name for split in splits for name in split]
    assert len(names) == len(set(names)) == 20
    assert [len(split) for split in splits] == [5, 5, 10]
    outside_validation = sorted(REAL_LOWDOSE_TRAIN + REAL_LOWDOSE_HELDOUT)
    assert list(REAL_LOWDOSE_TRAIN) == outside_validation[::3]


def _known_profile(window: str, cutoff: float) -> np.ndarray:
    nps = analytic_nps(
        radial_frequency(NPS_PATCH), torch.tensor([WINDOWS.index(window)]), torch.tensor([cutoff])
    )[0]
    profile = radial_profile(nps.numpy())
    return profile / profile.sum()


def _stack_with_anatomy(std_hu: float) -> CTSeries:
    """Eight slices of the same soft-tissue anatomy (a muscle disc in fat, a 30 HU stripe
    pattern of 8 px period), 3 HU brighter per slice, plus independent Hann 0.3 noise."""
    n, size = 8, 160
    yy, xx = np.mgrid[:size, :size]
    anatomy = np.where((yy - 80) ** 2 + (xx - 80) ** 2 < 50**2, 50.0, -80.0)
    anatomy = anatomy + 30.0 * np.sin(2 * np.pi * xx / 8)
    nps = analytic_nps(
        radial_frequency(size), torch.tensor([WINDOWS.index("hann")]), torch.tensor([0.3])
    )
    noise = shaped_noise(nps.repeat(n, 1, 1), torch.Generator().manual_seed(0)).numpy()
    hu = np.stack([anatomy + 3.0 * i for i in range(n)]) + std_hu * noise
    return CTSeries("synthetic", hu.astype(np.float32), np.zeros(hu.shape, bool), [])


def test_slice_differences_measure_the_known_noise_texture_and_std_under_anatomy() -> None:
    series = _stack_with_anatomy(std_hu=20.0)
    profile, std = measure_difference_nps(series)
    known = _known_profile("hann", 0.3)
    assert profile.sum() == pytest.approx(1.0)
    assert std == pytest.approx(20.0, rel=0.1)
    # unit-power profiles overlap by >= 90 % with the truth, and not with another texture
    assert np.abs(profile - known).sum() < 0.2
    assert np.abs(profile - _known_profile("ramp", 0.5)).sum() > 0.5
    # one slice at a time, the disc's edge and the stripes pass for noise
    single, single_std = measure_nps(series)
    assert single_std > 1.5 * 20.0
    assert np.abs(single - known).sum() > 0.5


def _stack_with_drifting_anatomy(std_hu: float) -> CTSeries:
    """Twelve slices of soft tissue (40 HU) whose organ-sized structure (a 36 x 44 px wave,
    0.02-0.04 cycles/px) grows by 12 HU per slice, plus independent Hann 0.3 noise: anatomy
    that changes slowly along z but does not cancel in neighbouring-slice differences."""
    n, size = 12, 192
    yy, xx = np.mgrid[:size, :size]
    wave = np.sin(2 * np.pi * xx / 36) * np.sin(2 * np.pi * yy / 44)
    nps = analytic_nps(
        radial_frequency(size), torch.tensor([WINDOWS.index("hann")]), torch.tensor([0.3])
    )
    noise = shaped_noise(nps.repeat(n, 1, 1), torch.Generator().manual_seed(3)).numpy()
    hu = np.stack([40.0 + 12.0 * (i - n / 2) * wave for i in range(n)]) + std_hu * noise
    return CTSeries("drifting", hu.astype(np.float32), np.zeros(hu.shape, bool), [])


def test_anatomy_that_drifts_along_z_is_kept_out_of_the_lowest_bins() -> None:
    """Session 12: anatomy left in the slice differences piled up below 0.06 cycles/px;
    the second gap (slices i, i + 2) and the cap take it out."""
    series = _stack_with_drifting_anatomy(std_hu=20.0)
    known = _known_profile("hann", 0.3)
    low = slice(0, 4)  # below 0.0625 cycles/px
    profile, std = measure_difference_nps(series)
    assert profile[low].sum() < known[low].sum() + 0.01
    assert np.abs(profile - known).sum() < 0.15
    assert std == pytest.approx(20.0, rel=0.1)
    # one gap alone (session 11's measurement) reads the drift as low-frequency noise
    power, variance = _difference_power(series, 1, DIFF_PATCH // 4)
    single = radial_profile(power)
    single = single / single.sum()
    assert single[low].sum() > known[low].sum() + 0.05
    assert np.abs(single - known).sum() > 0.15


def test_the_cap_lowers_only_low_bins_above_their_neighbours() -> None:
    rising = np.concatenate([np.linspace(0.0, 1.0, 8), np.linspace(1.0, 0.1, NPS_BINS - 8)])
    assert np.allclose(low_bins_capped(rising), rising)  # an FBP-like rise is kept
    assert np.allclose(low_bins_capped(_known_profile("hann", 0.3)), _known_profile("hann", 0.3))
    bumped = rising.copy()
    bumped[1:4] += 1.0  # power piled up below 0.0625 cycles/px
    capped = low_bins_capped(bumped)
    assert np.allclose(capped[4:], rising[4:])
    assert np.allclose(capped[1:4], rising[4:7].max())


def _bank(real_prob: float) -> GrainBank:
    """Phantom texture white, real texture below 0.05 cycles/px only; no stretch, no blur."""
    config = {
        "grain_measured_prob": 1.0,
        "grain_real_prob": real_prob,
        "grain_pixel_scale": (1.0, 1.0),
        "grain_blur_prob": 0.0,
    }
    low = np.zeros(NPS_BINS)
    low[:3] = 1.0
    return GrainBank(config, [np.ones(NPS_BINS)], real=[low / low.sum()])


@pytest.mark.parametrize("real_prob", [0.0, 0.5, 1.0])
def test_measured_textures_are_real_low_dose_ones_with_the_configured_share(
    real_prob: float,
) -> None:
    size = 32
    nps = _bank(real_prob).nps(400, size, torch.Generator().manual_seed(1))
    high = radial_frequency(size) > 0.1
    real_share = float((nps[:, high].amax(dim=1) == 0).float().mean())
    assert real_share == pytest.approx(real_prob, abs=0.07)


def test_real_profiles_refuse_a_series_that_is_not_in_the_training_split() -> None:
    with pytest.raises(ValueError, match="not a real low-dose training series"):
        real_profiles((REAL_LOWDOSE_HELDOUT[0],))


def test_real_profiles_need_the_phantoms_profiles_beside_them() -> None:
    with pytest.raises(ValueError, match="join the phantoms"):
        GrainBank({}, [], real=[np.ones(NPS_BINS)])


@pytest.mark.skipif(
    not (SHARED_LOWDOSE / REAL_LOWDOSE_TRAIN[0]).is_dir(), reason="shared real low-dose data absent"
)
def test_a_real_series_profile_is_measured_once_and_read_back_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DENOISE_NODE_CACHE_DIR", str(tmp_path))
    name = REAL_LOWDOSE_TRAIN[0]
    profile, std = real_profiles((name,))[name]
    assert profile.sum() == pytest.approx(1.0)
    assert 5.0 < std < 60.0  # low-dose soft tissue at 10-18 mAs
    assert len(list((tmp_path / "nps").glob(f"{name}-*.npz"))) == 1
    again, std_again = real_profiles((name,))[name]
    assert np.array_equal(again, profile) and std_again == std
