"""``denoise-node jobs|status|purge|web`` against real jobs and spool files (both databases)."""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from devtools.node_process import write_config
from devtools.records import instance_record
from devtools.tools import free_port
from node.admin import parse_since
from node.cli import main
from node.db import utcnow
from node.web.auth import verify_password
from node.web.preview import preview_png
from tests.fixtures.admin import AdminNode


def run(node: AdminNode, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(node.config), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files(node: AdminNode, job_id: int, derived: bool) -> list[Path]:
    queries = node.ctx.queries
    if derived:
        paths = [d.spool_path for d in queries.derived_instances(job_id)]
    else:
        series = queries.get_job(job_id).series_instance_uid
        paths = [i.spool_path for i in queries.series_instances(series)]
    return [node.ctx.spool.path(p) for p in paths]


def test_jobs_list_fits_a_terminal_and_filters(admin_node: AdminNode, capsys) -> None:
    jobs = admin_node.jobs
    code, out, _ = run(admin_node, capsys, "jobs", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["ID", "STATE", "PRIO", "CREATED"]
    assert max(len(line) for line in lines) <= 100
    assert [int(line.split()[0]) for line in lines[1:]] == sorted(jobs.values(), reverse=True)
    assert "model output has NaN values" in out and "SeriesDescription LOCALIZER" in out

    _, out, _ = run(admin_node, capsys, "jobs", "list", "--state", "failed,skipped", "--json")
    assert {job["id"] for job in json.loads(out)} == {jobs["failed"], jobs["skipped"]}
    _, out, _ = run(admin_node, capsys, "jobs", "list", "--ae", "CT2", "--since", "1h", "--json")
    assert [job["id"] for job in json.loads(out)] == [jobs["failed"]]
    study = admin_node.ctx.queries.get_job(jobs["done"]).study_instance_uid
    _, out, _ = run(admin_node, capsys, "jobs", "list", "--study", study, "--json")
    assert [job["id"] for job in json.loads(out)] == [jobs["done"]]
    _, out, _ = run(admin_node, capsys, "jobs", "list", "--since", "2999-01-01")
    assert out.strip() == "no jobs"


def test_jobs_show_has_timeline_counts_and_error(admin_node: AdminNode, capsys) -> None:
    code, out, _ = run(admin_node, capsys, "jobs", "show", str(admin_node.jobs["done"]))
    assert code == 0
    assert "received 5 (settled 5), denoised 5, sent pacs 5/5" in out
    assert out.index("→ queued") < out.index("→ running") < out.index("→ done")
    assert "Model      tiny-mean 0.0.1" in out
    assert re.search(
        r"^Noise      [\d.]+ -> [\d.]+ HU in flat soft tissue \(\d+% less, 5 of 5 slices", out, re.M
    )
    _, out, _ = run(admin_node, capsys, "jobs", "show", str(admin_node.jobs["failed"]))
    assert "Error      model output has NaN values" in out
    assert "Noise      not measured" in out
    _, out, _ = run(admin_node, capsys, "jobs", "show", str(admin_node.jobs["done"]), "--json")
    shown = json.loads(out)
    assert shown["sent"] == {"pacs": 5}
    assert shown["noise_slices"] == 5 and 0 < shown["noise_drop"] < 1
    code, _, err = run(admin_node, capsys, "jobs", "show", "999999")
    assert code == 1 and "job 999999 does not exist" in err


def test_retry_cancel_resend(admin_node: AdminNode, capsys) -> None:
    jobs, ctx = admin_node.jobs, admin_node.ctx
    code, out, _ = run(admin_node, capsys, "jobs", "retry", str(jobs["failed"]))
    assert code == 0 and out.strip() == f"job {jobs['failed']}: retry done, now queued"
    assert ctx.queries.job_events(jobs["failed"])[-1].actor.startswith("cli:")

    code, out, _ = run(admin_node, capsys, "jobs", "cancel", str(jobs["queued"]), "--json")
    assert code == 0 and json.loads(out)["state"] == "cancelled"
    code, _, err = run(admin_node, capsys, "jobs", "cancel", str(jobs["done"]))
    assert code == 1 and "cannot cancel" in err

    code, _, err = run(admin_node, capsys, "jobs", "resend", str(jobs["done"]), "--to", "nowhere")
    assert code == 1
    assert "unknown destination 'nowhere'; configured destinations: pacs" in err
    assert ctx.queries.get_job(jobs["done"]).state == "done"
    code, out, _ = run(admin_node, capsys, "jobs", "resend", str(jobs["done"]), "--to", "pacs")
    assert code == 0 and "now sending" in out
    assert ctx.queries.delivery_counts(jobs["done"]) == {}


def test_status_echoes_destinations(admin_node: AdminNode, capsys, tmp_path: Path) -> None:
    code, out, _ = run(admin_node, capsys, "status")
    assert code == 0
    assert "queued 1" in out and "failed 1" in out
    assert "ok   pacs: PACS@127.0.0.1" in out and "C-ECHO ok" in out
    assert "gpu-host:4242" in out and "CPUExecutionProvider" in out
    assert "free of" in out
    _, out, _ = run(admin_node, capsys, "status", "--json")
    assert json.loads(out)["destinations"][0]["reachable"] is True

    config = tmp_path / "offline.toml"
    config.write_text(
        admin_node.config.read_text()
        + f'\n[destinations.offline]\nae_title = "GONE"\nhost = "127.0.0.1"\nport = {free_port()}\n'
    )
    code = main(["--config", str(config), "status"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL offline: GONE@127.0.0.1" in out


def test_purge_removes_only_files_of_long_finished_jobs(admin_node: AdminNode, capsys) -> None:
    jobs, ctx = admin_node.jobs, admin_node.ctx
    done_derived = files(admin_node, jobs["done"], derived=True)
    queued_sources = files(admin_node, jobs["queued"], derived=False)
    failed_sources = files(admin_node, jobs["failed"], derived=False)
    done_sources = files(admin_node, jobs["done"], derived=False)
    # A late instance of the done job's series: it will settle into a new job, so the
    # series' received files must stay although its first job is long finished.
    late = dcmread(done_sources[0], stop_before_pixels=True)
    ctx.manager.record_instance(
        instance_record(
            generate_uid(),
            late.SeriesInstanceUID,
            study_instance_uid=late.StudyInstanceUID,
            transfer_syntax_uid=late.file_meta.TransferSyntaxUID,
            spool_path=str(done_sources[0].relative_to(admin_node.ctx.spool.root)),
            sha256="f" * 64,
            size_bytes=1,
        )
    )

    previews = preview_png(admin_node.ctx, jobs["done"], "soft").parent
    code, out, _ = run(admin_node, capsys, "purge", "--older-than", "1")
    assert code == 0 and out.startswith("0 finished jobs")
    _, out, _ = run(admin_node, capsys, "purge", "--older-than", "0", "--dry-run")
    assert out.startswith("3 finished jobs older than 0 days: would remove 5 derived")
    assert all(path.exists() for path in done_derived + failed_sources)

    _, out, _ = run(admin_node, capsys, "purge", "--older-than", "0", "--json")
    report = json.loads(out)
    assert report["jobs"] == [jobs["done"], jobs["failed"], jobs["skipped"]]
    assert report["derived_files"] == 5 and report["received_files"] == 10
    assert not any(path.exists() for path in done_derived + failed_sources)
    assert all(path.exists() for path in queued_sources + done_sources)
    assert not previews.exists(), "previews show patient images: they go with the spool"
    assert (
        "spool purged: 5 derived and 0 received files"
        in ctx.queries.job_events(jobs["done"])[-1].message
    )

    _, out, _ = run(admin_node, capsys, "purge", "--older-than", "0")
    assert out.startswith("0 finished jobs"), "a purged job is purged once"
    code, _, err = run(admin_node, capsys, "jobs", "retry", str(jobs["failed"]))
    assert code == 1 and "no longer in the spool" in err
    code, _, err = run(admin_node, capsys, "jobs", "resend", str(jobs["done"]), "--to", "pacs")
    assert code == 1 and "5 of 5 derived files are no longer in the spool" in err


def test_hash_password_reads_stdin(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("a long password\n"))
    assert main(["web", "hash-password"]) == 0
    assert verify_password("a long password", capsys.readouterr().out.strip())
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["web", "hash-password"]) == 1


def test_parse_since() -> None:
    assert abs((utcnow() - parse_since("2h")).total_seconds() - 7200) < 5
    assert parse_since("2026-01-02T03:04:05+01:00").hour == 2
    assert parse_since("2026-01-02").day == 2
    with pytest.raises(argparse.ArgumentTypeError, match="neither an age"):
        parse_since("yesterday")


def test_unknown_state_is_a_usage_error(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "node.toml", {"state_dir": str(tmp_path)})
    with pytest.raises(SystemExit):
        main(["--config", str(config), "jobs", "list", "--state", "finished"])
    assert "unknown state(s) finished" in capsys.readouterr().err
