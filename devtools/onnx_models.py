"""Tiny ONNX models that honour the node's model contract, so nothing needs the trained CNN.

A k x k mean filter (a Conv with 'same' padding) from input ``hu`` [N,1,H,W] to output
``denoised``, with dynamic N, H and W and name/version metadata: it lowers noise in
uniform regions and keeps an edge where it is, like a denoiser.  Needs ``onnx`` (the
test extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TINY_NAME = "tiny-mean"
TINY_VERSION = "0.0.1"


def write_mean_filter_model(
    path: Path,
    kernel: int = 5,
    layers: int = 1,
    name: str = TINY_NAME,
    version: str = TINY_VERSION,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a ``layers``-deep stack of ``kernel`` x ``kernel`` mean filters to ``path``
    (``metadata``: more entries, a ``noise_grain`` say)."""
    weight = numpy_helper.from_array(
        np.full((1, 1, kernel, kernel), 1.0 / kernel**2, np.float32), "weight"
    )
    pad = kernel // 2
    nodes = []
    current = "hu"
    for layer in range(layers):
        output = "denoised" if layer == layers - 1 else f"layer{layer}"
        nodes.append(
            helper.make_node(
                "Conv", [current, "weight"], [output], pads=[pad, pad, pad, pad], name=output
            )
        )
        current = output
    return _save(path, "mean_filter", nodes, [weight], (name, version), metadata)


def _save(
    path: Path,
    graph_name: str,
    nodes: list[onnx.NodeProto],
    weights: list[onnx.TensorProto],
    name_version: tuple[str, str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """The node's contract around ``nodes``: ``hu`` [N,1,H,W] in, ``denoised`` out, opset 17."""
    shape = ["N", 1, "H", "W"]
    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info("hu", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("denoised", TensorProto.FLOAT, shape)],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    name, version = name_version
    helper.set_model_props(model, {"name": name, "version": version, **(metadata or {})})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def write_dncnn_model(path: Path, depth: int = 17, channels: int = 64, seed: int = 0) -> Path:
    """A DnCNN of ``depth`` 3 x 3 convolutions of ``channels`` (Zhang et al. 2017: Conv+ReLU,
    depth-2 x Conv+BN+ReLU with BN folded into the Conv, Conv; residual), random weights:
    the reference whose time issue #17's speed target is a fraction of."""
    rng = np.random.default_rng(seed)
    initializers, nodes = [], []
    current = "hu"
    for layer in range(depth):
        inputs = 1 if layer == 0 else channels
        outputs = 1 if layer == depth - 1 else channels
        scale = np.sqrt(2.0 / (9 * inputs))
        weight = (rng.standard_normal((outputs, inputs, 3, 3)) * scale).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{layer}"),
            numpy_helper.from_array(np.zeros(outputs, np.float32), f"b{layer}"),
        ]
        conv = f"conv{layer}"
        nodes.append(
            helper.make_node(
                "Conv", [current, f"w{layer}", f"b{layer}"], [conv], pads=[1, 1, 1, 1], name=conv
            )
        )
        current = conv
        if layer < depth - 1:
            nodes.append(helper.make_node("Relu", [conv], [f"relu{layer}"], name=f"relu{layer}"))
            current = f"relu{layer}"
    nodes.append(helper.make_node("Sub", ["hu", current], ["denoised"], name="residual"))
    return _save(path, "dncnn", nodes, initializers, (f"dncnn-{depth}x{channels}", "reference"))
