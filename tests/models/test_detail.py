"""Detail in training and selection: the gradient term of the loss, and the lesion contrast
kept that the validation score charges for (models.train.training_loss, models.validation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from models.data import REAL_LOWDOSE_VALIDATION, SHARED_CT, SHARED_LOWDOSE  # noqa: E402
from models.train import training_loss  # noqa: E402
from models.validation import (  # noqa: E402
    LESION_CONTRAST_HU,
    LESION_DIAMETERS_MM,
    LESION_LOST,
    LESIONS_PER_SLICE,
    lesion_contrast_kept,
    lesion_set,
    plant_discs,
    selection_score,
)
from tests.models.two_validations import best_of_two_validations  # noqa: E402


def _edge() -> torch.Tensor:
    """A 100 HU step across a 32 px patch [1, 1, 32, 32]."""
    target = torch.zeros(1, 1, 32, 32)
    target[..., 16:] = 100.0
    return target


def test_without_its_weight_the_loss_is_the_masked_l1() -> None:
    target, mask = _edge(), torch.ones(1, 1, 32, 32)
    pred = target + 3.0
    assert float(training_loss(pred, target, mask)) == pytest.approx(3.0)
    assert float(training_loss(pred, target, mask, 0.5)) == pytest.approx(3.0)  # flat error


def test_the_gradient_term_charges_a_blurred_edge_more_than_an_offset_of_equal_l1() -> None:
    target, mask = _edge(), torch.ones(1, 1, 32, 32)
    blurred = F.avg_pool2d(F.pad(target, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    l1 = float(training_loss(blurred, target, mask))
    offset = target + l1
    assert float(training_loss(offset, target, mask)) == pytest.approx(l1, rel=1e-5)
    assert float(training_loss(blurred, target, mask, 0.5)) > 1.2 * l1
    assert float(training_loss(offset, target, mask, 0.5)) == pytest.approx(l1, rel=1e-5)


def test_pixel_pairs_outside_the_mask_do_not_count() -> None:
    target, mask = _edge(), torch.ones(1, 1, 32, 32)
    mask[..., :, :4] = 0.0
    pred = target.clone()
    pred[..., :, :4] = 5000.0  # wild, outside the field of view (filled, never used)
    assert float(training_loss(pred, target, mask, 0.5)) == 0.0


def _tissue(n: int = 2, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = (40.0 + rng.normal(0.0, 15.0, (n, size, size))).astype(np.float32)
    return images, np.zeros(images.shape, bool)


def test_discs_are_planted_apart_in_flat_tissue_and_labelled() -> None:
    images, keep = _tissue()
    keep[:, :, :20] = True  # outside the field of view: no disc there
    discs, labels = plant_discs(images, keep, 1.0, np.random.default_rng(1))
    count = int(labels.max())
    assert count == 2 * LESIONS_PER_SLICE * len(LESION_DIAMETERS_MM)
    assert not labels[keep].any() and not discs[keep].any()
    for k in range(1, count + 1):
        assert discs[labels == k].mean() > 0.5 * LESION_CONTRAST_HU
    assert discs.max() == pytest.approx(LESION_CONTRAST_HU)


def _lesions(name: str) -> list:
    images, keep = _tissue()
    discs, labels = plant_discs(images, keep, 1.0, np.random.default_rng(1))
    return [lesion_set(name, torch.from_numpy(images)[:, None], discs, labels)]


def test_an_identity_keeps_every_disc_and_a_blur_loses_some() -> None:
    cpu = torch.device("cpu")
    kept = lesion_contrast_kept(torch.nn.Identity(), _lesions("catphan-like"), cpu)
    assert kept["lesion_kept_catphan"] == pytest.approx(100.0, abs=1e-4)
    assert kept[LESION_LOST] == pytest.approx(0.0, abs=1e-4)
    blur = torch.nn.Sequential(torch.nn.ReplicationPad2d(3), torch.nn.AvgPool2d(7, stride=1))
    lost = lesion_contrast_kept(blur, _lesions(REAL_LOWDOSE_VALIDATION[0]), cpu)
    assert set(lost) == {"lesion_kept_real", LESION_LOST}
    assert 0.0 < lost["lesion_kept_real"] < 60.0
    assert lost[LESION_LOST] == pytest.approx(100.0 - lost["lesion_kept_real"])


def test_the_score_adds_the_weighted_contrast_lost_to_the_mean_error() -> None:
    found = {"0.1": 9.0, "0.5": 3.0, "lesion_kept_real": 70.0, LESION_LOST: 20.0}
    assert selection_score(found, 0.0) == pytest.approx(6.0)
    assert selection_score(found, 0.25) == pytest.approx(11.0)
    assert selection_score({"0.1": 9.0, "0.5": 3.0}, 0.25) == pytest.approx(6.0)


def test_the_best_checkpoint_is_the_one_with_the_best_score_not_the_best_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # step 1: lower error but 20 points of contrast lost; step 2: the better score
    figures = [{"0.5": 5.0, LESION_LOST: 20.0}, {"0.5": 6.0, LESION_LOST: 4.0}]
    best = best_of_two_validations(tmp_path, monkeypatch, "lesions", figures, gradient_weight=0.5)
    assert best["step"] == 2
    assert [v["score"] for v in best["history"]["val"]] == pytest.approx([10.0, 7.0])


@pytest.mark.skipif(
    not (SHARED_LOWDOSE / REAL_LOWDOSE_VALIDATION[0]).is_dir()
    or not (SHARED_CT / "phantom-siemens-edge-catphan486-H31s").is_dir(),
    reason="the shared validation series are not on this machine",
)
def test_the_validation_lesions_of_the_catphan_and_a_real_series() -> None:
    from models.validation import build_lesions, build_validation

    config = {
        "val_crop": 128,
        "doses": [0.25],
        "validation_series": ["phantom-siemens-edge-catphan486-H31s"],
        "validation_lesion_series": [REAL_LOWDOSE_VALIDATION[0]],
    }
    lesions = build_lesions(config, build_validation(config))
    assert len(lesions) == 6 + 1  # six textures at 25 %, one real series
    assert lesions[-1].name == REAL_LOWDOSE_VALIDATION[0]
    assert all(len(s.planted) > 0 for s in lesions)
    kept = lesion_contrast_kept(torch.nn.Identity(), lesions, torch.device("cpu"))
    assert kept[LESION_LOST] == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="not a real low-dose validation series"):
        build_lesions({**config, "validation_lesion_series": ["STS_014"]}, [])
