"""A two-step training run whose two validations return given figures: which checkpoint the
selection keeps, without a real validation set."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.train import Run, fit


def best_of_two_validations(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run_name: str,
    figures: Iterable[dict[str, float]],
    **config: Any,
) -> dict[str, Any]:
    """Train a tiny network for two steps on a flat stack, the validation after step n
    returning the n-th of ``figures``; the best checkpoint ``fit`` saved."""
    monkeypatch.setenv("DENOISE_NODE_CACHE_DIR", str(tmp_path))
    full = np.full((2, 32, 32), 40.0, np.float32)
    data = [{"full": full, "keep": np.zeros(full.shape, bool), "low": {0.5: full + 5}}]
    settings = {
        "run_name": run_name,
        "seed": 0,
        "threads": 1,
        "patch": 16,
        "batch": 2,
        "doses": [0.5],
        "dose_weights": [1.0],
        "lr": 1e-3,
        "lr_min": 1e-5,
        "weight_decay": 0.0,
        "warmup_steps": 1,
        "max_steps": 2,
        "val_every": 1,
        "log_every": 1,
        "validation_lesion_weight": 0.25,
        "model": {"widths": [4, 8, 16]},
        **config,
    }
    answers = iter(figures)
    fit(settings, data, [], lambda model, device: next(answers), Run("test", 3600.0))
    path = tmp_path / "checkpoints" / run_name / "best.pt"
    best: dict[str, Any] = torch.load(path, weights_only=False)
    return best
