"""Validation by series: the Catphan modules with noise of six textures at three doses."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from models.data import SHARED_CT, VALIDATION_SERIES  # noqa: E402
from models.validation import ANALYTIC_TEXTURES, texture_nps  # noqa: E402


def test_analytic_textures_run_from_sharp_to_smooth() -> None:
    f = torch.fft.fftfreq(64)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    means = []
    for texture in ANALYTIC_TEXTURES:
        nps = texture_nps(64, texture)[0]
        assert float(nps[0, 0]) == 0.0  # no DC: noise has zero mean
        means.append(float((nps * radius).sum() / nps.sum()))
    assert means == sorted(means, reverse=True)


@pytest.mark.skipif(
    not all((SHARED_CT / name).is_dir() for name in VALIDATION_SERIES),
    reason="the shared validation series are not on this machine",
)
def test_validation_inputs_carry_the_dose_noise_and_an_identity_scores_it() -> None:
    from models.data import load_series
    from models.grain import measure_nps
    from models.validation import build_validation, validate_by_series

    val = build_validation({"val_crop": 128, "doses": [0.25, 0.5, 1.0]})
    assert [s["name"] for s in val] == list(VALIDATION_SERIES)
    first = val[0]
    assert len(first["inputs"]) == 6 * 2  # six textures, two doses below full
    _, native = measure_nps(load_series(SHARED_CT / VALIDATION_SERIES[0]))
    for (_, _, dose), noisy in first["inputs"].items():
        extra = (noisy - first["full"])[first["mask"]]
        assert float(extra.std()) == pytest.approx(native * math.sqrt(1 / dose - 1), rel=0.15)
    scores = validate_by_series(torch.nn.Identity(), val, torch.device("cpu"))
    assert set(scores) == {"0.25", "0.5"}
    assert scores["0.25"] > scores["0.5"] > 0
    assert np.isfinite(list(scores.values())).all()
