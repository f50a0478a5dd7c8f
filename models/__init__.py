"""The denoising model: data loading, low-dose simulation, network, training and ONNX export.

Only ``models.data`` and ``models.simulate`` are imported by the running node (demo and tests);
they need numpy, scipy, scikit-image and pydicom.  Training and export need PyTorch.
"""
