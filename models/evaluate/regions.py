"""Regions found automatically in the full-dose image: uniform ROIs, edges, slices to score."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import regionprops
from skimage.restoration import estimate_sigma

from models import metrics
from models.evaluate.common import EDGE_PX, ROI_PX, SOFT_TISSUE_WINDOW, WINDOWS


def window_for(description: str) -> tuple[float, float]:
    """Display window for a series from its name or body part; soft tissue by default."""
    text = description.lower()
    return next((w for key, w in WINDOWS if key in text), SOFT_TISSUE_WINDOW)


def pick_slices(candidates: list[int], count: int) -> list[int]:
    """``count`` slices evenly spaced over ``candidates`` (sorted), away from its ends."""
    picks = (np.arange(min(count, len(candidates))) + 0.5) / min(count, len(candidates))
    return sorted({candidates[int(p * len(candidates))] for p in picks})


def body_slices(full: np.ndarray, keep: np.ndarray) -> list[int]:
    """Slices with at least a quarter of the largest body cross-section."""
    area = np.array([metrics.body_mask(full[i], keep[i]).sum() for i in range(len(full))])
    return [int(i) for i in np.nonzero(area >= 0.25 * area.max())[0]]


def _local_std(image: np.ndarray, size: int) -> np.ndarray:
    mean = ndi.uniform_filter(image, size)
    return np.sqrt(np.maximum(ndi.uniform_filter(image * image, size) - mean * mean, 0.0))


@dataclass
class UniformMaps:
    """Per slice: local std of ROI_PX squares and where a square's surroundings are in range."""

    std: list[np.ndarray]
    ok: list[np.ndarray]
    limit: float  # 1.5 x the 10th percentile of std where ok: the series' noise floor

    @classmethod
    def of(cls, full: np.ndarray, keep: np.ndarray, size: int = ROI_PX) -> UniformMaps:
        """Maps of a stack for ``size`` squares: within -200..300 HU with a 4 px margin."""
        half = ROI_PX // 2
        stds, oks = [], []
        for i in range(len(full)):
            img = np.where(keep[i], -3000.0, full[i].astype(np.float64))
            ok = (ndi.minimum_filter(img, size + 8) > -200.0) & (
                ndi.maximum_filter(img, size + 8) < 300.0
            )
            ok[: half + 4] = ok[-half - 4 :] = False
            ok[:, : half + 4] = ok[:, -half - 4 :] = False
            stds.append(_local_std(img, size))
            oks.append(ok)
        pooled = np.concatenate([std[ok] for std, ok in zip(stds, oks, strict=True)])
        limit = 1.5 * float(np.percentile(pooled, 10)) if len(pooled) else -1.0
        return cls(stds, oks, limit)

    def rois(self, spacing: int = ROI_PX, per_slice: int = 8) -> list[tuple[int, int, int]]:
        """Corners (slice, y, x) of the flattest squares, ``spacing`` apart, per slice."""
        half = ROI_PX // 2
        found = []
        for i, (std, ok) in enumerate(zip(self.std, self.ok, strict=True)):
            chosen = self.flattest(std, ok, spacing, per_slice)
            found += [(i, y - half, x - half) for y, x in chosen]
        return found

    def flattest(
        self, std: np.ndarray, ok: np.ndarray, spacing: int, count: int
    ) -> list[tuple[int, int]]:
        """Up to ``count`` centres where ``ok`` and std is within the limit, flattest first,
        each at least ``spacing`` px (Chebyshev) from those chosen before it."""
        ys, xs = np.nonzero(ok & (std <= self.limit))
        chosen: list[tuple[int, int]] = []
        for j in np.argsort(std[ys, xs], kind="stable"):
            y, x = int(ys[j]), int(xs[j])
            if all(max(abs(y - cy), abs(x - cx)) >= spacing for cy, cx in chosen):
                chosen.append((y, x))
                if len(chosen) == count:
                    break
        return chosen


def crop(images: np.ndarray, rois: list[tuple[int, int, int]], size: int = ROI_PX) -> np.ndarray:
    """The ROIs ``[K, size, size]`` cut out of a stack ``[N, H, W]``."""
    return np.stack([images[i, y : y + size, x : x + size] for i, y, x in rois])


@dataclass
class Edge:
    """One edge for the MTF: pixels of a box in one slice and their distance to the edge."""

    slice_index: int
    box: tuple[slice, slice]
    distance: np.ndarray
    bin_px: float


def round_insert_edges(full: np.ndarray, keep: np.ndarray) -> list[Edge]:
    """Round inserts (radius >= 8 px, contrast >= 300 HU, uniform inside and around)."""
    edges = []
    for i in range(len(full)):
        img = np.where(keep[i], -1000.0, full[i].astype(np.float64))
        labels, _ = ndi.label((img > -300.0) & (img < 300.0))
        for region in regionprops(labels):
            if region.area < np.pi * 8**2 or region.eccentricity > 0.3 or region.solidity < 0.95:
                continue
            radius = math.sqrt(region.area / np.pi)
            cy, cx = region.centroid
            m = int(radius + 12)
            y0, x0 = int(cy) - m, int(cx) - m
            if y0 < 0 or x0 < 0 or y0 + 2 * m + 1 > img.shape[0] or x0 + 2 * m + 1 > img.shape[1]:
                continue
            box = (slice(y0, y0 + 2 * m + 1), slice(x0, x0 + 2 * m + 1))
            patch = img[box]
            d = metrics.circular_edge_distances(patch.shape, (cy - y0, cx - x0), radius)
            inside, ring = patch[d < -3], patch[(d > 3) & (d < 10)]
            contrast = abs(inside.mean() - ring.mean())
            if contrast < 300 or max(inside.std(), ring.std()) > 0.05 * contrast:
                continue
            edges.append(Edge(i, box, d, 0.1))
    return edges


def straight_edges(full: np.ndarray, keep: np.ndarray, per_slice: int = 4) -> list[Edge]:
    """Straight edges of >= 300 HU in the body: coherent structure tensor, sides uniform
    within 8 px (skull against brain or scalp in a head), up to ``per_slice`` per slice."""
    edges = []
    for i in range(len(full)):
        img = np.where(keep[i], -1000.0, full[i].astype(np.float64))
        body = metrics.body_mask(full[i], keep[i])
        gy, gx = np.gradient(ndi.gaussian_filter(img, 1.0))
        jyy, jxx, jxy = (ndi.uniform_filter(a, EDGE_PX) for a in (gy * gy, gx * gx, gy * gx))
        coherence = ((jyy - jxx) ** 2 + 4 * jxy**2) / np.maximum((jyy + jxx) ** 2, 1e-9)
        energy = jyy + jxx
        half = EDGE_PX // 2
        grid = np.zeros_like(coherence, dtype=bool)
        grid[half:-half:4, half:-half:4] = True
        ys, xs = np.nonzero(grid & body & (coherence > 0.9) & (energy > 100.0**2))
        taken: list[tuple[int, int]] = []
        for j in np.argsort(-energy[ys, xs])[:200]:
            y, x = int(ys[j]), int(xs[j])
            if any(max(abs(y - ty), abs(x - tx)) < EDGE_PX for ty, tx in taken):
                continue
            box = (slice(y - half, y + half), slice(x - half, x + half))
            patch = img[box]
            d = metrics.straight_edge_distances(patch)
            a, b = patch[(d < -3) & (d > -8)], patch[(d > 3) & (d < 8)]
            if min(len(a), len(b)) < 0.1 * patch.size:
                continue
            contrast = abs(a.mean() - b.mean())
            if contrast < 300 or max(a.std(), b.std()) > 0.15 * contrast:
                continue
            taken.append((y, x))
            edges.append(Edge(i, box, d, 0.25))
            if len(taken) == per_slice:
                break
    return edges


def find_edges(full: np.ndarray, keep: np.ndarray) -> tuple[str, list[Edge]]:
    """Round inserts where there are any (phantoms), else straight edges."""
    edges = round_insert_edges(full, keep)
    if edges:
        return "round inserts", edges
    return "straight edges", straight_edges(full, keep)


def mean_mtf(images: np.ndarray, edges: list[Edge], pixel_mm: float) -> tuple[float, float]:
    """(MTF50, MTF10) in cycles/mm of the MTF averaged over all edges."""
    curves = []
    for e in edges:
        half = 10.0 if e.bin_px == 0.1 else 8.0
        esf = metrics.edge_spread(e.distance, images[e.slice_index][e.box], e.bin_px, half)
        freqs, mtf = metrics.mtf_from_esf(esf, e.bin_px, pixel_mm)
        curves.append(np.interp(np.linspace(0, 2, 401), freqs, mtf))
    if not curves:
        return float("nan"), float("nan")
    f, mtf = np.linspace(0, 2, 401), np.mean(curves, axis=0)
    return metrics.mtf_frequency(f, mtf, 0.5), metrics.mtf_frequency(f, mtf, 0.1)


def measured_noise(images: np.ndarray, keep: np.ndarray, rois: list[tuple[int, int, int]]) -> float:
    """Noise std in HU: median over the uniform ROIs, else a wavelet estimate over the slices."""
    if rois:
        return float(np.median(metrics.roi_noise(crop(images, rois))))
    return float(
        np.median(
            [estimate_sigma(np.where(k, -1000.0, im)) for im, k in zip(images, keep, strict=True)]
        )
    )


def bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    """The smallest box around ``mask``: PSNR/SSIM leave out the air around the patient."""
    rows, cols = np.nonzero(mask)
    return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)
