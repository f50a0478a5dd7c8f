"""Which settled series are denoised, how strongly and where the result goes.

The decision is made from the per-instance headers the receiver recorded, never from
the files.  Two guards come before any rule: anything DERIVED and anything this node
made is skipped, so the node's output routed back by a PACS never loops.  Then a CT
series must be ORIGINAL and not a LOCALIZER; then the first configured rule whose
every condition matches decides (with no rules, the built-in ``default`` rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from node.config import Rule, Settings

#: How the node names itself in ContributingEquipmentSequence and DerivationDescription.
NODE_EQUIPMENT = "ct-denoise-node"
DEFAULT_RULE = "default"


@dataclass
class Decision:
    """The settler's verdict for one series; ``skip_reason`` set means a skipped job."""

    rule: str
    strength: float
    destinations: list[str]
    skip_reason: str | None
    priority: int = 0


@dataclass(frozen=True)
class SeriesSummary:
    """The series-level values rules look at, taken from its instances' headers."""

    slices: int
    modalities: list[str]
    image_types: list[str]
    series_description: str
    convolution_kernel: str | None
    slice_thickness: float | None
    ctdi_vol: float | None
    node_output: bool

    @classmethod
    def of(cls, headers: list[dict[str, Any]]) -> SeriesSummary:
        doses = [h["CTDIvol"] for h in headers if h.get("CTDIvol") is not None]
        return cls(
            slices=sum(int(h.get("NumberOfFrames") or 1) for h in headers),
            modalities=_distinct(h.get("Modality") or "(none)" for h in headers),
            image_types=_distinct("\\".join(h.get("ImageType") or ["(none)"]) for h in headers),
            series_description=_first(headers, "SeriesDescription") or "",
            convolution_kernel=_first(headers, "ConvolutionKernel"),
            slice_thickness=_first(headers, "SliceThickness"),
            ctdi_vol=sum(doses) / len(doses) if doses else None,
            node_output=any(h.get("NodeOutput") for h in headers),
        )


def select_series(
    settings: Settings, headers: list[dict[str, Any]], calling_ae_title: str
) -> Decision:
    """Decide what happens to a settled series whose instances have ``headers``."""
    if not headers:
        return _skip(DEFAULT_RULE, "the series has no instances")
    series = SeriesSummary.of(headers)
    guard = _never_processed(series)
    if guard:
        return _skip("derived", guard)
    not_eligible = _not_eligible(series)
    if not_eligible:
        return _skip(DEFAULT_RULE, not_eligible)
    if not settings.rules:
        too_few = _too_few_slices(series, settings.min_slices, "min_slices")
        if too_few:
            return _skip(DEFAULT_RULE, too_few)
        return Decision(DEFAULT_RULE, settings.strength, sorted(settings.destinations), None)

    mismatches = []
    for index, rule in enumerate(settings.rules):
        mismatch = _mismatch(rule, index, series, calling_ae_title, settings.min_slices)
        if mismatch:
            mismatches.append(f"rule {rule.name!r}: {mismatch}")
            continue
        if rule.action == "skip":
            return _skip(rule.name, f"rule {rule.name!r} says skip")
        strength = settings.strength if rule.strength is None else rule.strength
        destinations = rule.destinations or sorted(settings.destinations)
        return Decision(rule.name, strength, list(destinations), None, rule.priority)
    return _skip("none", "no rule matches: " + "; ".join(mismatches))


def _never_processed(series: SeriesSummary) -> str | None:
    """Why the series is output (ours or anyone's derived images), else None."""
    if series.node_output:
        return (
            f"made by this node ({NODE_EQUIPMENT} in ContributingEquipmentSequence or "
            "DerivationDescription); the node never processes its own output"
        )
    derived = [t for t in series.image_types if t.split("\\")[0] == "DERIVED"]
    if derived:
        return f"ImageType is {derived[0]}; derived images are never denoised again"
    return None


def _not_eligible(series: SeriesSummary) -> str | None:
    """Why the series is not an original axial CT acquisition, else None."""
    if series.modalities != ["CT"]:
        return f"Modality is {', '.join(series.modalities)}, not CT"
    for image_type in series.image_types:
        values = image_type.split("\\")
        if values[0] != "ORIGINAL":
            return f"ImageType is {image_type}, not ORIGINAL"
        if "LOCALIZER" in values:
            return f"ImageType is {image_type}: a localizer is not denoised"
    return None


def _too_few_slices(series: SeriesSummary, minimum: int, key: str) -> str | None:
    if series.slices < minimum:
        return f"only {series.slices} slices; the minimum is {minimum} ({key})"
    return None


def _mismatch(
    rule: Rule, index: int, series: SeriesSummary, calling_ae: str, default_min: int
) -> str | None:
    """Why ``rule`` does not match the series (the first failing condition), else None."""
    key = f"rules.{index}"
    if rule.calling_ae_titles is not None and calling_ae not in rule.calling_ae_titles:
        return f"calling AE title {calling_ae!r} is not in {key}.calling_ae_titles"
    if rule.series_description is not None and not re.search(
        rule.series_description, series.series_description
    ):
        return f"SeriesDescription does not match {key}.series_description"
    if rule.convolution_kernel is not None and not re.search(
        rule.convolution_kernel, series.convolution_kernel or ""
    ):
        return f"ConvolutionKernel does not match {key}.convolution_kernel"
    thickness = series.slice_thickness
    if rule.slice_thickness_min is not None or rule.slice_thickness_max is not None:
        if thickness is None:
            return f"SliceThickness is missing; {key} needs it"
        if rule.slice_thickness_min is not None and thickness < rule.slice_thickness_min:
            return f"SliceThickness {thickness} mm is below {key}.slice_thickness_min"
        if rule.slice_thickness_max is not None and thickness > rule.slice_thickness_max:
            return f"SliceThickness {thickness} mm is above {key}.slice_thickness_max"
    if rule.ctdi_vol_max is not None:
        if series.ctdi_vol is None:
            return f"CTDIvol is missing; {key}.ctdi_vol_max needs it"
        if series.ctdi_vol > rule.ctdi_vol_max:
            return (
                f"CTDIvol {series.ctdi_vol:.2f} mGy is above {key}.ctdi_vol_max "
                f"({rule.ctdi_vol_max} mGy)"
            )
    if rule.min_slices is not None:
        return _too_few_slices(series, rule.min_slices, f"{key}.min_slices")
    if rule.action == "denoise":
        return _too_few_slices(series, default_min, "min_slices")
    return None


def _skip(rule: str, reason: str) -> Decision:
    return Decision(rule=rule, strength=0.0, destinations=[], skip_reason=reason)


def _distinct(values: Any) -> list[str]:
    return sorted(set(values))


def _first(headers: list[dict[str, Any]], key: str) -> Any:
    return next((h[key] for h in headers if h.get(key) is not None), None)
