"""Noise grain: measured on flat tissue, matched to the model's by resampling (node.grain)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy.ndimage import gaussian_filter, zoom

from devtools.onnx_models import TINY_NAME, TINY_VERSION, write_mean_filter_model
from devtools.phantom import PhantomSpec, write_phantom_series
from node.config import Settings
from node.denoise import Denoiser
from node.derive import DerivationSpec, derived_series_uid, derived_sop_uid
from node.grain import (
    denoise_resampled,
    grain_zoom,
    sample_indices,
    series_grain,
)
from node.pipeline import denoise_folder, series_grain_zoom
from tests.test_pipeline import write_enhanced_ct

PROVIDERS = ["CPUExecutionProvider"]
#: 2.2.0's grain, as its metadata gives it (chosen on the validation series).
MODEL_GRAIN = 0.205


def water(size: int = 192, noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A water slice (HU) with ``noise`` added, and its mask (nothing untouchable)."""
    hu = np.zeros((size, size), np.float32) if noise is None else noise.astype(np.float32)
    return hu, np.zeros(hu.shape, bool)


def white(size: int = 192, sd: float = 20.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sd, (size, size))


def coarse(sigma: float, size: int = 192, seed: int = 0) -> np.ndarray:
    """Noise of a coarser grain: white noise low-passed, scaled back to 20 HU."""
    field = gaussian_filter(white(size, seed=seed), sigma)
    return field * (20.0 / field.std())


def test_a_finer_grain_reads_a_higher_frequency_and_asks_for_enlarging() -> None:
    fine = series_grain([water(noise=white())])
    smooth = series_grain([water(noise=coarse(1.0))])
    smoother = series_grain([water(noise=coarse(2.0))])
    assert fine is not None and smooth is not None and smoother is not None
    assert fine > smooth > smoother
    assert grain_zoom(fine, MODEL_GRAIN) > 1.3  # white noise: enlarge
    assert grain_zoom(smoother, MODEL_GRAIN) < 0.8  # coarse grain: shrink


def test_resampling_noise_moves_its_measured_grain_by_the_same_factor() -> None:
    """The measure is physical: noise resampled by 1.5 reads 1.5 times lower in frequency,
    so the zoom that undoes a pixel-size change is that change."""
    noise = coarse(1.2, size=288)
    enlarged = zoom(noise, 1.5, order=3)
    before = series_grain([water(noise=noise)])
    after = series_grain([water(noise=enlarged)])
    assert before is not None and after is not None
    assert before / after == pytest.approx(1.5, rel=0.12)


def test_no_flat_soft_tissue_gives_no_grain_and_no_resampling() -> None:
    air = np.full((128, 128), -1000.0, np.float32)
    assert series_grain([(air, np.zeros(air.shape, bool))]) is None
    untouchable = water(noise=white())[0], np.ones((192, 192), bool)
    assert series_grain([untouchable]) is None
    assert grain_zoom(None, MODEL_GRAIN) == 1.0
    assert grain_zoom(0.3, None) == 1.0


def test_the_zoom_is_bounded_and_rounded() -> None:
    assert grain_zoom(0.5, 0.1) == 2.5
    assert grain_zoom(0.01, 0.2) == 0.5
    assert grain_zoom(0.2777, 0.2) == 1.4


def test_only_what_the_model_removed_passes_through_the_resampling() -> None:
    """A model that removes nothing returns the input exactly; one that removes a constant
    removes that constant everywhere, whatever the factor and odd shape."""
    hu = np.random.default_rng(1).normal(0, 30, (2, 37, 53)).astype(np.float32)
    for factor in (0.55, 1.0, 1.6, 2.5):
        unchanged = denoise_resampled(lambda x: x, hu, factor)
        assert unchanged.shape == hu.shape
        np.testing.assert_allclose(unchanged, hu, atol=1e-4)
        offset = denoise_resampled(lambda x: x - 7.0, hu, factor)
        np.testing.assert_allclose(offset, hu - 7.0, atol=1e-3)


def test_the_model_runs_on_the_resampled_grid() -> None:
    shapes: list[tuple[int, ...]] = []

    def run(x: np.ndarray) -> np.ndarray:
        shapes.append(x.shape)
        return x

    denoise_resampled(run, np.zeros((3, 100, 60), np.float32), 1.6)
    denoise_resampled(run, np.zeros((3, 100, 60), np.float32), 0.5)
    assert shapes == [(3, 160, 96), (3, 50, 30)]


def test_sample_spreads_over_the_series() -> None:
    assert sample_indices(0) == []
    assert sample_indices(3) == [0, 1, 2]
    picks = sample_indices(100)
    assert len(picks) == 8 and picks[0] == 0 and picks[-1] == 99


def test_the_zoom_is_part_of_the_derived_uids_and_the_description() -> None:
    plain = DerivationSpec("m", "1", 1.0, 1000, " [denoised]", "DENOISE")
    zoomed = DerivationSpec("m", "1", 1.0, 1000, " [denoised]", "DENOISE", grain_zoom=1.6)
    assert derived_series_uid("1.2.3", plain) != derived_series_uid("1.2.3", zoomed)
    assert derived_sop_uid("1.2.3.4", plain) != derived_sop_uid("1.2.3.4", zoomed)
    assert "resampled x1.60" in zoomed.description
    assert "resampled" not in plain.description
    with pytest.raises(ValueError, match="grain_zoom"):
        DerivationSpec("m", "1", 1.0, 1000, " [denoised]", "DENOISE", grain_zoom=0.0)


def grained_model(folder: Path, grain: str | None) -> Path:
    metadata = {"noise_grain": grain} if grain is not None else None
    return write_mean_filter_model(folder / "model.onnx", metadata=metadata)


def test_a_model_without_a_grain_never_resamples(tmp_path: Path) -> None:
    paths = write_phantom_series(tmp_path / "in", PhantomSpec(slices=3))
    denoiser = Denoiser(grained_model(tmp_path, None), PROVIDERS)
    assert denoiser.noise_grain is None
    assert series_grain_zoom(paths, denoiser) == 1.0
    assert Denoiser(grained_model(tmp_path, "not a number"), PROVIDERS).noise_grain is None


def test_the_shipped_model_names_its_grain() -> None:
    assert Denoiser(Settings().model_file, PROVIDERS).noise_grain == MODEL_GRAIN


def test_a_white_noise_series_is_enlarged_and_its_derived_series_says_so(tmp_path: Path) -> None:
    """The phantom's noise is white: finer than the model's grain, so the series goes
    through the model enlarged, and the header of each derived slice says by how much."""
    paths = write_phantom_series(tmp_path / "in", PhantomSpec(slices=3, size=256))
    model = grained_model(tmp_path, str(MODEL_GRAIN))
    factor = series_grain_zoom(paths, Denoiser(model, PROVIDERS))
    assert 1.3 <= factor <= 2.0
    settings = Settings(model_path=model, providers=PROVIDERS, state_dir=tmp_path / "state")
    (result,) = denoise_folder(tmp_path / "in", tmp_path / "out", settings)
    assert result.slices == 3
    derived = pydicom.dcmread(tmp_path / "out" / "0001.dcm")
    assert f"resampled x{factor:.2f}" in derived.DerivationDescription
    source = pydicom.dcmread(paths[0])
    spec_uid = derived_series_uid(
        source.SeriesInstanceUID,
        DerivationSpec(
            TINY_NAME,
            TINY_VERSION,
            settings.strength,
            settings.series_number_offset,
            settings.series_description_suffix,
            settings.ae_title,
            grain_zoom=factor,
        ),
    )
    assert derived.SeriesInstanceUID == spec_uid


def test_matching_switched_off_runs_every_series_as_it_is(tmp_path: Path) -> None:
    paths = write_phantom_series(tmp_path / "in", PhantomSpec(slices=3, size=256))
    denoiser = Denoiser(grained_model(tmp_path, str(MODEL_GRAIN)), PROVIDERS)
    assert series_grain_zoom(paths, denoiser) > 1.3
    assert series_grain_zoom(paths, denoiser, matching=False) == 1.0
    settings = Settings(
        model_path=denoiser.model_path,
        providers=PROVIDERS,
        state_dir=tmp_path / "state",
        match_noise_grain=False,
    )
    denoise_folder(tmp_path / "in", tmp_path / "out", settings)
    assert "resampled" not in pydicom.dcmread(tmp_path / "out" / "0001.dcm").DerivationDescription


def test_an_enhanced_ct_instance_is_measured_on_its_frames(tmp_path: Path) -> None:
    """One multi-frame instance: its frames are the sample, as single slices would be."""
    paths = write_phantom_series(tmp_path / "in", PhantomSpec(slices=4, size=256))
    enhanced = write_enhanced_ct(paths, tmp_path / "enhanced.dcm")
    denoiser = Denoiser(grained_model(tmp_path, str(MODEL_GRAIN)), PROVIDERS)
    assert series_grain_zoom([enhanced], denoiser) == series_grain_zoom(paths, denoiser) > 1.3
