"""The network's own noise estimate: proportional to the noise, blind to anatomy edges."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.network import NOISE_CELL, NOISE_FLOOR, noise_map  # noqa: E402


def _soft_tissue(sigma: float, size: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (40.0 + rng.normal(0.0, sigma, (1, 1, size, size))).astype(np.float32)


def _level(hu: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return noise_map(torch.from_numpy(hu))[0, 0].numpy()


def test_level_is_proportional_to_the_noise() -> None:
    quiet, noisy = _level(_soft_tissue(5.0)), _level(_soft_tissue(20.0, seed=1))
    assert quiet.shape == (128 // NOISE_CELL, 128 // NOISE_CELL)
    ratio = np.median(noisy) / np.median(quiet)
    assert 3.6 < ratio < 4.4, ratio


def test_noiseless_image_sits_at_the_floor() -> None:
    assert np.allclose(_level(np.full((1, 1, 64, 64), 40.0, np.float32)), NOISE_FLOOR)


def test_air_and_bone_neither_inflate_nor_dilute_the_level() -> None:
    """Edges of air and bone are not noise, and their flat insides are not quiet tissue."""
    plain = _soft_tissue(8.0)
    edged = plain.copy()
    edged[..., :40, :] = -1000.0  # air above (scanners clip it: no noise)
    edged[..., 90:, 60:] = 1200.0  # dense bone in a corner
    level, reference = _level(edged), float(np.median(_level(plain)))
    assert level.min() > 0.8 * reference and level.max() < 1.2 * reference, (
        level.min(),
        level.max(),
        reference,
    )


def test_cells_without_tissue_lean_on_the_image_wide_level() -> None:
    image = _soft_tissue(10.0)
    image[..., :, :64] = -1000.0  # left half air: no tissue to measure
    level = _level(image)
    assert np.median(level[:, :4]) == pytest.approx(np.median(level[:, 12:]), rel=0.35)
