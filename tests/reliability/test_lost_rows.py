"""A power loss may take the job table's last commits (SQLite in WAL mode with
``synchronous=NORMAL``) but not the acknowledged instances: they were fsynced in the spool
first.  The lost tail is simulated by deleting rows after the node stopped; the restart
must record the files again and settle their series into a job (``node.recovery``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from devtools.node_process import NodeProcess
from devtools.phantom import PhantomSpec, write_phantom_series
from node.jobs.tables import Instance, Series
from tests.fixtures.dicom import storescu
from tests.reliability.checks import assert_in_spool, count_instances, series_jobs, series_uid

SLICES = 12
LOST_TAIL = 5


def lose_rows(node: NodeProcess, uid: str, lost: str) -> None:
    """What a lost tail of commits leaves: the last instances' rows gone and the series'
    count back where it was, or (``series``) every row of the series gone."""
    with node.manager._sessions.begin() as session:
        if lost == "series":
            session.execute(delete(Instance).where(Instance.series_instance_uid == uid))
            session.execute(delete(Series).where(Series.series_instance_uid == uid))
            return
        newest = session.scalars(
            select(Instance.id).order_by(Instance.id.desc()).limit(LOST_TAIL)
        ).all()
        session.execute(delete(Instance).where(Instance.id.in_(newest)))
        session.execute(
            update(Series)
            .where(Series.series_instance_uid == uid)
            .values(instance_count=Series.instance_count - LOST_TAIL)
        )


@pytest.mark.parametrize("lost", ["tail", "series"])
def test_restart_records_again_the_instances_whose_rows_were_lost(
    node_factory, tmp_path: Path, lost: str
) -> None:
    paths = write_phantom_series(
        tmp_path / "series",
        PhantomSpec(slices=SLICES, size=128, seed=31, series_description="Lost rows"),
    )
    uid = series_uid(paths[0])
    # A settle time longer than the test: no job exists when the rows are lost.
    first = node_factory(roles="receive", settle_seconds=3600.0).start()
    assert storescu(first.port, paths, calling_ae="SCANNER") == [0] * SLICES
    assert first.stop() == 0
    spool = first.state_dir / "spool"
    received = sorted((spool / "incoming").rglob("*.dcm"))
    assert len(received) == SLICES
    # A duplicate whose removal was cut short, and a file that never was a data set.
    duplicate = received[0].with_name("duplicate.dcm")
    shutil.copyfile(received[0], duplicate)
    junk = received[0].with_name("junk.dcm")
    junk.write_bytes(b"not a DICOM file")
    lose_rows(first, uid, lost)
    assert count_instances(first) == (0 if lost == "series" else SLICES - LOST_TAIL)

    second = node_factory(roles="receive", settle_seconds=0.5).start()
    second.wait_for(lambda: bool(series_jobs(second, uid)), 60, "a job for the series")
    (job,) = series_jobs(second, uid)
    assert job.instance_count == SLICES
    assert_in_spool(second, paths)
    kept = [path for path in (spool / "incoming").rglob("*.dcm") if path != junk]
    assert len(kept) == SLICES, "one of the duplicate's two copies is removed"
    assert junk.exists(), "a file that fails the checks is left for housekeeping's orphans"
    assert f"{SLICES - (0 if lost == 'series' else SLICES - LOST_TAIL)} received" in (
        second.log_text()
    )
    # The series' sender is kept where any of its rows survived; the file does not say it.
    assert job.calling_ae_title == ("" if lost == "series" else "SCANNER")
