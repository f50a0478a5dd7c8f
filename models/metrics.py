"""CT image quality for judging a denoiser: fidelity, noise, resolution, texture, detectability.

Pure numpy/scipy, no I/O.  Images are float arrays in HU; pixel sizes in mm; spatial
frequencies in cycles/mm.  Each measure is what a medical physicist would ask for, because
a denoiser can win on one (PSNR, noise) while losing on another (resolution, texture,
low-contrast detectability), and only all of them together say whether it is safe.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.signal.windows import tukey
from scipy.special import eval_laguerre
from scipy.stats import mannwhitneyu
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

#: Tissue starts here: above air and lung parenchyma's darkest voxels, below fat.
BODY_THRESHOLD_HU = -500.0


# --- fidelity against the full-dose reference ---------------------------------------------


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """HU clipped to a display window and scaled to [0, 1].

    PSNR and SSIM only mean something on what a reader sees: the LDCT literature reports
    them on windowed images (head W80/L40, chest W1500/L-600, abdomen W400/L50).
    """
    low = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float64) - low) / width, 0.0, 1.0)


def psnr_windowed(test: np.ndarray, reference: np.ndarray, width: float, level: float) -> float:
    """PSNR in dB of the windowed images (data range 1); ``inf`` when they are identical."""
    ref, img = window(reference, width, level), window(test, width, level)
    if np.array_equal(ref, img):
        return float("inf")
    return float(peak_signal_noise_ratio(ref, img, data_range=1.0))


def ssim_windowed(test: np.ndarray, reference: np.ndarray, width: float, level: float) -> float:
    """SSIM of the windowed images (skimage defaults, data range 1): structure, not just error."""
    return float(
        structural_similarity(
            window(reference, width, level), window(test, width, level), data_range=1.0
        )
    )


def body_mask(hu: np.ndarray, untouchable: np.ndarray) -> np.ndarray:
    """Pixels inside the patient: the largest tissue blob with its holes (lungs, air) filled.

    RMSE over the whole frame is diluted by the air around the patient; the table and the
    outside-field-of-view fill (``untouchable``) are not anatomy either.
    """
    tissue = (hu > BODY_THRESHOLD_HU) & ~untouchable
    labels, count = ndi.label(tissue)
    if count == 0:
        return tissue
    sizes = ndi.sum_labels(tissue, labels, index=np.arange(1, count + 1))
    body = ndi.binary_fill_holes(labels == (1 + int(np.argmax(sizes))))
    return body & ~untouchable


def rmse_hu(test: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Root-mean-square difference in HU over ``mask``: the error in the scanner's own unit."""
    diff = np.asarray(test, np.float64)[mask] - np.asarray(reference, np.float64)[mask]
    return float(np.sqrt(np.mean(diff**2)))


# --- noise and HU accuracy in uniform regions -----------------------------------------------


def detrend(rois: np.ndarray) -> np.ndarray:
    """ROIs ``[K, n, m]`` minus their least-squares 2nd-order polynomial surface.

    Even the flattest patient or phantom region carries slow background variation (grey and
    white matter, cupping) that would pass for low-frequency noise; a quadratic fit removes it
    and, with 6 parameters over n*m pixels, almost none of the noise.
    """
    r = np.asarray(rois, np.float64)
    n, m = r.shape[1:]
    yy, xx = np.mgrid[:n, :m].astype(np.float64)
    yy, xx = yy / n - 0.5, xx / m - 0.5
    basis = np.stack([np.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy]).reshape(6, -1).T
    flat = r.reshape(len(r), -1)
    coef = np.linalg.lstsq(basis, flat.T, rcond=None)[0]
    return (flat - (basis @ coef).T).reshape(r.shape)


def roi_noise(rois: np.ndarray) -> np.ndarray:
    """Noise std of each ROI ``[K, n, m]``: std after :func:`detrend`, unbiased (ddof=6)."""
    flat = detrend(rois).reshape(len(rois), -1)
    return np.sqrt(np.sum(flat**2, axis=1) / (flat.shape[1] - 6))


def roi_mean(rois: np.ndarray) -> np.ndarray:
    """Mean HU of each ROI ``[K, n, n]``; against full dose, the HU shift a denoiser causes."""
    return np.asarray(rois, np.float64).reshape(len(rois), -1).mean(axis=1)


def noise_reduction_percent(std_after: float, std_before: float) -> float:
    """How much of the noise std is gone, in %: 100 * (1 - after / before)."""
    return 100.0 * (1.0 - std_after / std_before)


# --- resolution: MTF from a sharp edge ------------------------------------------------------


def circular_edge_distances(
    shape: tuple[int, int], center_yx: tuple[float, float], radius_px: float
) -> np.ndarray:
    """Signed distance (px) of every pixel centre from a circle's edge, positive outside.

    A round insert's edge is sampled at every sub-pixel phase around its circumference, so
    binning these distances oversamples the edge-spread function without any slant fitting.
    """
    yy, xx = np.indices(shape, dtype=np.float64)
    return np.hypot(yy - center_yx[0], xx - center_yx[1]) - radius_px


def straight_edge_distances(patch: np.ndarray) -> np.ndarray:
    """Signed distance (px) of every pixel centre from the one straight edge crossing ``patch``.

    The slanted-edge method (ISO 12233): the edge normal comes from the structure tensor,
    then the edge position is found in every 1-px strip along the edge (centroid of the
    derivative) and a line fitted through them, so a slight slant gives the oversampling.
    """
    img = np.asarray(patch, np.float64)
    gy, gx = np.gradient(ndi.gaussian_filter(img, 1.0))
    tensor = np.array([[np.sum(gy * gy), np.sum(gy * gx)], [np.sum(gy * gx), np.sum(gx * gx)]])
    normal = np.linalg.eigh(tensor)[1][:, -1]  # (ny, nx): direction of strongest change
    yy, xx = np.indices(img.shape, dtype=np.float64)
    across = yy * normal[0] + xx * normal[1]
    along = -yy * normal[1] + xx * normal[0]
    strips = np.round(along - along.min()).astype(int)
    counts = np.bincount(strips.ravel())
    positions, offsets = [], []
    for strip in np.nonzero(counts >= 0.75 * counts.max())[0]:  # strips crossing the whole patch
        sel = strips == strip
        order = np.argsort(across[sel])
        a, v = across[sel][order], img[sel][order]
        weight = np.abs(np.diff(v))
        if weight.sum() == 0:
            continue
        positions.append(float(np.mean(along[sel])))
        offsets.append(float(np.sum(0.5 * (a[1:] + a[:-1]) * weight) / weight.sum()))
    slope, intercept = np.polyfit(positions, offsets, 1)
    return across - (intercept + slope * along)


def edge_spread(
    distance_px: np.ndarray, values: np.ndarray, bin_px: float = 0.1, half_width_px: float = 10.0
) -> np.ndarray:
    """Oversampled edge-spread function: ``values`` averaged in ``bin_px`` bins of distance.

    Bins from -half_width to +half_width; empty bins are filled by linear interpolation.
    """
    d, v = np.ravel(distance_px), np.ravel(np.asarray(values, np.float64))
    inside = np.abs(d) < half_width_px
    edges = np.arange(-half_width_px, half_width_px + bin_px / 2, bin_px)
    index = np.digitize(d[inside], edges) - 1
    count = np.bincount(index, minlength=len(edges) - 1)[: len(edges) - 1]
    total = np.bincount(index, weights=v[inside], minlength=len(edges) - 1)[: len(edges) - 1]
    centres = 0.5 * (edges[1:] + edges[:-1])
    filled = count > 0
    if filled.sum() < 2:
        raise ValueError("too few pixels near the edge to build an edge-spread function")
    return np.interp(centres, centres[filled], total[filled] / count[filled])


def mtf_from_esf(
    esf: np.ndarray, bin_px: float, pixel_mm: float, pad_to: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """MTF (frequencies in cycles/mm, MTF normalised to 1 at zero) from an oversampled ESF.

    ESF -> derivative = line-spread function -> Tukey window (keeps the core, damps the noisy
    tails) -> |FFT|.  Works for either edge polarity.
    """
    lsf = np.gradient(np.asarray(esf, np.float64))
    lsf *= np.sign(lsf.sum()) or 1.0
    lsf *= tukey(len(lsf), alpha=0.5)
    spectrum = np.abs(np.fft.rfft(lsf, n=max(pad_to, len(lsf))))
    freqs = np.fft.rfftfreq(max(pad_to, len(lsf)), d=bin_px * pixel_mm)
    return freqs, spectrum / spectrum[0]


def mtf_frequency(freqs: np.ndarray, mtf: np.ndarray, level: float) -> float:
    """First frequency where the MTF falls to ``level`` (0.5: MTF50, 0.1: MTF10), interpolated."""
    below = np.nonzero(mtf < level)[0]
    if len(below) == 0 or below[0] == 0:
        return float("nan")
    i = below[0]
    return float(np.interp(level, [mtf[i], mtf[i - 1]], [freqs[i], freqs[i - 1]]))


# --- noise texture: noise power spectrum ----------------------------------------------------


def nps_2d(rois: np.ndarray, pixel_mm: float) -> np.ndarray:
    """2-D noise power spectrum (HU^2 mm^2) of uniform ROIs ``[K, n, n]``, zero frequency centred.

    Each ROI :func:`detrend`-ed (its mean and slow background removed); NPS =
    dx*dy/(nx*ny) * <|DFT|^2>, so its integral over frequency is the pixel variance.
    """
    r = detrend(rois)
    ny, nx = r.shape[1:]
    power = np.abs(np.fft.fft2(r)) ** 2
    return np.fft.fftshift(power.mean(axis=0)) * pixel_mm * pixel_mm / (nx * ny)


def radial_nps(nps: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS in bins of one frequency step; returns (cycles/mm, NPS).

    CT noise is close to isotropic in the axial plane, so the 1-D curve carries the texture.
    """
    n = nps.shape[0]
    f = np.fft.fftshift(np.fft.fftfreq(n, d=pixel_mm))
    fy, fx = np.meshgrid(f, f, indexing="ij")
    step = 1.0 / (n * pixel_mm)
    index = np.round(np.hypot(fy, fx) / step).astype(int).ravel()
    keep = index <= n // 2
    sums = np.bincount(index[keep], weights=nps.ravel()[keep])
    counts = np.bincount(index[keep])
    return np.arange(len(sums)) * step, sums / np.maximum(counts, 1)


def nps_peak_frequency(freqs: np.ndarray, nps: np.ndarray) -> float:
    """Frequency of the NPS maximum (zero frequency excluded), refined by a parabola.

    FBP noise peaks at mid frequencies; a denoiser that moves the peak down leaves the
    blotchy, "plastic" texture radiologists dislike even when the std looks fine.
    """
    i = 1 + int(np.argmax(nps[1:]))
    if i >= len(nps) - 1:
        return float(freqs[i])
    a, b, c = nps[i - 1], nps[i], nps[i + 1]
    denom = a - 2 * b + c
    shift = 0.5 * (a - c) / denom if denom != 0 else 0.0
    return float(freqs[i] + np.clip(shift, -0.5, 0.5) * (freqs[1] - freqs[0]))


def repeated_scan_nps(
    first: np.ndarray, second: np.ndarray, pixel_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Radial NPS of the noise alone, from the same ROIs ``[K, n, n]`` of two scans that differ
    only in their noise realisation: (first - second) / sqrt(2) cancels what the two share.

    On patient images a single scan's NPS holds anatomy too, and a denoiser that lowers the
    noise lets that anatomy pull the peak down, even when it returns the full-dose image
    exactly.  The difference of repeated scans is how CT noise is measured without it.
    """
    difference = (np.asarray(first, np.float64) - np.asarray(second, np.float64)) / np.sqrt(2)
    return radial_nps(nps_2d(difference, pixel_mm), pixel_mm)


def nps_mean_frequency(freqs: np.ndarray, nps: np.ndarray) -> float:
    """NPS-weighted mean frequency: a steadier texture summary than the peak for flat spectra."""
    return float(np.sum(freqs[1:] * nps[1:]) / np.sum(nps[1:]))


# --- low-contrast detectability: channelized Hotelling observer ----------------------------


def add_disc(
    image: np.ndarray,
    center_yx: tuple[float, float],
    radius_px: float,
    contrast_hu: float,
    supersample: int = 5,
) -> np.ndarray:
    """``image`` plus a disc of ``contrast_hu`` with partial-volume edges (supersampled)."""
    yy, xx = np.indices(image.shape, dtype=np.float64)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    cover = np.zeros(image.shape, np.float64)
    for oy in offsets:
        for ox in offsets:
            cover += np.hypot(yy + oy - center_yx[0], xx + ox - center_yx[1]) <= radius_px
    return image + (contrast_hu * cover / supersample**2).astype(image.dtype)


def laguerre_gauss_channels(size: int, width_px: float, count: int = 6) -> np.ndarray:
    """Laguerre-Gauss channels ``[count, size*size]`` centred on the ROI.

    u_p(r) = sqrt(2)/a exp(-pi r^2/a^2) L_p(2 pi r^2/a^2): rotationally symmetric, efficient
    for a round signal at a known place, so a handful of channels approximates the ideal
    (Hotelling) observer from a few hundred images.
    """
    c = (size - 1) / 2.0
    yy, xx = np.indices((size, size), dtype=np.float64)
    g = 2.0 * np.pi * ((yy - c) ** 2 + (xx - c) ** 2) / width_px**2
    channels = [
        np.sqrt(2.0) / width_px * np.exp(-g / 2.0) * eval_laguerre(p, g) for p in range(count)
    ]
    return np.stack([u.ravel() for u in channels])


def cho_detectability(
    present: np.ndarray, absent: np.ndarray, channels: np.ndarray
) -> tuple[float, float]:
    """Channelized Hotelling observer on ROI images ``[K, n, n]``: returns (AUC, d').

    Two-fold cross-validation (even/odd images train the template, the others are scored,
    then swap), so the figure is not inflated by testing on the training images.  AUC is
    the Mann-Whitney statistic of the pooled test scores; d' = mean separation / pooled std.
    """
    vp = np.asarray(present, np.float64).reshape(len(present), -1) @ channels.T
    va = np.asarray(absent, np.float64).reshape(len(absent), -1) @ channels.T
    scores_p, scores_a = [], []
    for train in (0, 1):
        tp, ta = vp[train::2], va[train::2]
        scatter = 0.5 * (np.cov(tp, rowvar=False) + np.cov(ta, rowvar=False))
        template = np.linalg.solve(scatter, tp.mean(axis=0) - ta.mean(axis=0))
        scores_p.append(vp[1 - train :: 2] @ template)
        scores_a.append(va[1 - train :: 2] @ template)
    sp, sa = np.concatenate(scores_p), np.concatenate(scores_a)
    auc = mannwhitneyu(sp, sa).statistic / (len(sp) * len(sa))
    dprime = (sp.mean() - sa.mean()) / np.sqrt(0.5 * (sp.var(ddof=1) + sa.var(ddof=1)))
    return float(auc), float(dprime)


def dprime_standard_error(dprime: float, n_present: int, n_absent: int) -> float:
    """Approximate standard error of d' from finite images (Gaussian scores, equal variance).

    Whether two methods differ in detectability depends on it: var = (1/n1 + 1/n0) +
    d'^2 / (2 (n1 + n0)).
    """
    return float(np.sqrt(1 / n_present + 1 / n_absent + dprime**2 / (2 * (n_present + n_absent))))
