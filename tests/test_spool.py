"""Spool writes: whole file under the final name, or nothing at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.spool import TMP_SUFFIX, Spool


def test_write_runs_the_side_work_while_syncing_and_keeps_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    seen: list[bool] = []

    def side_work() -> None:  # the receiver reads the header here
        seen.append(any(spool.root.rglob(f"*{TMP_SUFFIX}")))

    path = spool.write_atomic("incoming/a/1.dcm", lambda out: out.write(b"instance"), side_work)
    assert seen == [True], "side work runs while the file is still temporary"
    assert path.read_bytes() == b"instance"
    assert not list(spool.root.rglob(f"*{TMP_SUFFIX}"))


def test_failing_side_work_leaves_no_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    def refuse() -> None:
        raise ValueError("header cannot be decoded")

    with pytest.raises(ValueError, match="cannot be decoded"):
        spool.write_atomic("incoming/a/1.dcm", lambda out: out.write(b"bad"), refuse)
    assert [p for p in spool.root.rglob("*") if p.is_file()] == []
