"""The selection score's pooling of the lesion discs over their two sources (session 12):
the 60 real low-dose discs against the 216 Catphan ones (models.validation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")


from models.train import _validation  # noqa: E402
from models.validation import (  # noqa: E402
    LESION_LOST,
    config_score,
    lesion_points_lost,
    selection_score,
)
from tests.models.two_validations import best_of_two_validations  # noqa: E402

# Session 11's validation figures (models/TRAINING_LOG.md): 2.2.0 and cpu-real-1's step 700.
SHIPPED = {
    "0.1": 8.93,
    "0.25": 5.49,
    "0.5": 3.70,
    "lesion_kept_catphan": 74.6,
    "lesion_kept_real": 69.2,
    LESION_LOST: 26.58,
}
STEP_700 = {
    "0.1": 6.81,
    "0.25": 4.73,
    "0.5": 3.52,
    "lesion_kept_catphan": 77.8,
    "lesion_kept_real": 61.9,
    LESION_LOST: 25.66,
}


def test_a_config_without_the_key_scores_as_before() -> None:
    for found in (SHIPPED, STEP_700):
        old = (
            float(np.mean([found["0.1"], found["0.25"], found["0.5"]])) + 0.25 * found[LESION_LOST]
        )
        assert config_score(found, {"validation_lesion_weight": 0.25}) == pytest.approx(old)
        assert selection_score(found, 0.25) == pytest.approx(old)
        assert config_score(found, {}) == pytest.approx(old - 0.25 * found[LESION_LOST])


def test_the_sources_weigh_alike_or_the_worse_one_counts() -> None:
    assert lesion_points_lost(SHIPPED, "discs") == pytest.approx(26.58)
    assert lesion_points_lost(SHIPPED, "sources") == pytest.approx((25.4 + 30.8) / 2)
    assert lesion_points_lost(SHIPPED, "worst") == pytest.approx(30.8)
    only_real = {"0.5": 3.0, "lesion_kept_real": 70.0, LESION_LOST: 30.0}
    for pooling in ("discs", "sources", "worst"):
        assert lesion_points_lost(only_real, pooling) == pytest.approx(30.0)
        assert lesion_points_lost({"0.5": 3.0}, pooling) == 0.0
    with pytest.raises(ValueError, match="validation_lesion_pooling"):
        lesion_points_lost(SHIPPED, "median")


def test_the_worse_source_rejects_the_checkpoint_that_lost_the_real_discs() -> None:
    """cpu-real-1's step 700 beat 2.2.0 by pooling the discs (and by the mean over the
    sources) while it kept 7.3 points less of the real validation discs."""

    def score(found: dict, pooling: str) -> float:
        config = {"validation_lesion_weight": 0.25, "validation_lesion_pooling": pooling}
        return config_score(found, config)

    assert score(STEP_700, "discs") < score(SHIPPED, "discs")
    assert score(STEP_700, "sources") < score(SHIPPED, "sources")
    assert score(STEP_700, "worst") > score(SHIPPED, "worst")
    assert score(SHIPPED, "worst") == pytest.approx(6.04 + 0.25 * 30.8)


def test_an_unknown_pooling_is_refused_before_training() -> None:
    config = {
        "validation_series": ["phantom-siemens-edge-catphan486-H31s"],
        "validation_lesion_weight": 0.25,
        "validation_lesion_pooling": "median",
    }
    with pytest.raises(ValueError, match="validation_lesion_pooling"):
        _validation(config, [])


def test_the_best_checkpoint_follows_the_configured_pooling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # step 1: best over all discs (many Catphan discs kept) but the real ones lose 30 points;
    # step 2: fewer points lost on the worse source
    figures = [
        {"0.5": 5.0, "lesion_kept_catphan": 90.0, "lesion_kept_real": 70.0, LESION_LOST: 14.3},
        {"0.5": 5.0, "lesion_kept_catphan": 78.0, "lesion_kept_real": 78.0, LESION_LOST: 22.0},
    ]
    best = best_of_two_validations(
        tmp_path, monkeypatch, "pooling", figures, validation_lesion_pooling="worst"
    )
    assert best["step"] == 2
    assert [v["score"] for v in best["history"]["val"]] == pytest.approx([12.5, 10.5])
