"""The denoising model behind onnxruntime: arrays of HU in, arrays of HU out, no DICOM.

The model contract: input ``hu`` float32 ``[N, 1, H, W]`` in Hounsfield units, output
``denoised`` of the same shape in HU; normalisation lives inside the graph, H and W
may be anything.  The execution provider is the first requested one that this
onnxruntime build offers (CUDA first, then CPU), and the log says which one runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from node.grain import denoise_resampled
from node.noise import parse_noise_range

log = logging.getLogger(__name__)

INPUT_NAME = "hu"
OUTPUT_NAME = "denoised"


class ModelError(Exception):
    """The model cannot be loaded or does not honour the contract; the message says why."""


class Denoiser:
    """One onnxruntime session for the denoising model."""

    def __init__(
        self,
        model_path: Path,
        providers: list[str],
        batch_size: int = 1,
        threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.model_path = Path(model_path)
        self.batch_size = batch_size
        if not self.model_path.is_file():
            raise ModelError(
                f"model file {self.model_path} does not exist: set model_path "
                "(DENOISE_NODE_MODEL_PATH) to an ONNX model, or reinstall the package to "
                "restore the shipped model"
            )
        available = ort.get_available_providers()
        usable = [p for p in providers if p in available]
        if not usable:
            log.warning(
                "none of the requested execution providers %s is available (this "
                "onnxruntime offers %s): using CPUExecutionProvider",
                providers,
                available,
            )
            usable = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=usable
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelError(
                f"model file {self.model_path} is not a usable ONNX model ({exc}): replace it "
                "with a valid export, or point model_path at one"
            ) from exc
        self._check_contract()
        metadata = self._session.get_modelmeta().custom_metadata_map
        self.name: str = metadata.get("name") or self.model_path.stem
        self.version: str = metadata.get("version") or "unknown"
        #: input noise (HU, flat soft tissue) the model was trained on; None: not checked
        self.trained_noise_hu = parse_noise_range(metadata.get("trained_noise_hu"))
        if self.trained_noise_hu is None and metadata.get("trained_noise_hu"):
            log.warning("model metadata trained_noise_hu is not LOW-HIGH in HU: not checked")
        #: the noise grain the model works on (node.grain); None: slices are not resampled
        self.noise_grain = model_grain(metadata.get("noise_grain"))
        self.provider: str = self._session.get_providers()[0]
        log.info(
            "model %s %s loaded from %s on %s",
            self.name,
            self.version,
            self.model_path,
            self.provider,
            extra={"provider": self.provider},
        )

    def _check_contract(self) -> None:
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if (
            len(inputs) != 1
            or inputs[0].name != INPUT_NAME
            or len(inputs[0].shape) != 4
            or OUTPUT_NAME not in {o.name for o in outputs}
        ):
            found = [(i.name, i.shape) for i in inputs], [o.name for o in outputs]
            raise ModelError(
                f"model {self.model_path} does not honour the contract (one input "
                f"{INPUT_NAME!r} [N,1,H,W] float32 HU -> output {OUTPUT_NAME!r}); it has "
                f"inputs/outputs {found}"
            )

    def denoise(self, hu: np.ndarray, grain_zoom: float = 1.0) -> np.ndarray:
        """Denoise slices ``[N, H, W]`` of HU; returns float32 HU of the same shape.

        ``grain_zoom`` (``node.grain.grain_zoom``): the slices go through the model
        resampled by it, so that their noise grain is the model's.
        """
        if hu.ndim != 3:
            raise ValueError(f"expected slices [N, H, W], got shape {hu.shape}")
        return denoise_resampled(self._run, hu, grain_zoom)

    def _run(self, hu: np.ndarray) -> np.ndarray:
        batches = []
        for start in range(0, hu.shape[0], self.batch_size):
            chunk = np.ascontiguousarray(hu[start : start + self.batch_size, None], np.float32)
            (result,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: chunk})
            if result.shape != chunk.shape:
                raise ModelError(
                    f"model {self.model_path} returned shape {result.shape} for input "
                    f"{chunk.shape}: the output must have the input's shape"
                )
            batches.append(result[:, 0])
        if not batches:
            return np.empty_like(hu, dtype=np.float32)
        return np.concatenate(batches).astype(np.float32, copy=False)


def model_grain(text: str | None) -> float | None:
    """The model's ``noise_grain`` metadata (cycles per pixel), or None where absent or
    not a frequency."""
    try:
        value = float(text) if text else None
    except ValueError:
        log.warning("model metadata noise_grain is not a number: slices are not resampled")
        return None
    return value if value is not None and 0 < value <= 0.5 else None
