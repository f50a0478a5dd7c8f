"""``node.recovery`` on a real job table: which received spool files a start records again."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

from devtools.phantom import PhantomSpec, write_phantom_series
from node.context import NodeContext
from node.db import utcnow
from node.recovery import rerecord_unrecorded
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
