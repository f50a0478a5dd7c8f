"""The image-quality metrics on synthetic phantoms whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.special import erf

from models import metrics

PIXEL_MM = 0.5


def _gaussian_mtf50(sigma_px: float, pixel_mm: float) -> float:
    """A Gaussian PSF of std sigma has MTF exp(-2 pi^2 sigma^2 f^2): MTF50 in cycles/mm."""
    return np.sqrt(np.log(2.0) / (2.0 * np.pi**2)) / (sigma_px * pixel_mm)


def _blurred_edge(distance_px: np.ndarray, sigma_px: float, contrast: float) -> np.ndarray:
    """An ideal step of ``contrast`` blurred by a Gaussian of std ``sigma_px``, point-sampled."""
    return contrast * 0.5 * (1.0 - erf(distance_px / (sigma_px * np.sqrt(2.0))))


def test_psnr_of_identical_images_is_infinite_and_ssim_is_one() -> None:
    img = np.random.default_rng(0).normal(40, 20, (64, 64))
    assert metrics.psnr_windowed(img, img, 80, 40) == float("inf")
    assert metrics.ssim_windowed(img, img, 80, 40) == pytest.approx(1.0)


def test_psnr_matches_the_noise_added_in_the_window() -> None:
    """Noise of std s HU in a W-wide window, nothing clipped: PSNR = -20 log10(s / W)."""
    rng = np.random.default_rng(1)
    ref = np.full((256, 256), 40.0)
    noisy = ref + rng.normal(0, 2.0, ref.shape)
    expected = -20 * np.log10(np.std(noisy - ref) / 80.0)
    assert metrics.psnr_windowed(noisy, ref, 80, 40) == pytest.approx(expected, abs=0.05)
    assert metrics.ssim_windowed(noisy, ref, 80, 40) < 1.0


def test_window_clips_and_scales() -> None:
    out = metrics.window(np.array([-1000.0, 0.0, 40.0, 80.0, 3000.0]), 80, 40)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_rmse_and_body_mask() -> None:
    hu = np.full((64, 64), -1000.0)
    yy, xx = np.indices(hu.shape)
    body = np.hypot(yy - 32, xx - 32) < 20
    hu[body] = 40.0
    hu[30:34, 30:34] = -900.0  # air inside the body (bowel gas) belongs to the body
    hu[0:3, 0:10] = 100.0  # a small separate blob (the table) does not
    untouchable = np.zeros_like(body)
    untouchable[:, 60:] = True
    mask = metrics.body_mask(hu, untouchable)
    assert mask[30:34, 30:34].all() and not mask[0:3, 0:10].any() and not mask[:, 60:].any()
    assert mask.sum() == body.sum()
    assert metrics.rmse_hu(hu + 3.0, hu, mask) == pytest.approx(3.0)


def test_roi_noise_and_bias() -> None:
    rng = np.random.default_rng(2)
    rois = 50.0 + rng.normal(0, 10.0, (40, 32, 32))
    assert metrics.roi_noise(rois).mean() == pytest.approx(10.0, rel=0.02)
    assert metrics.roi_mean(rois).mean() == pytest.approx(50.0, abs=0.2)
    # a slow background (cupping, grey/white matter) is not noise
    yy, xx = np.mgrid[:32, :32] / 32.0
    shaded = rois + 30.0 * (xx - 0.5) ** 2 + 15.0 * yy
    assert metrics.roi_noise(shaded).mean() == pytest.approx(10.0, rel=0.02)
    assert metrics.noise_reduction_percent(4.0, 10.0) == pytest.approx(60.0)


@pytest.mark.parametrize("sigma_px", [0.8, 1.5])
def test_mtf50_of_a_blurred_slanted_edge(sigma_px: float) -> None:
    yy, xx = np.indices((48, 48), dtype=np.float64)
    angle = np.deg2rad(5.0)
    distance = (xx - 24.3) * np.cos(angle) + (yy - 24.0) * np.sin(angle)
    patch = _blurred_edge(distance, sigma_px, 1000.0) - 1000.0
    found = metrics.straight_edge_distances(patch)
    # the fitted edge matches the true one to a small fraction of a pixel, up to the sign
    assert np.abs(np.abs(found) - np.abs(distance))[8:-8, 8:-8].max() < 0.1
    esf = metrics.edge_spread(found, patch, bin_px=0.25, half_width_px=12.0)
    freqs, mtf = metrics.mtf_from_esf(esf, 0.25, PIXEL_MM)
    expected = _gaussian_mtf50(sigma_px, PIXEL_MM)
    assert metrics.mtf_frequency(freqs, mtf, 0.5) == pytest.approx(expected, rel=0.05)
    expected10 = np.sqrt(np.log(10.0) / (2.0 * np.pi**2)) / (sigma_px * PIXEL_MM)
    assert metrics.mtf_frequency(freqs, mtf, 0.1) == pytest.approx(expected10, rel=0.05)


def test_mtf50_of_a_blurred_round_insert_with_noise() -> None:
    """A 20-px-radius insert, 1000 HU contrast, Gaussian blur and 10 HU noise."""
    sigma_px = 1.2
    distance = metrics.circular_edge_distances((96, 96), (47.6, 48.3), 20.0)
    image = _blurred_edge(distance, sigma_px, 1000.0)
    image += np.random.default_rng(3).normal(0, 10.0, image.shape)
    esf = metrics.edge_spread(distance, image, bin_px=0.1, half_width_px=10.0)
    freqs, mtf = metrics.mtf_from_esf(esf, 0.1, PIXEL_MM)
    mtf50 = metrics.mtf_frequency(freqs, mtf, 0.5)
    assert mtf50 == pytest.approx(_gaussian_mtf50(sigma_px, PIXEL_MM), rel=0.07)


def test_sharper_edge_has_higher_mtf50() -> None:
    distance = metrics.circular_edge_distances((96, 96), (48.0, 48.0), 20.0)
    found = []
    for sigma_px in (0.7, 1.0, 2.0):
        esf = metrics.edge_spread(distance, _blurred_edge(distance, sigma_px, 500.0))
        found.append(metrics.mtf_frequency(*metrics.mtf_from_esf(esf, 0.1, PIXEL_MM), 0.5))
    assert found[0] > found[1] > found[2]


def test_white_noise_has_a_flat_nps_that_integrates_to_the_variance() -> None:
    rng = np.random.default_rng(4)
    sigma = 12.0
    rois = 30.0 + rng.normal(0, sigma, (200, 32, 32))
    nps = metrics.nps_2d(rois, PIXEL_MM)
    assert nps.mean() == pytest.approx(sigma**2 * PIXEL_MM**2, rel=0.03)
    df = 1.0 / (32 * PIXEL_MM)
    assert nps.sum() * df * df == pytest.approx(sigma**2, rel=0.03)
    freqs, radial = metrics.radial_nps(nps, PIXEL_MM)
    assert freqs[-1] == pytest.approx(1.0 / (2 * PIXEL_MM))
    # flat, except the lowest bin, which the quadratic detrending partly removes
    assert radial[2:].std() / radial[2:].mean() < 0.1
    assert 0.3 < radial[1] / radial[2:].mean() < 1.0


def test_nps_peak_of_band_pass_noise() -> None:
    """Noise filtered by H(f) = f exp(-f^2 / (2 s^2)) has |H|^2 peaking at f = s."""
    rng = np.random.default_rng(5)
    n, count, s = 64, 100, 0.4  # s in cycles/mm, below Nyquist 1.0
    rois = _band_pass_noise(rng, count, n, s)
    freqs, radial = metrics.radial_nps(metrics.nps_2d(rois, PIXEL_MM), PIXEL_MM)
    assert metrics.nps_peak_frequency(freqs, radial) == pytest.approx(s, abs=0.5 * freqs[1])
    smoother = ndi.gaussian_filter(rois, (0, 1.5, 1.5))
    freqs, radial_smooth = metrics.radial_nps(metrics.nps_2d(smoother, PIXEL_MM), PIXEL_MM)
    # over-smoothing shifts the texture to lower frequencies
    assert metrics.nps_peak_frequency(freqs, radial_smooth) < 0.8 * s
    assert metrics.nps_mean_frequency(freqs, radial_smooth) < metrics.nps_mean_frequency(
        freqs, radial
    )


def _band_pass_noise(rng: np.random.Generator, count: int, n: int, s: float) -> np.ndarray:
    """Noise whose NPS peaks at ``s`` cycles/mm (see the test above)."""
    f = np.fft.fftfreq(n, d=PIXEL_MM)
    radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    transfer = radius * np.exp(-(radius**2) / (2 * s * s))
    return np.real(np.fft.ifft2(np.fft.fft2(rng.normal(0, 1, (count, n, n))) * transfer))


def test_repeated_scans_measure_the_noise_without_the_anatomy() -> None:
    """Shared content (anatomy, full-dose grain) cancels between two scans; a single scan's
    NPS peak is pulled down by it once a denoiser lowers the noise."""
    rng = np.random.default_rng(6)
    n, count, s = 64, 80, 0.4
    anatomy = 3.0 * _band_pass_noise(rng, count, n, 0.1)  # fixed, low-frequency structure
    first = anatomy + _band_pass_noise(rng, count, n, s)
    second = anatomy + _band_pass_noise(rng, count, n, s)
    freqs, alone = metrics.repeated_scan_nps(first, second, PIXEL_MM)
    assert metrics.nps_peak_frequency(freqs, alone) == pytest.approx(s, abs=0.5 * freqs[1])
    # a denoiser that only scales the noise down keeps its texture ...
    quieter = [anatomy + 0.3 * (scan - anatomy) for scan in (first, second)]
    freqs, after = metrics.repeated_scan_nps(*quieter, PIXEL_MM)
    assert metrics.nps_peak_frequency(freqs, after) == pytest.approx(s, abs=0.5 * freqs[1])
    assert after.sum() == pytest.approx(0.09 * alone.sum(), rel=1e-6)
    # ... where a single scan's NPS sees the anatomy and moves its peak down
    freqs, single = metrics.radial_nps(metrics.nps_2d(quieter[0], PIXEL_MM), PIXEL_MM)
    assert metrics.nps_peak_frequency(freqs, single) < 0.6 * s
    # and a blur moves the noise-alone peak down
    blurred = [ndi.gaussian_filter(scan, (0, 1.5, 1.5)) for scan in (first, second)]
    freqs, smooth = metrics.repeated_scan_nps(*blurred, PIXEL_MM)
    assert metrics.nps_peak_frequency(freqs, smooth) < 0.8 * s


def test_add_disc_has_the_right_area_and_contrast() -> None:
    image = metrics.add_disc(np.zeros((64, 64), np.float32), (31.3, 32.7), 8.0, 10.0)
    assert image.dtype == np.float32
    assert image.sum() / 10.0 == pytest.approx(np.pi * 8.0**2, rel=0.01)
    assert image.max() == pytest.approx(10.0)


def test_dprime_standard_error_shrinks_with_more_images() -> None:
    small = metrics.dprime_standard_error(2.0, 50, 50)
    assert small == pytest.approx(np.sqrt(0.04 + 4.0 / 200.0))
    assert metrics.dprime_standard_error(2.0, 200, 200) == pytest.approx(small / 2)


def test_laguerre_gauss_channels_are_orthonormal() -> None:
    channels = metrics.laguerre_gauss_channels(64, 10.0, 5)
    np.testing.assert_allclose(channels @ channels.T, np.eye(5), atol=0.02)


def _cho_rois(contrast_hu: float, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated-noise ROIs (CT-like texture) with and without a 5-px-radius disc."""
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.normal(0, 30.0, (2 * count, 32, 32)), (0, 1.0, 1.0))
    disc = metrics.add_disc(np.zeros((32, 32)), (15.5, 15.5), 5.0, contrast_hu)
    return noise[:count] + disc, noise[count:]


def test_cho_is_at_chance_without_a_signal_and_sure_with_a_strong_one() -> None:
    channels = metrics.laguerre_gauss_channels(32, 12.0, 6)
    auc, dprime = metrics.cho_detectability(*_cho_rois(0.0, 200, 6), channels)
    assert auc == pytest.approx(0.5, abs=0.08) and abs(dprime) < 0.35
    auc, dprime = metrics.cho_detectability(*_cho_rois(20.0, 200, 7), channels)
    assert auc > 0.99 and dprime > 3.0
    weak_auc, weak_dprime = metrics.cho_detectability(*_cho_rois(3.0, 200, 8), channels)
    assert 0.55 < weak_auc < auc and weak_dprime < dprime
