"""Training patches: doses, targets and masks drawn as configured."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from models.train import sample_batch  # noqa: E402

FLAT_HU = 40.0


def _series(rng: np.random.Generator) -> dict:
    """A flat full-dose series and a noisy 50 % one, so targets are easy to predict."""
    full = np.full((2, 32, 32), FLAT_HU, np.float32)
    low = {0.5: full + rng.normal(0.0, 10.0, full.shape).astype(np.float32), 1.0: full.copy()}
    return {"full": full, "keep": np.zeros(full.shape, bool), "low": low}


def _config(**overrides: object) -> dict:
    config = {
        "patch": 16,
        "batch": 8,
        "doses": [0.5, 1.0],
        "dose_weights": [1.0, 0.0],
        "scale_prob": 0.0,
    }
    return config | overrides


def test_low_dose_patches_have_the_full_dose_target() -> None:
    data = [_series(np.random.default_rng(0))]
    x, y, m = sample_batch(data, _config(), np.random.default_rng(1))
    assert x.shape == y.shape == m.shape == (8, 1, 16, 16)
    assert np.allclose(y, FLAT_HU)
    assert np.isin(x.ravel(), data[0]["low"][0.5].ravel()).all()
    assert m.all()


def test_targets_keep_the_configured_fraction_of_the_extra_noise() -> None:
    data = [_series(np.random.default_rng(0))]
    x, y, _ = sample_batch(data, _config(keep_extra_noise=0.25), np.random.default_rng(1))
    assert np.allclose(y - FLAT_HU, 0.25 * (x - FLAT_HU), atol=1e-4)
    assert np.std(x - FLAT_HU) > 5.0


def test_full_dose_patches_are_their_own_target() -> None:
    data = [_series(np.random.default_rng(0))]
    config = _config(dose_weights=[0.0, 1.0], keep_extra_noise=0.25)
    x, y, _ = sample_batch(data, config, np.random.default_rng(1))
    assert np.array_equal(x, y)
    assert np.allclose(x, FLAT_HU)
