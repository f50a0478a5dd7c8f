"""The target check scores the full-dose reference beside the model."""

from __future__ import annotations

from models.evaluate.methods import IDEAL, REFERENCE
from models.evaluate.report import check_targets, markdown


def _figures(
    noise_pct: float, nps_pct: float, dprime: float, psnr: float, noise_nps_pct: float = 0.0
) -> dict[str, float]:
    return {
        "psnr_db": psnr,
        "ssim": 0.9,
        "noise_reduction_pct": noise_pct,
        "hu_bias": 0.1,
        "mtf50_vs_full_pct": 0.0,
        "nps_peak_shift_pct": nps_pct,
        "nps_noise_shift_pct": noise_nps_pct,
        "cho_dprime": dprime,
        "cho_dprime_se": 0.2,
    }


def _results() -> dict:
    rows = {
        "input": _figures(0.0, 0.0, 4.0, 27.0),
        "BM3D (sigma 7.0 HU)": _figures(30.0, -5.0, 4.0, 28.0),
        "model s=1": _figures(52.0, -30.0, 3.8, 29.5, noise_nps_pct=-12.0),
        REFERENCE: {
            k: v
            for k, v in _figures(46.0, -23.0, 0.0, float("inf")).items()
            if "cho" not in k and "noise_shift" not in k
        },
        IDEAL: {"psnr_db": 28.6, "ssim": 0.95, "rmse_hu": 2.0},
    }
    return {
        "model": "m.onnx",
        "setup": "",
        "cases": {"head": {"window": (80, 40), "slices": 6}},
        "series": {"head": {"25%": rows, "full dose": {"model s=1": {"rmse_hu": 2.0}}}},
    }


def test_the_reference_gets_its_own_verdict_per_target() -> None:
    lines = {
        target.split(" (")[0]: (verdict, ref, ideal)
        for _, target, verdict, ref, ideal in check_targets(_results())
    }
    assert lines["noise reduction >= 50 %"] == ("PASS", "MISS (46.0 %)", "n/a")
    # texture is judged on the noise alone; the reference has none of its own
    assert lines["abs(NPS peak shift) < 20 %, noise alone"] == ("PASS", "n/a", "n/a")
    assert lines["CHO d' not below the input's"] == ("MISS", "n/a", "n/a")
    # the ideal denoiser is scored on its distances to the reference only
    assert lines["PSNR >= BM3D + 1 dB"] == (
        "PASS",
        "PASS (inf vs 28.00 dB)",
        "MISS (28.60 vs 28.00 dB)",
    )
    # SSIM: BM3D (0.9) plus half its gap to the ideal (0.95)
    target = "SSIM >= BM3D + half the gap to the ideal"
    assert lines[target][0] == "MISS"
    assert lines[target][2] == "PASS (0.9500 vs 0.9250; BM3D 0.9000, ideal 0.9500)"


def test_the_ssim_target_is_compared_to_four_decimals() -> None:
    results = _results()
    rows = results["series"]["head"]["25%"]
    rows["model s=1"]["ssim"] = 0.92496  # 0.9250 to four decimals
    verdicts = {t.split(" (")[0]: v for _, t, v, _, _ in check_targets(results)}
    assert verdicts["SSIM >= BM3D + half the gap to the ideal"] == "PASS"
    rows["model s=1"]["ssim"] = 0.92494
    verdicts = {t.split(" (")[0]: v for _, t, v, _, _ in check_targets(results)}
    assert verdicts["SSIM >= BM3D + half the gap to the ideal"] == "MISS"


def test_the_report_shows_the_reference_column() -> None:
    results = _results()
    results["targets"] = check_targets(results)
    report = markdown(results)
    assert "| full dose itself | ideal denoiser |" in report
    assert "| head | noise reduction >= 50 % (52.0 %) | PASS | MISS (46.0 %) | n/a |" in report
    assert (
        "| head | abs(NPS peak shift) < 20 %, noise alone (-12.0 %; single image, anatomy "
        "included: -30.0 %) | PASS | n/a | n/a |"
    ) in report
    assert f"| {REFERENCE} | inf |" in report


def test_the_report_shows_the_grain_size_check() -> None:
    results = _results() | {"targets": [], "grain": {"head": {"0.7": 36.3, "1": 53.9, "1.4": 15.0}}}
    report = markdown(results)
    assert "| series | x0.7 noise -% | x1 noise -% | x1.4 noise -% |" in report
    assert "| head | 36.3 | 53.9 | 15.0 |" in report
    assert "Grain size" not in markdown(_results() | {"targets": []})
