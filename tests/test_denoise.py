"""The onnxruntime wrapper: contract, batching, provider choice and clear model errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from devtools.onnx_models import TINY_NAME, TINY_VERSION, write_mean_filter_model
from node.denoise import Denoiser, ModelError

PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_loads_metadata_and_runs_on_an_available_provider(tiny_model: Path) -> None:
    denoiser = Denoiser(tiny_model, PROVIDERS)
    assert (denoiser.name, denoiser.version) == (TINY_NAME, TINY_VERSION)
    assert denoiser.provider in PROVIDERS


def test_unavailable_providers_fall_back_to_cpu(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="node.denoise"):
        denoiser = Denoiser(tiny_model, ["NoSuchExecutionProvider"])
    assert denoiser.provider == "CPUExecutionProvider"
    assert "NoSuchExecutionProvider" in caplog.text


def test_metadata_falls_back_to_file_stem(tmp_path: Path) -> None:
    path = write_mean_filter_model(tmp_path / "plain-model.onnx", name="", version="")
    denoiser = Denoiser(path, PROVIDERS)
    assert (denoiser.name, denoiser.version) == ("plain-model", "unknown")


def with_trained_range(tiny_model: Path, folder: Path, text: str) -> Path:
    """The tiny model with a ``trained_noise_hu`` metadata entry, as an export would write."""
    model = onnx.load(tiny_model)
    helper.set_model_props(
        model, {"name": TINY_NAME, "version": TINY_VERSION, "trained_noise_hu": text}
    )
    path = folder / "ranged.onnx"
    onnx.save(model, path)
    return path


def test_the_trained_noise_range_comes_from_the_metadata(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert Denoiser(tiny_model, PROVIDERS).trained_noise_hu is None, "absent: not checked"
    ranged = Denoiser(with_trained_range(tiny_model, tmp_path, "3-60"), PROVIDERS)
    assert ranged.trained_noise_hu == (3.0, 60.0)
    with caplog.at_level(logging.WARNING, logger="node.denoise"):
        garbled = Denoiser(with_trained_range(tiny_model, tmp_path, "low to high"), PROVIDERS)
    assert garbled.trained_noise_hu is None and "trained_noise_hu" in caplog.text


@pytest.mark.parametrize("count,batch_size", [(1, 4), (7, 3), (8, 4)])
def test_batches_give_the_same_result_as_one_call(
    tiny_model: Path, count: int, batch_size: int
) -> None:
    rng = np.random.default_rng(1)
    hu = rng.normal(0, 50, (count, 40, 56)).astype(np.float32)
    whole = Denoiser(tiny_model, PROVIDERS, batch_size=count).denoise(hu)
    batched = Denoiser(tiny_model, PROVIDERS, batch_size=batch_size).denoise(hu)
    assert batched.shape == hu.shape and batched.dtype == np.float32
    np.testing.assert_allclose(batched, whole, atol=1e-4)
    # a 5x5 mean filter: the interior of a constant image is unchanged
    flat = Denoiser(tiny_model, PROVIDERS).denoise(np.full((2, 20, 20), 40.0, np.float32))
    np.testing.assert_allclose(flat[:, 2:-2, 2:-2], 40.0, atol=1e-3)


def test_missing_model_names_path_and_remedy(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(ModelError, match="does not exist") as info:
        Denoiser(missing, PROVIDERS)
    assert str(missing) in str(info.value) and "model_path" in str(info.value)


def test_corrupt_model_names_path_and_remedy(broken_model: Path) -> None:
    with pytest.raises(ModelError, match="not a usable ONNX model") as info:
        Denoiser(broken_model, PROVIDERS)
    assert str(broken_model) in str(info.value)


def test_model_breaking_the_contract_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "wrong.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match="contract"):
        Denoiser(path, PROVIDERS)
