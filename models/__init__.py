"""The denoising model: data loading, low-dose simulation, network, training and ONNX export.

Only ``models.data`` and ``models.simulate`` are imported by the running node (demo and tests);
they need numpy, scipy, scikit-image and pydicom.  Training and export need PyTorch.
"""

from pathlib import Path

#: The ONNX model that ships with the node (package data, found after ``pip install``;
#: node.config uses it as the default model_path).
SHIPPED_MODEL = Path(__file__).resolve().parent / "ct_denoise.onnx"
