"""Noise grain of many scanners, kernels and pixel sizes, synthesised in the image domain.

Why: 2.2.0 was trained on the projection-domain simulation of three series, whose noise
texture (noise power spectrum, NPS) is each scanner's own, so it learned a narrow band of
grain sizes and removes little outside it (issue #17: 11-53 % of the added noise across a
grid of FBP filters and pixel scales).  Here every training patch can get noise of another
texture: a radial NPS drawn at random, either

- analytic filtered back projection: ``f * W(f / fc)^2`` below the cutoff ``fc``, with the
  window ``W`` a ramp, Shepp-Logan or Hann apodisation; or
- measured on a real water phantom (Siemens head / body kernels, GE Revolution STANDARD),
  or on real low-dose patient series from differences of neighbouring slices (GE Discovery
  ST: the texture of real low-dose noise, which no simulation made), once, cached, then
  stretched as if the image were resampled to another pixel size;

and, for both, an optional Gaussian blur (smoother kernels, slice interpolation).  White noise
shaped by the square root of that NPS, normalised to unit variance, is the noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage as ndi

from models.data import (
    REAL_LOWDOSE_TRAIN,
    SHARED_CT,
    SHARED_LOWDOSE,
    CTSeries,
    cache_dir,
    load_series,
)

#: Water phantoms whose noise texture is measured (all are training data: no anatomy).
WATER_PHANTOMS = (
    "phantom-siemens-edge-water-head-Hf38s",
    "phantom-siemens-edge-water-body-Br38f",
    "phantom-ge-revolution-atcm",
)
#: Radial NPS bins over 0 .. 0.5 cycles per pixel; square patches measured.
NPS_BINS, NPS_PATCH = 32, 64
#: Water (and water-equivalent plastic) HU range a flat patch must stay inside.
FLAT_RANGE_HU = (-150.0, 250.0)
#: Reconstruction windows of the analytic NPS, in the order their index is drawn.
WINDOWS = ("ramp", "shepp-logan", "hann")
#: Bump when the measurement changes: part of the cache file name.
NPS_VERSION = "nps-v1"
#: Patient series: square patches of neighbouring-slice differences (smaller than NPS_PATCH:
#: a cropped limb holds few 64 px squares of soft tissue; zero-padded to NPS_PATCH for the
#: FFT, so the profile has the phantoms' bins), and the smoothing (px) of the pair's mean
#: that decides what is soft tissue (raw low-dose pixels stray outside FLAT_RANGE_HU).
DIFF_PATCH, DIFF_SMOOTH_PX = 48, 3.0
#: Below this frequency (cycles/px) a patient profile is capped at the highest of the
#: DIFF_CAP_FROM bins above it (:func:`low_bins_capped`).
DIFF_CAP_BELOW, DIFF_CAP_FROM = 0.0625, 3
#: v2 (session 12): the anatomy left in the differences extrapolated out with a second gap.
DIFF_NPS_VERSION = "nps-diff-v2"


def _plane_detrended(block: np.ndarray) -> np.ndarray:
    """The block minus its least-squares plane (a slow trend is not grain)."""
    n = block.shape[0]
    yy, xx = np.mgrid[:n, :n].astype(np.float64) / n - 0.5
    basis = np.stack([np.ones_like(xx), xx, yy]).reshape(3, -1).T
    values = block.reshape(-1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(basis, values, rcond=None)
    return (values - basis @ coef).reshape(n, n)


def radial_profile(nps2d: np.ndarray) -> np.ndarray:
    """Mean of a 2-D NPS (unshifted FFT layout) in NPS_BINS rings over 0 .. 0.5 cycles/px."""
    n = nps2d.shape[0]
    f = np.fft.fftfreq(n)
    radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    bins = (radius / 0.5 * NPS_BINS).astype(int)
    out = np.zeros(NPS_BINS)
    for b in range(NPS_BINS):
        ring = bins == b
        out[b] = nps2d[ring].mean() if ring.any() else 0.0
    return out


def _flatter_half(found: list[tuple[float, np.ndarray]], name: str) -> tuple[np.ndarray, float]:
    """Radial NPS (unit total power) and std of the flatter half of detrended patches: the
    others hold edges (inserts, a phantom's rim, anatomy that did not cancel)."""
    if len(found) < 4:
        raise ValueError(f"{name}: too few flat patches to measure the NPS")
    found.sort(key=lambda item: item[0])
    flat = [r for _, r in found[: max(4, len(found) // 2)]]
    size = (NPS_PATCH, NPS_PATCH)
    power = np.mean([np.abs(np.fft.fft2(r, s=size)) ** 2 for r in flat], axis=0)
    profile = radial_profile(power / flat[0].size)
    variance = float(np.mean([r.var() for r in flat]))
    return profile / profile.sum(), math.sqrt(variance)


def measure_nps(series: CTSeries, stride: int = NPS_PATCH // 2) -> tuple[np.ndarray, float]:
    """Radial NPS (unit total power) and noise std (HU) of a uniform phantom's flat patches.

    Patches wholly inside water (FLAT_RANGE_HU, no padding) are plane-detrended; the flatter
    half of them are averaged.
    """
    lo, hi = FLAT_RANGE_HU
    found: list[tuple[float, np.ndarray]] = []
    n_slices, h, w = series.hu.shape
    for i in range(n_slices):
        for y in range(0, h - NPS_PATCH + 1, stride):
            for x in range(0, w - NPS_PATCH + 1, stride):
                block = series.hu[i, y : y + NPS_PATCH, x : x + NPS_PATCH]
                if series.keep[i, y : y + NPS_PATCH, x : x + NPS_PATCH].any():
                    continue
                if block.min() < lo or block.max() > hi:
                    continue
                residual = _plane_detrended(block)
                found.append((float(residual.std()), residual))
    return _flatter_half(found, series.name)


def _difference_power(series: CTSeries, gap: int, stride: int) -> tuple[np.ndarray, float]:
    """Mean 2-D power spectrum (unshifted, NPS_PATCH grid, per pixel) and mean variance of
    the flatter half of the detrended patches of ``(slice i + gap - slice i) / sqrt(2)`` in
    flat soft tissue (the pair's smoothed mean inside FLAT_RANGE_HU, no padding in either)."""
    lo, hi = FLAT_RANGE_HU
    found: list[tuple[float, np.ndarray]] = []
    n_slices, h, w = series.hu.shape
    p = DIFF_PATCH
    for i in range(n_slices - gap):
        a, b = series.hu[i].astype(np.float64), series.hu[i + gap].astype(np.float64)
        mean = ndi.gaussian_filter(0.5 * (a + b), DIFF_SMOOTH_PX)
        tissue = (mean > lo) & (mean < hi) & ~series.keep[i] & ~series.keep[i + gap]
        difference = (b - a) / math.sqrt(2.0)
        for y in range(0, h - p + 1, stride):
            for x in range(0, w - p + 1, stride):
                if not tissue[y : y + p, x : x + p].all():
                    continue
                residual = _plane_detrended(difference[y : y + p, x : x + p])
                found.append((float(residual.std()), residual))
    if len(found) < 4:
        raise ValueError(f"{series.name}: too few flat patches to measure the NPS")
    found.sort(key=lambda item: item[0])
    flat = [r for _, r in found[: max(4, len(found) // 2)]]
    size = (NPS_PATCH, NPS_PATCH)
    power = np.mean([np.abs(np.fft.fft2(r, s=size)) ** 2 for r in flat], axis=0) / flat[0].size
    return power, float(np.mean([r.var() for r in flat]))


def measure_difference_nps(
    series: CTSeries, stride: int = DIFF_PATCH // 4
) -> tuple[np.ndarray, float]:
    """Radial NPS (unit total power) and noise std (HU) of a patient series, from differences
    of neighbouring slices in flat soft tissue, with the anatomy left in them extrapolated out.

    Why differences: a patient has no uniform region large enough, and anatomy in one slice
    would pass for grain.  The difference of two slices over sqrt(2) has one slice's noise
    std and texture, while anatomy that changes slowly along z nearly cancels.  Patches lie
    wholly in soft tissue and are plane-detrended; the flatter half are averaged.

    Why two gaps (session 12): what does not cancel still dominates the lowest frequencies
    (session 11: every real profile peaked at 0.03-0.05 cycles/px, which FBP noise does not;
    the power of slices i, i + 2 over that of i, i + 1 is 2.3-3.0 there and 1.4-1.5 above
    0.25 cycles/px).  To first order a structure's difference grows in proportion to the gap,
    so its power grows as gap^2 while the noise's does not; the power at gap 0 is then
    ``(4 P(1) - P(2)) / 3`` (Richardson extrapolation), applied to the 2-D spectrum and the
    variance alike, clipped at zero.  What faster change leaves below 0.0625 cycles/px is
    then capped (:func:`low_bins_capped`), and the variance loses the capped power.
    """
    p1, v1 = _difference_power(series, 1, stride)
    p2, v2 = _difference_power(series, 2, stride)
    power = np.clip((4.0 * p1 - p2) / 3.0, 0.0, None)
    variance = max((4.0 * v1 - v2) / 3.0, 0.0)
    profile = radial_profile(power)
    capped = low_bins_capped(profile)
    if capped.sum() <= 0:
        raise ValueError(f"{series.name}: no noise power left after the extrapolation")
    # the variance loses the share of the 2-D power that the cap took (ring means x pixels)
    f = np.fft.fftfreq(NPS_PATCH)
    bins = (np.hypot(*np.meshgrid(f, f, indexing="ij")) / 0.5 * NPS_BINS).astype(int)
    pixels = np.bincount(bins.ravel())[:NPS_BINS]
    variance *= 1.0 - float(((profile - capped) * pixels).sum() / power.sum())
    return capped / capped.sum(), math.sqrt(variance)


def low_bins_capped(profile: np.ndarray) -> np.ndarray:
    """The radial profile with its bins below DIFF_CAP_BELOW cycles/px capped at the highest
    of the DIFF_CAP_FROM bins just above them.

    Why: FBP noise power rises from zero at zero frequency (``|f| W(f)^2``), so its lowest bins
    lie below the next ones unless the NPS peaks under 0.0625 cycles/px (a kernel smoother
    than a Hann window cut at 0.2 cycles/px).  Power there
    above its neighbours is structure the slice differences and the two-gap extrapolation
    left (a 0.06 cycles/px wave is 16 px: organ-sized).  A cap: a profile that rises
    through these bins, as every FBP NPS does, keeps its values.
    """
    centres = (np.arange(NPS_BINS) + 0.5) * 0.5 / NPS_BINS
    low = centres < DIFF_CAP_BELOW
    first = int(np.argmin(low))
    cap = float(profile[first : first + DIFF_CAP_FROM].max())
    out = profile.astype(np.float64).copy()
    out[low] = np.minimum(out[low], cap)
    return out


def phantom_profiles(names: tuple[str, ...] = WATER_PHANTOMS) -> dict[str, np.ndarray]:
    """The measured radial NPS of each water phantom, cached in cache_dir()/nps."""
    out = {}
    for name in names:
        path = cache_dir() / "nps" / f"{name}-{NPS_VERSION}.npy"
        if not path.exists():
            profile, _ = measure_nps(load_series(SHARED_CT / name))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, profile)
            tmp.replace(path)
        out[name] = np.load(path)
    return out


def real_profiles(
    names: tuple[str, ...] = REAL_LOWDOSE_TRAIN,
) -> dict[str, tuple[np.ndarray, float]]:
    """The radial NPS and noise std (HU) of each real low-dose training series
    (:func:`measure_difference_nps`), cached in cache_dir()/nps."""
    out = {}
    for name in names:
        if name not in REAL_LOWDOSE_TRAIN:
            raise ValueError(f"{name} is not a real low-dose training series (models.data)")
        path = cache_dir() / "nps" / f"{name}-{DIFF_NPS_VERSION}.npz"
        if not path.exists():
            profile, std = measure_difference_nps(load_series(SHARED_LOWDOSE / name))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, profile=profile, std_hu=std)
            tmp.replace(path)
        with np.load(path) as stored:
            out[name] = (stored["profile"], float(stored["std_hu"]))
    return out


def radial_frequency(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """|f| in cycles per pixel on the unshifted FFT grid of a size x size patch."""
    f = torch.fft.fftfreq(size, device=device)
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)


def analytic_nps(radius: torch.Tensor, window: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """FBP noise NPS ``|f| W(f / fc)^2`` for |f| < fc, per sample ([B] windows and cutoffs)."""
    f = radius[None]
    fc = cutoff[:, None, None]
    x = f / fc
    shepp_logan = torch.sinc(x / 2)
    hann = 0.5 * (1 + torch.cos(math.pi * x.clamp(max=1.0)))
    w = torch.ones_like(x)
    w = torch.where(window[:, None, None] == 1, shepp_logan, w)
    w = torch.where(window[:, None, None] == 2, hann, w)
    return torch.where(x < 1, f * w**2, torch.zeros_like(f))


def stretched_profile(
    profiles: torch.Tensor, radius: torch.Tensor, pixel_scale: torch.Tensor
) -> torch.Tensor:
    """Tabulated radial NPS [B, NPS_BINS] read at |f| / pixel_scale (linear), zero beyond
    0.5 cycles/px of the source: a new pixel ``pixel_scale`` times the measured one."""
    pos = (radius[None] / pixel_scale[:, None, None]) / 0.5 * NPS_BINS - 0.5
    pos = pos.clamp(min=0.0)
    lo = pos.floor().long().clamp(max=NPS_BINS - 1)
    hi = (lo + 1).clamp(max=NPS_BINS - 1)
    frac = pos - lo
    b = profiles.shape[0]
    flat_lo = torch.gather(profiles, 1, lo.view(b, -1)).view_as(pos)
    flat_hi = torch.gather(profiles, 1, hi.view(b, -1)).view_as(pos)
    value = flat_lo + frac * (flat_hi - flat_lo)
    return torch.where(pos < NPS_BINS, value, torch.zeros_like(value))


def shaped_noise(nps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance noise [B, P, P] with the given (unshifted, [B, P, P]) NPS shapes."""
    white = torch.randn(nps.shape, generator=generator).to(nps.device)
    amplitude = torch.sqrt(nps / nps.mean(dim=(1, 2), keepdim=True).clamp(min=1e-12))
    return torch.fft.ifft2(torch.fft.fft2(white, norm="ortho") * amplitude, norm="ortho").real


class GrainBank:
    """Draws noise of random texture for training patches (see the module docstring).

    All random numbers come from the caller's CPU generator, so a seed draws the same noise
    on every machine.
    """

    def __init__(
        self,
        config: dict,
        profiles: list[np.ndarray],
        device: torch.device | str = "cpu",
        real: list[np.ndarray] | None = None,
    ) -> None:
        self.device = torch.device(device)
        if real and not profiles:
            raise ValueError("real low-dose profiles join the phantoms' profiles: none given")
        self.measured_prob = float(config.get("grain_measured_prob", 0.4)) if profiles else 0.0
        #: Among measured textures, the share drawn from real low-dose series (``real``).
        self.real_prob = float(config.get("grain_real_prob", 0.5)) if real else 0.0
        self.real = (
            torch.tensor(np.stack(real), dtype=torch.float32, device=self.device) if real else None
        )
        self.cutoff = tuple(float(v) for v in config.get("grain_cutoff", (0.12, 0.5)))
        self.pixel_scale = tuple(float(v) for v in config.get("grain_pixel_scale", (0.5, 1.5)))
        self.blur_prob = float(config.get("grain_blur_prob", 0.3))
        self.blur_px = tuple(float(v) for v in config.get("grain_blur_px", (0.3, 1.2)))
        table = np.stack(profiles) if profiles else np.zeros((1, NPS_BINS))
        self.profiles = torch.tensor(table, dtype=torch.float32, device=self.device)

    def _uniform(self, g: torch.Generator, n: int, bounds: tuple[float, float]) -> torch.Tensor:
        lo, hi = bounds
        return (lo + (hi - lo) * torch.rand(n, generator=g)).to(self.device)

    def nps(self, n: int, size: int, g: torch.Generator) -> torch.Tensor:
        """``n`` random NPS shapes [n, size, size] (unshifted)."""
        radius = radial_frequency(size, self.device)
        window = torch.randint(len(WINDOWS), (n,), generator=g).to(self.device)
        cutoff = self._uniform(g, n, self.cutoff)
        shapes = analytic_nps(radius, window, cutoff)
        measured = (torch.rand(n, generator=g) < self.measured_prob).to(self.device)
        which = torch.randint(len(self.profiles), (n,), generator=g).to(self.device)
        table = self.profiles[which]
        if self.real is not None:
            real = (torch.rand(n, generator=g) < self.real_prob).to(self.device)
            pick = torch.randint(len(self.real), (n,), generator=g).to(self.device)
            table = torch.where(real[:, None], self.real[pick], table)
        lo, hi = (math.log(v) for v in self.pixel_scale)
        scale = torch.exp(self._uniform(g, n, (lo, hi)))
        stretched = stretched_profile(table, radius, scale)
        shapes = torch.where(measured[:, None, None], stretched, shapes)
        blurred = (torch.rand(n, generator=g) < self.blur_prob).to(self.device)
        sigma = torch.where(
            blurred, self._uniform(g, n, self.blur_px), torch.zeros(n).to(self.device)
        )
        mtf2 = torch.exp(-4 * math.pi**2 * sigma[:, None, None] ** 2 * radius[None] ** 2)
        return shapes * mtf2

    def draw(self, n: int, size: int, g: torch.Generator) -> torch.Tensor:
        """Unit-variance noise [n, size, size] of ``n`` random textures."""
        return shaped_noise(self.nps(n, size, g), g)
