"""ct-denoise-node: a DICOM node that denoises low-dose CT and sends a derived series back."""

__version__ = "0.1.0"
