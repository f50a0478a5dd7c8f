"""The shipped network in PyTorch on a GPU: time per 512 x 512 slice, and agreement with the node.

``python -m models.gpu_timing [--model FILE] [--device cuda] [--size 512]``

The node's GPU path is onnxruntime with the CUDA provider (the ``gpu`` extra); where that
package cannot be installed (a lent machine with no registry), the same graph with the same
weights runs in PyTorch instead, which is what this measures.  Each row also gives the largest
difference in HU from onnxruntime on the CPU (the node's CPU path) on one synthetic slice, so a
faster precision is only quoted with what it costs: the export contract allows 0.5 HU.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from devtools.phantom import OUTSIDE_FOV, phantom_hu
from models import SHIPPED_MODEL
from models.network import DenoiseUNet
from models.train import load_initial_weights

BATCHES = (1, 8, 32)


def network_from_onnx(path: Path) -> DenoiseUNet:
    """The PyTorch network with the ONNX file's weights; widths read from its tensors."""
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}
    widths = tuple(shapes[f"{name}.0.weight"][0] for name in ("enc1", "down2", "down3"))
    model = DenoiseUNet(widths)  # type: ignore[arg-type]
    load_initial_weights(model, str(path))
    return model.eval()


def synthetic_slice(size: int, seed: int = 0) -> np.ndarray:
    """The node's test phantom (water, bone and soft-tissue inserts, air, -2048 outside the
    field of view) with correlated noise inside the field of view: the value ranges a real
    slice has, without patient data."""
    image = phantom_hu(size)
    noise = np.random.default_rng(seed).normal(0.0, 25.0, image.shape)
    noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1)) / np.sqrt(3)
    return np.where(image > OUTSIDE_FOV, image + noise, image).astype(np.float32)


def seconds_per_slice(run: Callable[[], object], batch: int, sync: Callable[[], None]) -> float:
    """Median wall time of 20 runs of ``run`` after 5 warm-ups, per slice of the batch."""
    for _ in range(5):
        run()
    sync()
    times = []
    for _ in range(20):
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) / batch


def measure(model_path: Path, device: str, size: int) -> list[tuple[str, int, float, float]]:
    """(precision, batch, ms per slice, max |HU difference| from onnxruntime on the CPU)."""
    hu = synthetic_slice(size)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: hu[None, None]})[0][0, 0]
    model = network_from_onnx(model_path).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    modes = {"fp32": (False, False)}
    if device.startswith("cuda"):
        modes |= {"fp32 + TF32": (True, False), "fp16 autocast": (True, True)}
    rows = []
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for precision, (tf32, autocast) in modes.items():
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            for batch in BATCHES:
                x = torch.from_numpy(np.repeat(hu[None, None], batch, axis=0)).to(device)

                def run(x: torch.Tensor = x, half: bool = autocast) -> torch.Tensor:
                    with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=half):
                        return model(x)

                seconds = seconds_per_slice(run, batch, sync)
                diff = float(np.abs(run()[0, 0].float().cpu().numpy() - reference).max())
                rows.append((precision, batch, 1000.0 * seconds, diff))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the machine and a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.machine()
    meta = {p.key: p.value for p in onnx.load(str(args.model)).metadata_props}
    print(
        f"{meta.get('name')} {meta.get('version')} on {name} ({args.device}), torch "
        f"{torch.__version__}, onnxruntime {ort.__version__} (providers: "
        f"{', '.join(ort.get_available_providers())}), {args.size} x {args.size} slices"
    )
    print("\n| precision | batch | ms per slice | max HU difference from onnxruntime CPU |")
    print("|---|---:|---:|---:|")
    for precision, batch, ms, diff in measure(args.model, args.device, args.size):
        print(f"| {precision} | {batch} | {ms:.2f} | {diff:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
