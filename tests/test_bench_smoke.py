"""Smoke test of bench/: each benchmark's --quick mode runs and prints its table with numbers.

The figures themselves are not checked (targets are for people, not for CI); the tiny
mean-filter model stands in for the CNN and the phantoms go to a temporary cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

from bench import (
    common,
    end_to_end,
    inference,
    ingest,
    model_speed,
    receiver_costs,
    scale_out,
    send,
    stow,
)

pytestmark = pytest.mark.slow  # each case runs a benchmark's quick mode: 10-20 s

TABLE_RULE = re.compile(r"^\|(-+\|)+$", re.MULTILINE)
NUMBER_ROW = re.compile(r"^\| .*\b\d+(\.\d+)? .*\|$", re.MULTILINE)


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.mark.parametrize(
    ("module", "takes_model"),
    [
        pytest.param(ingest, False, marks=pytest.mark.postgres, id="ingest"),
        pytest.param(inference, True, id="inference"),
        pytest.param(receiver_costs, False, id="receiver_costs"),
        pytest.param(model_speed, True, id="model_speed"),
        pytest.param(end_to_end, True, id="end_to_end"),
        pytest.param(scale_out, True, marks=pytest.mark.postgres, id="scale_out"),
        pytest.param(send, False, id="send"),
        pytest.param(stow, False, id="stow"),
    ],
)
def test_quick_run_prints_a_table_of_numbers(
    module: ModuleType,
    takes_model: bool,
    tiny_model: Path,
    bench_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(common, "CACHE", bench_cache)
    argv = ["--quick", *(["--model", str(tiny_model)] if takes_model else [])]

    status = module.main(argv)

    out = capsys.readouterr().out
    assert status == 0, out
    assert TABLE_RULE.search(out), out
    assert NUMBER_ROW.search(out), out
    assert "load average" in out
