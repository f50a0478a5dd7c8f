"""Detectability: a channelized Hotelling observer (CHO) reading the discs through a method."""

from __future__ import annotations

import numpy as np

from models import metrics
from models.evaluate.cases import Case, ChoSet
from models.evaluate.common import CHO_MARGIN_PX, DISC_DIAMETER_MM, ROI_PX, Method
from models.evaluate.methods import run_method
from models.evaluate.regions import crop


def cho_inputs(cho: ChoSet) -> np.ndarray:
    """The CHO ROIs of the low-dose input, minus the known background."""
    return crop(cho.slices, cho.rois) - cho.background


def method_rois(
    method: Method,
    slices: np.ndarray,
    keep: np.ndarray,
    rois: list[tuple[int, int, int]],
    local: bool,
) -> np.ndarray:
    """A method's output in ``rois`` of ``slices``.

    ``local``: run the method on each ROI with a CHO_MARGIN_PX margin instead of whole slices
    (BM3D: its block matching reaches 27 px, so the ROI is denoised as in the whole slice).
    """
    if not local:
        return crop(run_method(method, slices, keep)[0], rois)
    m, out = CHO_MARGIN_PX, []
    for k, y, x in rois:
        y0, x0 = max(y - m, 0), max(x - m, 0)
        box = (k, slice(y0, y + ROI_PX + m), slice(x0, x + ROI_PX + m))
        denoised = np.where(keep[box], slices[box], method(slices[box], keep[box]))
        out.append(denoised[y - y0 : y - y0 + ROI_PX, x - x0 : x - x0 + ROI_PX])
    return np.stack(out)


def cho_outputs(method: Method, cho: ChoSet, local: bool) -> np.ndarray:
    """A method's CHO ROIs minus the known background (``local``: see :func:`method_rois`)."""
    return method_rois(method, cho.slices, cho.keep, cho.rois, local) - cho.background


def cho_score(case: Case, cho: ChoSet, rois: np.ndarray) -> dict[str, float]:
    """CHO AUC, d' and the standard error of d' on background-subtracted ROIs."""
    radius = DISC_DIAMETER_MM / 2 / case.pixel_mm
    channels = metrics.laguerre_gauss_channels(ROI_PX, 2.5 * radius, 6)
    auc, dprime = metrics.cho_detectability(rois[cho.present], rois[~cho.present], channels)
    n1, n0 = int(cho.present.sum()), int((~cho.present).sum())
    return {
        "cho_auc": auc,
        "cho_dprime": dprime,
        "cho_dprime_se": metrics.dprime_standard_error(dprime, n1, n0),
        "cho_rois": len(cho.rois),
    }


# --- the same observer for discs of any size, with a paired bootstrap (the lesion check) ----

#: cho_score's channels: 6 Laguerre-Gauss channels 2.5 disc radii wide.
CHO_CHANNELS, CHANNEL_WIDTH_RADII = 6, 2.5


def channel_responses(rois: np.ndarray, radius_px: float) -> np.ndarray:
    """``[K, CHO_CHANNELS]``: background-subtracted ROIs ``[K, n, n]`` (disc centred) seen
    through cho_score's channels for a disc of ``radius_px``."""
    size = rois.shape[-1]
    channels = metrics.laguerre_gauss_channels(size, CHANNEL_WIDTH_RADII * radius_px, CHO_CHANNELS)
    return np.asarray(np.asarray(rois, np.float64).reshape(len(rois), -1) @ channels.T)


def responses_cho(present: np.ndarray, absent: np.ndarray) -> tuple[float, float]:
    """(AUC, d') of metrics.cho_detectability on channel responses ``[K, C]``: the same
    observer as on the ROIs themselves (their projection onto identity channels), computed
    once so that the bootstrap need not project every resample again."""
    identity = np.eye(present.shape[1])
    return metrics.cho_detectability(present[:, :, None], absent[:, :, None], identity)


def paired_bootstrap(
    responses: dict[str, np.ndarray],
    present: np.ndarray,
    reference: str,
    resamples: int = 500,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per method: AUC, d', and the bootstrap standard errors of d' and of d' minus the
    ``reference`` method's d'.

    ``responses``: method -> channel responses ``[K, C]`` of the same K ROIs (same places,
    same noise, ``present`` marking those with a disc).  Each resample draws the
    signal-present and the signal-absent ROIs with replacement, within their class, and every
    method is scored on the same draw: the difference's error is then that of the methods
    alone, without most of the ROIs' shared luck.
    """
    rng = np.random.default_rng(seed)
    yes, no = np.flatnonzero(present), np.flatnonzero(~present)
    draws = [(rng.choice(yes, len(yes)), rng.choice(no, len(no))) for _ in range(resamples)]
    found: dict[str, dict[str, float]] = {}
    boot: dict[str, np.ndarray] = {}
    for name, v in responses.items():
        auc, dprime = responses_cho(v[yes], v[no])
        boot[name] = np.array([responses_cho(v[p], v[a])[1] for p, a in draws])
        found[name] = {"auc": auc, "dprime": dprime, "dprime_se": float(np.std(boot[name], ddof=1))}
    for name, figures in found.items():
        figures["delta"] = figures["dprime"] - found[reference]["dprime"]
        figures["delta_se"] = float(np.std(boot[name] - boot[reference], ddof=1))
    return found
