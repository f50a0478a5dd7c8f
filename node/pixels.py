"""Stored pixel values <-> Hounsfield units, and the pixels that must never change.

CT stores integers (signed or unsigned, any BitsStored) that map to HU through
RescaleSlope/RescaleIntercept.  Pixels outside the scan circle or marked as padding
are not anatomy: the denoiser must not see them as tissue and they are written back
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

#: HU at or below this value is outside the field of view (-2000, -2048, -3024 style fill).
OUTSIDE_FOV_HU = -1500.0
#: What the model sees in place of untouchable pixels: air, so edges stay natural.
FILL_HU = -1000.0


@dataclass(frozen=True)
class PixelCodec:
    """How one slice's stored values map to HU and back."""

    slope: float
    intercept: float
    bits_stored: int
    signed: bool
    padding_value: int | None = None
    padding_range_limit: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelCodec:
        """Read the codec from a CT header; raise ValueError naming what is missing."""
        for keyword in ("Rows", "Columns", "BitsStored", "PixelRepresentation"):
            if keyword not in ds:
                raise ValueError(f"missing {keyword}: cannot interpret the pixel data")
        # Absent (or empty) means identity; a present zero slope is invalid, not 1.
        slope = _float_or(ds.get("RescaleSlope"), 1.0)
        intercept = _float_or(ds.get("RescaleIntercept"), 0.0)
        if slope <= 0 or not np.isfinite(slope) or not np.isfinite(intercept):
            raise ValueError(f"invalid rescale slope/intercept {slope}/{intercept}")
        return cls(
            slope=slope,
            intercept=intercept,
            bits_stored=int(ds.BitsStored),
            signed=int(ds.PixelRepresentation) == 1,
            padding_value=_int_or_none(ds.get("PixelPaddingValue")),
            padding_range_limit=_int_or_none(ds.get("PixelPaddingRangeLimit")),
        )

    @property
    def stored_range(self) -> tuple[int, int]:
        """The smallest and largest value that BitsStored can hold."""
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1

    def to_hu(self, stored: np.ndarray) -> np.ndarray:
        """Stored values as float32 HU."""
        hu: np.ndarray = stored.astype(np.float32) * np.float32(self.slope)
        return hu + np.float32(self.intercept)

    def untouchable(self, stored: np.ndarray) -> np.ndarray:
        """Mask of padding and outside-field-of-view pixels, which pass through unchanged."""
        if self.padding_value is not None:
            if self.padding_range_limit is not None:
                low = min(self.padding_value, self.padding_range_limit)
                high = max(self.padding_value, self.padding_range_limit)
                return (stored >= low) & (stored <= high)
            padding: np.ndarray = stored == self.padding_value
            return padding
        return self.to_hu(stored) <= OUTSIDE_FOV_HU

    def to_stored(self, hu: np.ndarray, original: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """HU back to stored values of the original dtype; ``keep`` pixels are copied."""
        low, high = self.stored_range
        values = np.rint((hu.astype(np.float64) - self.intercept) / self.slope)
        values = np.clip(values, low, high).astype(original.dtype)
        values[keep] = original[keep]
        return values


def model_input(hu: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """HU with untouchable pixels replaced by air so the model never sees padding."""
    return np.where(keep, np.float32(FILL_HU), hu).astype(np.float32, copy=False)


def blend(original_hu: np.ndarray, denoised_hu: np.ndarray, strength: float) -> np.ndarray:
    """``original + strength * (denoised - original)``: strength 0 is the input, 1 the model."""
    blended: np.ndarray = original_hu + np.float32(strength) * (denoised_hu - original_hu)
    return blended


def _float_or(value: object, default: float) -> float:
    if value is None or value == "":
        return default
    if not isinstance(value, int | float | str):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def _int_or_none(value: object) -> int | None:
    if value is None or value == "":
        return None
    if not isinstance(value, int | float | str):
        raise TypeError(f"not a number: {value!r}")
    return int(value)
