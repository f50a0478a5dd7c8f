"""The denoising model: data loading, low-dose simulation, network, training and ONNX export.

The running node never imports this package; ``models`` may import ``node``.  The demo and
the tests (``devtools``) use ``models.data`` and ``models.simulate``, which need numpy,
scipy, scikit-image and pydicom.  Training and export need PyTorch.
"""

from node.config import SHIPPED_MODEL

#: The ONNX model that ships with the node: package data of the node
#: (``node/model/ct_denoise.onnx``), which owns the constant; export writes it there.
__all__ = ["SHIPPED_MODEL"]
