"""Series selection: the default rule, configured rules, and the guards no rule can lift."""

from __future__ import annotations

from typing import Any

import pytest

from node.config import Rule, Settings
from node.rules import Decision, select_series


def settings(**values: Any) -> Settings:
    destinations = {
        "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
        "research": {"ae_title": "RESEARCH", "host": "127.0.0.1", "port": 4243},
    }
    return Settings(**{"destinations": destinations, "strength": 0.8, **values})


def headers(count: int = 12, **values: Any) -> list[dict[str, Any]]:
    """Per-instance headers as the receiver records them, for one axial CT series."""
    base = {
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "Modality": "CT",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SeriesDescription": "Chest low dose",
        "ConvolutionKernel": "B30f",
        "SliceThickness": 1.0,
        "CTDIvol": 2.5,
        "Rows": 512,
        "Columns": 512,
        "NumberOfFrames": 1,
        "NodeOutput": False,
    }
    return [{**base, "InstanceNumber": i + 1, **values} for i in range(count)]


def test_default_denoises_an_original_axial_ct_series_to_every_destination() -> None:
    decision = select_series(settings(), headers(), "SCANNER")
    assert decision == Decision("default", 0.8, ["pacs", "research"], None)


def test_default_skips_too_few_slices_with_a_readable_reason() -> None:
    decision = select_series(settings(), headers(3), "SCANNER")
    assert decision.skip_reason == "only 3 slices; the minimum is 10 (min_slices)"
    assert decision.destinations == []


def test_enhanced_ct_counts_frames_as_slices() -> None:
    one = headers(1, SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1", NumberOfFrames=40)
    assert select_series(settings(), one, "SCANNER").skip_reason is None


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"Modality": "MR"}, "Modality is MR, not CT"),
        (
            {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
            "ImageType is ORIGINAL\\PRIMARY\\LOCALIZER: a localizer is not denoised",
        ),
        ({"ImageType": []}, "ImageType is (none), not ORIGINAL"),
    ],
)
def test_default_skips_what_is_not_an_original_ct(values: dict[str, Any], reason: str) -> None:
    assert select_series(settings(), headers(**values), "SCANNER").skip_reason == reason


def test_one_localizer_in_a_series_skips_the_series() -> None:
    mixed = headers(11) + headers(1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert "localizer" in (select_series(settings(), mixed, "SCANNER").skip_reason or "")


@pytest.mark.parametrize("with_rules", [False, True])
def test_derived_is_always_skipped_even_when_a_rule_matches_everything(with_rules: bool) -> None:
    rules = [Rule(name="everything", min_slices=1)] if with_rules else []
    derived = headers(ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    decision = select_series(settings(rules=rules), derived, "PACS")
    assert decision.rule == "derived"
    assert decision.skip_reason == (
        "ImageType is DERIVED\\SECONDARY\\AXIAL; derived images are never denoised again"
    )


def test_node_output_is_skipped_even_if_it_claims_to_be_original() -> None:
    ours = headers(NodeOutput=True)
    decision = select_series(settings(rules=[Rule(name="everything")]), ours, "PACS")
    assert decision.skip_reason is not None
    assert "never processes its own output" in decision.skip_reason


def test_first_matching_rule_decides_strength_and_destinations() -> None:
    rules = [
        Rule(name="other-scanner", calling_ae_titles=["CT2"], strength=0.3),
        Rule(name="chest", series_description="(?i)chest", strength=0.5, destinations=["pacs"]),
        Rule(name="everything", strength=1.0),
    ]
    decision = select_series(settings(rules=rules), headers(), "SCANNER")
    assert decision == Decision("chest", 0.5, ["pacs"], None)
    decision = select_series(settings(rules=rules), headers(), "CT2")
    assert decision == Decision("other-scanner", 0.3, ["pacs", "research"], None)


def test_rule_without_strength_uses_the_configured_strength() -> None:
    decision = select_series(settings(rules=[Rule(name="all")]), headers(), "SCANNER")
    assert decision == Decision("all", 0.8, ["pacs", "research"], None)


def test_skip_rule_makes_a_skipped_job() -> None:
    rules = [Rule(name="no-sharp-kernels", action="skip", convolution_kernel="B70")]
    decision = select_series(settings(rules=rules), headers(ConvolutionKernel="B70f"), "X")
    assert decision.rule == "no-sharp-kernels"
    assert decision.skip_reason == "rule 'no-sharp-kernels' says skip"


def test_no_matching_rule_is_skipped_and_says_why_each_rule_failed() -> None:
    rules = [
        Rule(name="thin", slice_thickness_max=0.75),
        Rule(name="low-dose", ctdi_vol_max=2.0),
        Rule(name="head", series_description="HEAD"),
    ]
    decision = select_series(settings(rules=rules), headers(), "SCANNER")
    assert decision.rule == "none"
    assert decision.skip_reason == (
        "no rule matches: rule 'thin': SliceThickness 1.0 mm is above "
        "rules.0.slice_thickness_max; rule 'low-dose': CTDIvol 2.50 mGy is above "
        "rules.1.ctdi_vol_max (2.0 mGy); rule 'head': SeriesDescription does not match "
        "rules.2.series_description"
    )


def test_dose_rule_does_not_match_a_series_without_ctdi_vol() -> None:
    rules = [Rule(name="low-dose", ctdi_vol_max=5.0)]
    without = [{k: v for k, v in h.items() if k != "CTDIvol"} for h in headers()]
    assert select_series(settings(rules=rules), headers(), "S").skip_reason is None
    reason = select_series(settings(rules=rules), without, "S").skip_reason
    assert reason == (
        "no rule matches: rule 'low-dose': CTDIvol is missing; rules.0.ctdi_vol_max needs it"
    )


def test_rule_min_slices_overrides_the_global_minimum() -> None:
    rules = [Rule(name="short-scans", min_slices=3)]
    assert select_series(settings(rules=rules), headers(3), "S").rule == "short-scans"
    assert select_series(settings(rules=rules), headers(2), "S").skip_reason == (
        "no rule matches: rule 'short-scans': only 2 slices; the minimum is 3 (rules.0.min_slices)"
    )
    plain = [Rule(name="plain")]
    assert select_series(settings(rules=plain), headers(3), "S").skip_reason == (
        "no rule matches: rule 'plain': only 3 slices; the minimum is 10 (min_slices)"
    )


def test_empty_series_is_skipped() -> None:
    assert select_series(settings(), [], "S").skip_reason == "the series has no instances"


def test_a_free_text_header_value_never_reaches_the_skip_reason() -> None:
    """ConvolutionKernel is free text (SH): a name put there must not reach the job or log."""
    rules = [Rule(name="soft", convolution_kernel="^B30")]
    decision = select_series(
        settings(rules=rules), headers(ConvolutionKernel="DOE^JANE"), "SCANNER"
    )
    assert decision.skip_reason == (
        "no rule matches: rule 'soft': ConvolutionKernel does not match rules.0.convolution_kernel"
    )
