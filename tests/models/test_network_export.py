"""The exported ONNX model keeps the worker's contract and matches PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from devtools.onnx_models import write_mean_filter_model
from node.denoise import Denoiser

SHIPPED = Path(__file__).resolve().parents[2] / "node" / "model" / "ct_denoise.onnx"
METADATA_KEYS = {"name", "version", "training_doses", "training_data", "description"}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ct_like(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Body-like HU: soft tissue, some air and bone, plus noise."""
    hu = rng.normal(40.0, 30.0, size=(n, 1, h, w)).astype(np.float32)
    hu[..., : h // 5, :] = -1000.0
    hu[..., h // 2 : h // 2 + 4, w // 3 : w // 3 + 6] = 900.0
    return hu


def test_onnx_matches_pytorch_for_odd_sizes_and_batches(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from models.export import export_model
    from models.network import DenoiseUNet

    torch.manual_seed(0)
    model = DenoiseUNet().eval()
    with torch.no_grad():  # a non-trivial network: the zero-initialised head would hide bugs
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    out = export_model(model, tmp_path / "tiny.onnx", {"training_doses": "0.25"})
    session = _session(out)
    assert [i.name for i in session.get_inputs()] == ["hu"]
    assert [o.name for o in session.get_outputs()] == ["denoised"]
    rng = np.random.default_rng(0)
    for n, h, w in [(1, 64, 64), (2, 65, 67), (3, 31, 45), (1, 127, 96)]:
        x = _ct_like(rng, n, h, w)
        got = session.run(["denoised"], {"hu": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == x.shape and got.dtype == np.float32
        assert np.abs(got - want).max() < 0.5, (n, h, w)


def test_fresh_network_is_identity() -> None:
    torch = pytest.importorskip("torch")
    from models.network import DenoiseUNet

    x = torch.from_numpy(_ct_like(np.random.default_rng(1), 1, 33, 40))
    with torch.no_grad():
        assert torch.equal(DenoiseUNet()(x), x)


def test_shipped_model_contract() -> None:
    if not SHIPPED.exists():
        pytest.fail(f"{SHIPPED} is missing: the node ships it")
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(SHIPPED))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(meta) >= METADATA_KEYS
    assert meta["name"] == "ct-denoise-unet"
    assert SHIPPED.stat().st_size < 20e6
    session = _session(SHIPPED)
    rng = np.random.default_rng(2)
    for n, h, w in [(1, 64, 64), (2, 65, 67)]:
        x = _ct_like(rng, n, h, w)
        y = session.run(["denoised"], {"hu": x})[0]
        assert y.shape == x.shape and y.dtype == np.float32
        assert np.isfinite(y).all()
        # a residual denoiser: the image stays the image
        assert np.abs(y - x)[..., h // 5 :, :].mean() < 40.0


def test_a_released_model_is_where_fine_tuning_starts(tmp_path: Path) -> None:
    """``models.train --init-from X.onnx`` starts from exactly the released weights, and
    says which release that was."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from models.export import export_model
    from models.network import DenoiseUNet
    from models.train import load_initial_weights

    torch.manual_seed(1)
    released = DenoiseUNet().eval()
    with torch.no_grad():
        for p in released.parameters():
            p.normal_(0.0, 0.05)
    path = export_model(
        released, tmp_path / "r.onnx", {"version": "9.1.0", "training_machine": "an H200"}
    )
    fresh = DenoiseUNet()
    base = load_initial_weights(fresh, str(path))
    assert base.startswith("ct-denoise-unet 9.1.0") and "an H200" in base
    for name, value in released.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_the_gpu_timing_runs_the_shipped_weights_as_the_node_does() -> None:
    """models.gpu_timing rebuilds the network from the ONNX file alone (widths from its
    tensors); on the CPU in fp32 it must give the node's output, or its GPU figures would be
    for another network."""
    pytest.importorskip("torch")
    from models.gpu_timing import measure, synthetic_slice

    rows = measure(SHIPPED, "cpu", 64)
    assert [(precision, batch) for precision, batch, _, _ in rows] == [
        ("fp32", 1),
        ("fp32", 8),
        ("fp32", 32),
    ]
    assert all(ms > 0 and diff < 0.01 for _, _, ms, diff in rows)
    hu = synthetic_slice(64)
    assert hu.min() == -2048.0 and hu.max() > 700.0


def test_relabel_sets_version_and_grain_and_keeps_the_rest(tmp_path: Path) -> None:
    pytest.importorskip("torch")  # models.export imports it
    from models.export import main

    path = write_mean_filter_model(tmp_path / "m.onnx", metadata={"trained_noise_hu": "3-60"})
    before = ort.InferenceSession(str(path)).run(None, {"hu": np.ones((1, 1, 9, 9), np.float32)})
    assert main(["--relabel", str(path), "--version", "9.9.9", "--noise-grain", "0.2"]) == 0
    relabelled = Denoiser(path, ["CPUExecutionProvider"])
    assert (relabelled.version, relabelled.noise_grain) == ("9.9.9", 0.2)
    assert relabelled.trained_noise_hu == (3.0, 60.0)
    after = ort.InferenceSession(str(path)).run(None, {"hu": np.ones((1, 1, 9, 9), np.float32)})
    np.testing.assert_array_equal(before[0], after[0])
