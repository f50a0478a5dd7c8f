"""The methods compared: the ONNX model as the worker runs it, a Gaussian, BM3D; bound rows."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy import ndimage as ndi

from models import metrics
from models.evaluate.common import GAUSSIAN_SIGMA_MM, Method, _cached
from node.denoise import model_grain
from node.grain import denoise_resampled, grain_zoom, sample_indices, series_grain
from node.pixels import model_input


class OnnxDenoiser:
    """The shipped model as the worker runs it: CPU, 2 threads, HU in, HU out, each slice
    resampled to the model's noise grain by the factor measured on its series
    (:meth:`measure_series`, as the worker measures it; 1 until it is called)."""

    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.name = f"{meta.get('name', path.stem)} {meta.get('version', '')}".strip()
        self.noise_grain = model_grain(meta.get("noise_grain"))
        self.zoom = 1.0
        self.seconds: list[float] = []

    def measure_series(self, hu: np.ndarray, keep: np.ndarray) -> float:
        """Set (and return) the resampling factor of the series ``hu``, ``keep`` [N, H, W]."""
        picks = sample_indices(len(hu))
        grain = series_grain([(model_input(hu[i], keep[i]), keep[i]) for i in picks])
        self.zoom = grain_zoom(grain, self.noise_grain)
        return self.zoom

    def __call__(self, hu: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Denoise one slice [H, W]; records the wall time of the model, resampling included."""
        start = time.perf_counter()
        y = denoise_resampled(self._run, model_input(hu, keep)[None], self.zoom)
        self.seconds.append(time.perf_counter() - start)
        return y[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        (y,) = self.session.run(None, {self.session.get_inputs()[0].name: x[:, None]})
        return np.asarray(y[:, 0])


def measure_series(method: object, hu: np.ndarray, keep: np.ndarray) -> None:
    """Let ``method`` measure the series it is about to denoise, where it measures one."""
    if isinstance(method, OnnxDenoiser):
        method.measure_series(hu, keep)


def gaussian(hu: np.ndarray, keep: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Gaussian filter of GAUSSIAN_SIGMA_MM on the model's view of the slice."""
    return ndi.gaussian_filter(model_input(hu, keep), GAUSSIAN_SIGMA_MM / pixel_mm)


def _bm3d_box(hu: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]]:
    """The model's view of a slice and the body's bounding box (+16 px) where BM3D runs."""
    img = model_input(hu, keep)
    rows, cols = np.nonzero(img > metrics.BODY_THRESHOLD_HU)
    if len(rows) == 0:
        return img, (slice(0, 0), slice(0, 0))
    y0, y1 = max(rows.min() - 16, 0), min(rows.max() + 17, img.shape[0])
    x0, x1 = max(cols.min() - 16, 0), min(cols.max() + 17, img.shape[1])
    return img, (slice(y0, y1), slice(x0, x1))


def bm3d_denoise(hu: np.ndarray, keep: np.ndarray, sigma_hu: float) -> np.ndarray:
    """BM3D with white-noise sigma in HU on the body's bounding box; outside is untouched air.

    A white-noise sigma keeps clear of bm3d's coloured-noise path, which calls ``np.trapz``
    (gone in numpy 2.4).  Deterministic, so outputs are cached (outside the repo) for re-runs
    with a new model; :func:`bm3d_seconds` times it afresh.
    """
    import bm3d  # the `train` extra; imported here so the rest runs without it

    img, box = _bm3d_box(hu, keep)
    out = img.copy()
    if out[box].size:
        key = hashlib.blake2b(img[box].tobytes(), digest_size=12).hexdigest()
        out[box] = _cached(
            f"bm3d|{key}|{sigma_hu:.3f}",
            lambda: bm3d.bm3d(img[box], sigma_psd=sigma_hu).astype(np.float32),
        )
    return out


def bm3d_seconds(hu: np.ndarray, keep: np.ndarray, sigma_hu: float) -> float:
    """Wall seconds of one uncached BM3D run on one slice (the cache would hide its cost)."""
    import bm3d

    img, box = _bm3d_box(hu, keep)
    start = time.perf_counter()
    bm3d.bm3d(img[box], sigma_psd=sigma_hu)
    return time.perf_counter() - start


def run_method(method: Method, low: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, float]:
    """Apply ``method`` slice by slice; untouchable pixels copied back; mean seconds/slice."""
    out = np.empty_like(low)
    start = time.perf_counter()
    for i in range(len(low)):
        out[i] = np.where(keep[i], low[i], method(low[i], keep[i]))
    return out, (time.perf_counter() - start) / max(len(low), 1)


#: The row of the full-dose image itself, scored like a method's output: what a denoiser that
#: recovered the full-dose image exactly would reach, so a target it misses is out of reach.
#: No CHO figure: the observer's known background is fitted to this very image, so nothing
#: in it varies between the classes but the disc, and the channel covariance is singular.
REFERENCE = "full dose (reference)"


#: The row of an ideal denoiser, one that knew the noise-free image: see :func:`ideal_output`.
#: Only its distances to the reference are figures of that denoiser (PSNR, SSIM, RMSE).
IDEAL = "ideal denoiser (bound)"


IDEAL_FIGURES = ("psnr_db", "ssim", "rmse_hu")
