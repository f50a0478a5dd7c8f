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
