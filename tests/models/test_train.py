"""Training patches: doses, targets and masks drawn as configured."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from models.sampler import PatchSampler, gaussian_blur, gaussian_kernel  # noqa: E402

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
    x, y, m = (t.numpy() for t in PatchSampler(data, _config(), seed=1).draw())
    assert x.shape == y.shape == m.shape == (8, 1, 16, 16)
    assert np.allclose(y, FLAT_HU)
    assert np.isin(x.ravel(), data[0]["low"][0.5].ravel()).all()
    assert m.all()


def test_targets_keep_the_configured_fraction_of_the_extra_noise() -> None:
    data = [_series(np.random.default_rng(0))]
    x, y, _ = (t.numpy() for t in PatchSampler(data, _config(keep_extra_noise=0.25), seed=1).draw())
    assert np.allclose(y - FLAT_HU, 0.25 * (x - FLAT_HU), atol=1e-4)
    assert np.std(x - FLAT_HU) > 5.0


def test_full_dose_patches_are_their_own_target() -> None:
    data = [_series(np.random.default_rng(0))]
    config = _config(dose_weights=[0.0, 1.0], keep_extra_noise=0.25)
    x, y, _ = (t.numpy() for t in PatchSampler(data, config, seed=1).draw())
    assert np.array_equal(x, y)
    assert np.allclose(x, FLAT_HU)


def test_detail_scaling_blurs_like_scipy() -> None:
    images = np.random.default_rng(2).normal(0.0, 30.0, (3, 40, 40)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(images), gaussian_kernel(6.0)).numpy()
    for image, blurred in zip(images, ours, strict=True):
        assert np.allclose(blurred, gaussian_filter(image, 6.0, mode="nearest"), atol=1e-3)


def test_scaled_patches_shrink_the_detail_and_keep_the_outside_filled() -> None:
    rng = np.random.default_rng(0)
    series = _series(rng)
    series["keep"][:, :, :4] = True  # a strip outside the field of view
    series["full"][series["keep"]] = -1000.0
    series["low"] = {
        d: np.where(series["keep"], -1000.0, a).astype(np.float32) for d, a in series["low"].items()
    }
    plain = PatchSampler([series], _config(patch=32, batch=16), seed=3).draw()
    scaled = PatchSampler(
        [series],
        _config(patch=32, batch=16, scale_prob=1.0, scale_range=[0.2, 0.2], scale_sigma=6.0),
        seed=3,
    ).draw()
    body = plain[2].bool()
    assert torch.equal(scaled[2], plain[2])
    assert torch.all(scaled[0][~body] == -1000.0)
    noise = (plain[0] - plain[1])[body]
    assert float(noise.std()) > 5.0
    assert torch.allclose((scaled[0] - scaled[1])[body], 0.2 * noise, atol=1e-3)


@pytest.mark.parametrize(
    ("insert_prob", "zoom_prob", "grain_prob"),
    [(0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (0.5, 0.5, 0.0), (0.5, 0.0, 0.5)],
)
def test_a_seed_draws_the_same_batches(
    insert_prob: float, zoom_prob: float, grain_prob: float
) -> None:
    data = [_series(np.random.default_rng(0))]
    config = _config(
        scale_prob=0.5,
        scale_range=[0.2, 1.0],
        scale_sigma=3.0,
        insert_prob=insert_prob,
        zoom_prob=zoom_prob,
        zoom_range=[0.8, 1.5],
        grain_prob=grain_prob,
        slab_prob=0.5,
    )
    profiles = [np.linspace(1.0, 0.1, 32)]
    first, second = (PatchSampler(data, config, seed=7, profiles=profiles) for _ in range(2))
    for _ in range(3):
        for a, b in zip(first.draw(), second.draw(), strict=True):
            assert torch.equal(a, b)


def test_inserts_add_a_uniform_disc_in_air_and_leave_the_noise_to_remove_alone() -> None:
    """The disc and ring replace the patch's content in input and target alike, so what the
    network must remove (input minus target) is the patch's own extra noise, unchanged."""
    data = [_series(np.random.default_rng(0))]
    config = _config(patch=32, batch=16, keep_extra_noise=0.25)
    inserted = config | {
        "insert_prob": 1.0,
        "insert_radius_px": [6, 6],
        "insert_ring_px": [8, 8],
        "insert_hu": [150, 150],
    }
    x0, y0, m0 = PatchSampler(data, config, seed=5).draw()
    x1, y1, m1 = PatchSampler(data, inserted, seed=5).draw()
    assert torch.equal(m0, m1)
    assert torch.allclose(x1 - y1, x0 - y0, atol=1e-3)
    for target in y1[:, 0]:
        assert float(target.min()) < -900.0  # the air ring reaches into every patch
    assert float((y1 > 100.0).float().mean()) > 0.02  # and so do the discs
    assert float((y0 > 100.0).float().mean()) == 0.0


def _ramp_series(rng: np.random.Generator, size: int = 64) -> dict:
    """Full dose rising 4 HU per pixel along x; 50 % dose adds white noise of 10 HU."""
    ramp = np.broadcast_to(4.0 * np.arange(size, dtype=np.float32), (2, size, size)).copy()
    low = ramp + rng.normal(0.0, 10.0, ramp.shape).astype(np.float32)
    return {"full": ramp, "keep": np.zeros(ramp.shape, bool), "low": {0.5: low, 1.0: ramp.copy()}}


def _neighbour_correlation(noise: np.ndarray) -> float:
    """Correlation of horizontally adjacent pixels, over a batch [B, 1, P, P]."""
    a, b = noise[..., :, :-1].ravel(), noise[..., :, 1:].ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("zoom", [0.5, 2.0])
def test_zoomed_patches_resample_anatomy_and_noise_alike(zoom: float) -> None:
    """A zoom of z shows the ramp at 4 / z HU per pixel in input and target alike. White
    extra noise gets a grain z pixels wide when z > 1 (neighbours correlated); at z = 0.5 each
    output pixel averages a 2 x 2 block of its own, so it stays white at half the std."""
    data = [_ramp_series(np.random.default_rng(0))]
    config = _config(patch=16, batch=8, zoom_prob=1.0, zoom_range=[zoom, zoom])
    x, y, m = (t.numpy() for t in PatchSampler(data, config, seed=4).draw())
    plain = PatchSampler(data, _config(patch=16, batch=8), seed=4).draw()
    for target in y[:, 0]:
        gy, gx = np.gradient(target.astype(np.float64))
        assert np.allclose(np.hypot(gy, gx), 4.0 / zoom, atol=1e-3)
    assert m.all()
    noise = x - y
    plain_noise = (plain[0] - plain[1]).numpy()
    assert abs(_neighbour_correlation(plain_noise)) < 0.1
    if zoom > 1:
        assert _neighbour_correlation(noise) > 0.5
    else:
        assert abs(_neighbour_correlation(noise)) < 0.1
        assert np.std(noise) == pytest.approx(np.std(plain_noise) / 2, rel=0.15)


def test_init_from_replaces_only_the_first_run_stages_start() -> None:
    from models.train import stage_configs

    raw = {
        "seed": 0,
        "stages": [{"run_name": "s1"}, {"run_name": "s2", "init_from": "s1", "lr": 3e-4}],
    }
    both = stage_configs(raw, None, "models/ct_denoise.onnx")
    assert [(c["run_name"], c.get("init_from"), c["stage"]) for c in both] == [
        ("s1", "models/ct_denoise.onnx", 1),
        ("s2", "s1", 2),
    ]
    (second,) = stage_configs(raw, 2, "models/ct_denoise.onnx")
    assert second["init_from"] == "models/ct_denoise.onnx" and second["lr"] == 3e-4
    assert second["seed"] == 0 and "stages" not in second
    assert stage_configs(raw, 2, None)[0]["init_from"] == "s1"
    assert "stages" in raw
