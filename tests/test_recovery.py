"""``node.recovery`` on a real job table: which received spool files a start records again."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

import node.forget
from devtools.phantom import PhantomSpec, write_phantom_series
from node.context import NodeContext
from node.db import utcnow
from node.housekeeping import purge_spool
from node.overview import ActionRefused
from node.recovery import rerecord_unrecorded
from tests.fixtures.jobs import settle_series
from tests.test_receiver import make_context


@pytest.fixture
def ctx(db_url: str, tmp_path: Path) -> Iterator[NodeContext]:
    context = make_context(db_url, tmp_path)
    yield context
    context.close()


def put(ctx: NodeContext, source: Path, day: str) -> str:
    """``source`` as if received on ``day`` (a date folder of ``incoming``) with no row."""
    folder = ctx.spool.root / "incoming" / day
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / f"{source.stem}.dcm")
    return str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)


def recorded(ctx: NodeContext, series_uid: str) -> set[str]:
    return {i.sop_instance_uid for i in ctx.queries.series_instances(series_uid)}


def test_the_walk_stops_after_two_whole_date_folders(ctx: NodeContext, tmp_path: Path) -> None:
    paths = write_phantom_series(tmp_path / "series", PhantomSpec(slices=4, size=64, seed=5))
    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    second, third = put(ctx, paths[1], "20260102"), put(ctx, paths[2], "20260103")
    assert rerecord_unrecorded(ctx) == 2
    assert recorded(ctx, series_uid) == {second, third}
    assert rerecord_unrecorded(ctx) == 0, "a file with a row is never recorded twice"

    # Newest first: 20260104 has a file to record, 20260103 and 20260102 are whole, so the
    # older 20260101 (whose commits cannot be the lost tail) is not listed at all.
    oldest, newest = put(ctx, paths[0], "20260101"), put(ctx, paths[3], "20260104")
    assert rerecord_unrecorded(ctx) == 1
    assert recorded(ctx, series_uid) == {second, third, newest}
    assert oldest not in recorded(ctx, series_uid)
    (series,) = ctx.queries.settled_series(utcnow() + timedelta(days=1))
    assert (series.series_instance_uid, series.instance_count) == (series_uid, 3)


def test_a_forget_cut_short_leaves_its_files_to_housekeeping_not_to_recovery(
    ctx: NodeContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows of a forgotten series are gone and the process dies before its files are:
    the next start must not record the series again (the administrator asked for it to be
    gone), and housekeeping removes the files."""
    paths = write_phantom_series(tmp_path / "series", PhantomSpec(slices=3, size=64, seed=6))
    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    for path in paths:
        put(ctx, path, "20260105")
    assert rerecord_unrecorded(ctx) == 3
    job_id = settle_series(ctx.manager, ctx.queries, series_uid, skip="too few slices")

    def crash(_ctx: NodeContext, _paths: list[str]) -> int:
        raise SystemExit("killed between the rows and the files")

    monkeypatch.setattr(node.forget, "remove_forgotten", crash)
    with pytest.raises(SystemExit):
        node.forget.forget(ctx, job_id, "test")
    spooled = sorted((ctx.spool.root / "incoming" / "20260105").glob("*.dcm"))
    assert len(spooled) == 3 and recorded(ctx, series_uid) == set()

    assert rerecord_unrecorded(ctx) == 0, "a forgotten series is not recorded again"
    ctx.settings = ctx.settings.model_copy(update={"unrecorded_grace_seconds": 1e-3})
    assert purge_spool(ctx, ctx.settings.retention_days, "test").orphan_files == 3
    assert not any(path.exists() for path in spooled)
    assert not list(ctx.spool.root.rglob("*.unrecorded")), "the marks go too"


def test_a_forget_that_cannot_mark_its_files_forgets_nothing(
    ctx: NodeContext, tmp_path: Path
) -> None:
    paths = write_phantom_series(tmp_path / "series", PhantomSpec(slices=3, size=64, seed=8))
    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    uids = {put(ctx, path, "20260106") for path in paths}
    assert rerecord_unrecorded(ctx) == 3
    job_id = settle_series(ctx.manager, ctx.queries, series_uid, skip="too few slices")
    (ctx.spool.root / "unrecorded").write_bytes(b"")  # the marks' folder cannot be made

    with pytest.raises(ActionRefused, match="could not be marked first"):
        node.forget.forget(ctx, job_id, "test")

    assert recorded(ctx, series_uid) == uids
    assert ctx.queries.get_job(job_id).id == job_id
    assert len(list((ctx.spool.root / "incoming" / "20260106").glob("*.dcm"))) == 3
