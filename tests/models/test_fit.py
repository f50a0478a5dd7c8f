"""A tiny training on the CPU: it runs, checkpoints, and a resumed run continues exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from models.train import Run, fit  # noqa: E402


def _data() -> list[dict]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    full = np.stack([40.0 + 60.0 * ((yy - 24) ** 2 + (xx - 24) ** 2 < 100 + i) for i in range(3)])
    full = full.astype(np.float32)
    low = full + rng.normal(0.0, 20.0, full.shape).astype(np.float32)
    return [{"full": full, "keep": np.zeros(full.shape, bool), "low": {0.5: low}, "native_hu": 8}]


def _config(run_name: str) -> dict:
    return {
        "run_name": run_name,
        "seed": 0,
        "threads": 1,
        "patch": 16,
        "batch": 4,
        "doses": [0.5],
        "dose_weights": [1.0],
        "keep_extra_noise": 0.25,
        "grain_prob": 0.5,
        "slab_prob": 0.5,
        "lr": 1e-3,
        "lr_min": 1e-5,
        "weight_decay": 1e-4,
        "warmup_steps": 2,
        "max_steps": 6,
        "val_every": 3,
        "save_every": 1,
        "log_every": 1,
        "model": {"widths": [4, 8, 16]},
    }


@torch.no_grad()
def _val(model: torch.nn.Module, device: torch.device) -> dict:
    x = torch.from_numpy(_data()[0]["low"][0.5][:, None])
    return {"0.5": float((model(x) - torch.from_numpy(_data()[0]["full"][:, None])).abs().mean())}


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_a_stopped_run_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DENOISE_NODE_CACHE_DIR", str(tmp_path))
    profiles = [np.linspace(1.0, 0.0, 32)]
    fit(_config("straight"), _data(), profiles, _val, Run("test", 3600.0))
    fit(_config("halves"), _data(), profiles, _val, Run("test", 3600.0, stop_after=4))
    stopped = torch.load(tmp_path / "checkpoints" / "halves" / "last.pt", weights_only=False)
    assert stopped["step"] == 4
    fit(_config("halves"), _data(), profiles, _val, Run("test", 3600.0, resume=True))
    straight = _weights(tmp_path / "checkpoints" / "straight" / "last.pt")
    resumed = _weights(tmp_path / "checkpoints" / "halves" / "last.pt")
    assert (
        torch.load(tmp_path / "checkpoints" / "halves" / "last.pt", weights_only=False)["step"] == 6
    )
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
