"""Low-dose CT simulation in the projection domain (numpy/scipy/scikit-image only, no torch).

The shared series are all full dose.  A scan at a fraction ``dose`` of the photons is made
from a full-dose slice by adding only the *extra* noise the lower dose brings (after Yu et al.,
"Development and validation of a practical lower-dose simulation tool", Med Phys 2012):

1. HU -> linear attenuation, untouchable pixels (padding, outside the field of view) and the
   corners outside the reconstruction circle set to air, parallel-beam forward projection
   (``skimage.transform.radon``) -> line integrals ``p`` and mean transmitted counts
   ``m = I0 exp(-p)``.
2. The full-dose measurement already carries Poisson noise of ``m`` and electronic noise
   ``sigma_e^2``.  Scaling it by ``a = dose`` and adding zero-mean Poisson noise of variance
   ``a (1 - a) m`` plus Gaussian electronic noise of variance ``(1 - a^2) sigma_e^2`` gives
   exactly the low-dose variance ``a m + sigma_e^2``.
3. ``-log`` of the noisy counts minus ``p`` is the extra noise in the projections (its
   second-order log bias removed, so the mean HU does not move); filtered back projection of
   that difference alone is added to the input image.  The input is never re-reconstructed,
   so the simulation adds no blur or streaks of its own.

The incident photon count ``I0`` of each series is calibrated from the series' own measured
full-dose noise (so that sigma is proportional to 1/sqrt(dose) from full dose downwards), and
the FBP filter is shaped so the injected noise has the same texture (NPS) as the scanner's
own noise; otherwise a network could learn to tell simulated from real noise by its texture.

Speed (one core, 512x512): the forward projection runs on a 2x2-binned image with 180 angles
(the transmitted counts are smooth), and is interpolated to ``N_DETECTORS = image size`` bins and
``N_ANGLES = 360`` views for the noise; back projection of the noise with 360 views keeps the
texture isotropic out to the edge of the field of view.  About 0.8 s per slice.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import zoom
from skimage.transform import iradon, radon

from models.data import CTSeries, cache_dir, load_series

#: Bump when the simulation changes: it is part of every cache key.
SIM_VERSION = "sim-v2"
#: Linear attenuation of water (1/mm) at an effective energy of about 70 keV (120 kVp).
MU_WATER = 0.0193
#: Electronic noise variance per detector reading, in counts^2 (DECISIONS.md).
ELECTRONIC_VAR = 10.0
#: Views over 180 degrees used for the noise; the forward projection uses half of them.
N_ANGLES = 360
#: Photons for a 20 cm water path when a series cannot be calibrated (typical abdomen noise).
DEFAULT_PHOTONS = 3e4
#: Zero-padded length of the projection filter (next power of two >= 2 x 512).
_PAD_MIN = 64


@dataclass(frozen=True)
class Calibration:
    """Per-series simulation parameters measured from its own full-dose noise."""

    photons: float
    noise_filter: np.ndarray | None
    native_noise_hu: float

    def simulate(
        self,
        hu: np.ndarray,
        keep: np.ndarray,
        dose: float,
        rng: np.random.Generator,
        pixel_mm: float,
    ) -> np.ndarray:
        """:func:`simulate_low_dose` of one slice with this series' photons and noise filter.

        Always with tube-current modulation: :func:`calibrate` measured the photons with it
        (per 20 cm of water), so without it a head or a small phantom gets a fraction of the
        noise it was calibrated for.
        """
        return simulate_low_dose(
            hu,
            keep,
            dose,
            self.photons,
            rng,
            pixel_mm=pixel_mm,
            noise_filter=self.noise_filter,
            modulation=True,
        )


# --------------------------------------------------------------------------------------------
# The projection-domain simulation of one slice


def _filter_length(n: int) -> int:
    return max(_PAD_MIN, int(2 ** np.ceil(np.log2(2 * n))))


def _ramp(size: int) -> np.ndarray:
    """Ramp filter on the rfft grid, built in the spatial domain as scikit-image does."""
    n = np.concatenate(
        (np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int))
    )
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    return 2 * np.real(np.fft.rfft(f))


def default_noise_filter(size: int = 1024) -> np.ndarray:
    """Hann apodisation on the rfft grid: a medium soft-tissue kernel, used when uncalibrated."""
    freq = np.fft.rfftfreq(size)  # cycles per detector bin, 0 .. 0.5
    return 0.5 + 0.5 * np.cos(2 * np.pi * freq)


def _resample_filter(noise_filter: np.ndarray, size: int) -> np.ndarray:
    """A filter given on any rfft grid, on the grid of length ``size``."""
    src = np.linspace(0.0, 0.5, len(noise_filter))
    return np.interp(np.fft.rfftfreq(size), src, noise_filter)


def _square(hu: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pad to an even square (air, untouchable) so any H x W can be projected."""
    h, w = hu.shape
    n = max(h, w)
    n += n % 2
    if (h, w) == (n, n):
        return hu, keep
    hu_sq = np.full((n, n), -1000.0, dtype=np.float32)
    keep_sq = np.ones((n, n), dtype=bool)
    hu_sq[:h, :w] = hu
    keep_sq[:h, :w] = keep
    return hu_sq, keep_sq


def _circle(n: int) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    c = (n - 1) / 2
    return (yy - c) ** 2 + (xx - c) ** 2 <= (n / 2) ** 2


def simulate_low_dose(
    hu: np.ndarray,
    keep: np.ndarray,
    dose: float,
    photons: float,
    rng: np.random.Generator,
    *,
    pixel_mm: float = 0.75,
    noise_filter: np.ndarray | None = None,
    modulation: bool = False,
) -> np.ndarray:
    """One full-dose slice [H, W] in HU as if scanned at ``dose`` (0 < dose <= 1) of its photons.

    Only the extra noise is added; ``keep`` pixels are returned unchanged and never projected.
    ``photons`` is the full-dose incident count per ray (see :func:`calibrate_photons`),
    ``noise_filter`` the FBP apodisation on an rfft grid (default: Hann).  With ``modulation``
    the tube current follows the slice's attenuation as automatic exposure control does
    (``photons`` then holds for a 20 cm water path), so noise is similar from slice to slice.
    """
    if not 0 < dose <= 1:
        raise ValueError(f"dose must be in (0, 1], got {dose}")
    hu = np.asarray(hu, dtype=np.float32)
    keep = np.asarray(keep, dtype=bool)
    if dose == 1:
        return hu.copy()
    h, w = hu.shape
    hu_sq, keep_sq = _square(hu, keep)
    n = hu_sq.shape[0]
    inside = _circle(n)
    # attenuation per pixel in units of 1/pixel: line integrals are plain sums over pixels
    mu = np.clip(MU_WATER * pixel_mm * (1.0 + hu_sq.astype(np.float64) / 1000.0), 0.0, None)
    mu[keep_sq | ~inside] = 0.0

    # forward projection on the 2x2-binned image (counts are smooth), then interpolate
    coarse = mu.reshape(n // 2, 2, n // 2, 2).mean(axis=(1, 3))
    coarse[~_circle(n // 2)] = 0.0
    theta_c = np.linspace(0.0, 180.0, N_ANGLES // 2, endpoint=False)
    p_c = radon(coarse, theta_c, circle=True) * 2.0  # [n/2 detectors, angles]; 2 px per bin
    p = zoom(p_c, (n / p_c.shape[0], N_ANGLES / p_c.shape[1]), order=1, mode="nearest")
    p = np.clip(p, 0.0, None)

    # extra noise in the count domain: Poisson (zero mean) plus electronic
    a = float(dose)
    if modulation:
        centre = p[n * 3 // 8 : n * 5 // 8]
        photons = photons * float(np.mean(np.exp(centre))) / float(np.exp(MU_WATER * 200.0))
    m = photons * np.exp(-p)  # full-dose mean counts
    lam = a * (1.0 - a) * m
    extra = rng.poisson(lam).astype(np.float64) - lam
    extra += rng.normal(0.0, np.sqrt((1.0 - a * a) * ELECTRONIC_VAR), size=m.shape)
    low = a * m + extra
    var = lam + (1.0 - a * a) * ELECTRONIC_VAR
    # -log(low / (a m)), with the expected second-order log bias removed (mean HU unchanged)
    dp = -np.log(np.maximum(low, 0.5) / (a * m)) - var / (2.0 * (a * m) ** 2)

    # filtered back projection of the extra noise only
    size = _filter_length(n)
    filt = _ramp(size) * _resample_filter(
        default_noise_filter() if noise_filter is None else noise_filter, size
    )
    padded = np.zeros((size, dp.shape[1]))
    padded[: dp.shape[0]] = dp
    filtered = np.fft.irfft(np.fft.rfft(padded, axis=0) * filt[:, None], n=size, axis=0)[:n]
    theta = np.linspace(0.0, 180.0, N_ANGLES, endpoint=False)
    dmu = iradon(filtered, theta, circle=True, filter_name=None)  # 1/pixel units
    d_hu = (dmu * 1000.0 / (MU_WATER * pixel_mm)).astype(np.float32)[:h, :w]
    return np.where(keep, hu, hu + d_hu).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Calibration from the series' own noise

_PATCH = 32


def _patch_grid(shape: tuple[int, int]) -> list[tuple[int, int]]:
    h, w = shape
    return [
        (y, x)
        for y in range(0, h - _PATCH + 1, _PATCH // 2)
        for x in range(0, w - _PATCH + 1, _PATCH // 2)
    ]


def _detrend_matrix() -> np.ndarray:
    yy, xx = np.mgrid[:_PATCH, :_PATCH].astype(np.float64) / _PATCH - 0.5
    basis = np.stack([np.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy]).reshape(6, -1).T
    # residual projector: I - B (B^T B)^-1 B^T
    return np.eye(_PATCH * _PATCH) - basis @ np.linalg.pinv(basis)


def _uniform_patches(hu: np.ndarray, keep: np.ndarray) -> list[tuple[int, int]]:
    """Soft-tissue patches flat enough that their detrended content is mostly noise."""
    resid = _detrend_matrix()
    candidates = []
    for y, x in _patch_grid(hu.shape):
        block = hu[y : y + _PATCH, x : x + _PATCH]
        if keep[y : y + _PATCH, x : x + _PATCH].any():
            continue
        if block.min() < -200 or block.max() > 300:
            continue
        r = resid @ block.reshape(-1).astype(np.float64)
        candidates.append((float(r.std()), y, x))
    if not candidates:
        return []
    candidates.sort()
    take = max(4, len(candidates) * 3 // 10)
    return [(y, x) for _, y, x in candidates[:take]]


def _nps(
    images: list[np.ndarray], patches: list[list[tuple[int, int]]]
) -> tuple[np.ndarray, float]:
    """Radial NPS (16 bins over 0..0.5 cycles/pixel) and mean variance of detrended patches."""
    resid = _detrend_matrix()
    fy, fx = np.meshgrid(np.fft.fftfreq(_PATCH), np.fft.fftfreq(_PATCH), indexing="ij")
    radius = np.sqrt(fx**2 + fy**2)
    bins = np.minimum((radius * 2 * 16).astype(int), 16)  # bin 16 = corners beyond 0.5
    acc = np.zeros((_PATCH, _PATCH))
    var, count = 0.0, 0
    for img, plist in zip(images, patches, strict=True):
        for y, x in plist:
            r = resid @ img[y : y + _PATCH, x : x + _PATCH].reshape(-1).astype(np.float64)
            r = r.reshape(_PATCH, _PATCH)
            acc += np.abs(np.fft.fft2(r)) ** 2
            var += float(r.var())
            count += 1
    if count == 0:
        raise ValueError("no uniform soft-tissue patches to measure the noise in")
    acc /= count
    radial = np.array([acc[bins == b].mean() for b in range(16)])
    return radial, var / count


def calibrate(
    series_hu: np.ndarray, keep: np.ndarray, *, pixel_mm: float = 0.75, seed: int = 1234
) -> Calibration:
    """Measure the series' own noise; return I0 and an FBP filter that reproduce it.

    Uniform soft-tissue patches of a few slices give the native noise variance and NPS.  The
    same slices are simulated at 50 % dose with a reference I0: the injected noise (the
    difference image) is pure noise, measured in the same patches with the same estimator.
    The filter is corrected by sqrt(NPS_native / NPS_sim) and the photon count scaled by the
    variance ratio (at 50 % dose the extra variance equals the full-dose variance).
    """
    n = series_hu.shape[0]
    # the three slices with the most uniform soft tissue (brain, liver) measure noise best
    scored = []
    for i in range(0, n, max(1, n // 12)):
        found = _uniform_patches(series_hu[i], keep[i])
        scored.append((len(found), i, found))
    scored.sort(key=lambda item: -item[0])
    chosen = sorted(scored[:3], key=lambda item: item[1])
    slices = [series_hu[i] for _, i, _ in chosen]
    masks = [keep[i] for _, i, _ in chosen]
    patches = [found for _, _, found in chosen]
    native_nps, native_var = _nps(slices, patches)
    rng = np.random.default_rng(seed)
    ref_photons = 1e5
    filt = default_noise_filter()

    def injected(f: np.ndarray, photons: float) -> list[np.ndarray]:
        out = []
        for s, k in zip(slices, masks, strict=True):
            low = simulate_low_dose(
                s, k, 0.5, photons, rng, pixel_mm=pixel_mm, noise_filter=f, modulation=True
            )
            out.append(low - s)
        return out

    sim_nps, _ = _nps(injected(filt, ref_photons), patches)
    # correct the filter shape; the lowest bins hold anatomy, so hold them at bin 2
    ratio = np.sqrt(native_nps / np.maximum(sim_nps, 1e-12))
    ratio[:2] = ratio[2]
    ratio = np.clip(ratio / ratio[2], 0.05, 4.0)
    centres = (np.arange(16) + 0.5) / 32
    freq = np.fft.rfftfreq(1024)
    filt = filt * np.interp(freq, centres, ratio)
    filt /= filt.max()
    _, sim_var = _nps(injected(filt, ref_photons), patches)
    if not native_var > 0:
        raise ValueError("the series shows no measurable noise")
    photons = ref_photons * sim_var / native_var
    return Calibration(
        photons=float(photons), noise_filter=filt, native_noise_hu=float(np.sqrt(native_var))
    )


def calibrate_photons(series_hu: np.ndarray, keep: np.ndarray) -> float:
    """Full-dose incident photons per ray that reproduce the series' own measured noise."""
    return calibrate(series_hu, keep).photons


# --------------------------------------------------------------------------------------------
# Whole series, cached


def _series_key(series: CTSeries) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.ascontiguousarray(series.hu).tobytes())
    digest.update(np.ascontiguousarray(series.keep).tobytes())
    return f"{series.name}-{digest.hexdigest()}"


def series_calibration(series: CTSeries) -> Calibration:
    """:func:`calibrate` for a series, cached on disk (it simulates a few slices)."""
    path = cache_dir() / "calibration" / f"{_series_key(series)}-{SIM_VERSION}.npz"
    if path.exists():
        with np.load(path) as z:
            return Calibration(float(z["photons"]), z["noise_filter"], float(z["native"]))
    try:
        cal = calibrate(series.hu, series.keep, pixel_mm=series.pixel_mm)
    except ValueError as exc:  # no uniform soft tissue: fall back to a typical body scan
        print(f"calibration of {series.name} failed ({exc}); using {DEFAULT_PHOTONS:g} photons")
        cal = Calibration(DEFAULT_PHOTONS, default_noise_filter(), float("nan"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, photons=cal.photons, noise_filter=cal.noise_filter, native=cal.native_noise_hu)
    tmp.replace(path)
    return cal


def simulate_series(series: CTSeries, dose: float, seed: int = 0) -> np.ndarray:
    """The whole series at ``dose`` (float32 [N, H, W] HU), cached by series, dose and seed."""
    if dose == 1:
        return series.hu.astype(np.float32, copy=True)
    key = f"{_series_key(series)}-d{dose:g}-s{seed}-{SIM_VERSION}"
    path = cache_dir() / "simulated" / f"{key}.npy"
    if path.exists():
        return np.load(path)
    cal = series_calibration(series)
    out = np.empty_like(series.hu, dtype=np.float32)
    start = time.perf_counter()
    for i in range(series.hu.shape[0]):
        rng = np.random.default_rng([seed, int(round(dose * 10000)), i])
        out[i] = cal.simulate(series.hu[i], series.keep[i], dose, rng, series.pixel_mm)
        if (i + 1) % 10 == 0 or i + 1 == len(out):
            rate = (time.perf_counter() - start) / (i + 1)
            print(
                f"simulate {series.name} dose {dose:g}: {i + 1}/{len(out)} ({rate:.2f} s/slice)",
                flush=True,
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


# --------------------------------------------------------------------------------------------
# DICOM copy at simulated dose (demo and end-to-end tests)


def write_low_dose_series(
    src_dir: Path, dst_dir: Path, dose: float = 0.25, seed: int = 0
) -> list[Path]:
    """Write a DICOM copy of a series at simulated ``dose``: same study, new deterministic UIDs.

    ImageType stays ORIGINAL so the node selects the copy like a real scan; SeriesDescription
    says it is simulated.  Uncompressed Explicit VR Little Endian.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from node.pixels import PixelCodec

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    series = load_series(src_dir)
    low = simulate_series(series, dose, seed)
    dst_dir.mkdir(parents=True, exist_ok=True)
    tag = f"simulated {dose * 100:g}% dose"
    written = []
    for i, path in enumerate(series.paths):
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        codec = PixelCodec.from_dataset(ds)
        stored = ds.pixel_array
        keep = codec.untouchable(stored)
        new = codec.to_stored(low[i], stored, keep)
        salt = [SIM_VERSION, f"{dose:g}", str(seed)]
        series_uid = generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), *salt])
        sop_uid = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), *salt])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        description = str(ds.get("SeriesDescription", "") or "")[: 64 - len(tag) - 3]
        ds.SeriesDescription = f"{description} [{tag}]".strip()
        ds.PixelData = np.ascontiguousarray(new).tobytes()
        out = dst_dir / f"{i + 1:04d}.dcm"
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written
