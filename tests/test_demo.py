"""``denoise-node demo --keep``: its option and what it prints, without running the demo.

The whole demo takes minutes (it simulates a low-dose series and runs the shipped CNN);
these tests check the parts that ``--keep`` adds against a real Orthanc.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pydicom
import pytest

from devtools.demo import DemoError, cmd_demo, store, viewer_addresses, viewer_plugins
from devtools.orthanc import WEB_VIEWER_PLUGIN, OrthancServer
from devtools.phantom import PhantomSpec, write_phantom_series
from node.cli import build_parser

ADDRESS = re.compile(r"^  (input|denoised)\s+(\S+)$", re.MULTILINE)


def test_keep_is_off_unless_asked_and_only_then_loads_the_viewer() -> None:
    plain = build_parser().parse_args(["demo"])
    kept = build_parser().parse_args(["demo", "--keep", "--dose", "0.5"])
    assert plain.func is cmd_demo and kept.func is cmd_demo
    assert plain.keep is False and kept.keep is True and kept.dose == 0.5
    assert viewer_plugins(False) == ()
    if WEB_VIEWER_PLUGIN.is_file():
        assert viewer_plugins(True) == (WEB_VIEWER_PLUGIN,)


def two_series(tmp_path: Path, orthanc: OrthancServer) -> tuple[str, str]:
    """An input and a stand-in derived series of one study, stored in Orthanc by ``store``."""
    uids = []
    for description in ("Head low dose", "Head low dose [denoised]"):
        spec = PhantomSpec(slices=3, size=64, seed=4, series_description=description)
        paths = write_phantom_series(tmp_path / description, spec)
        store(paths, orthanc.ae_title, orthanc.dicom_port)
        uids.append(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    return uids[0], uids[1]


def test_keep_prints_web_viewer_addresses_of_both_series(
    web_viewer_orthanc: OrthancServer, tmp_path: Path
) -> None:
    orthanc = web_viewer_orthanc
    source_uid, derived_uid = two_series(tmp_path, orthanc)
    printed = dict(ADDRESS.findall(viewer_addresses(orthanc, source_uid, derived_uid)))
    assert printed.keys() == {"input", "denoised"}
    for label, series_uid in (("input", source_uid), ("denoised", derived_uid)):
        address = printed[label]
        assert address.startswith(f"{orthanc.url}/web-viewer/app/viewer.html?series=")
        series_id = address.rsplit("=", 1)[1]
        tags = orthanc.get(f"/series/{series_id}")["MainDicomTags"]
        assert tags["SeriesInstanceUID"] == series_uid
        assert len(orthanc.get(f"/web-viewer/series/{series_id}")["Slices"]) == 3
        with urllib.request.urlopen(address, timeout=10) as page:
            assert b"Orthanc Web Viewer" in page.read()


def test_without_the_plugin_the_addresses_are_the_explorers(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    source_uid, derived_uid = two_series(tmp_path, orthanc)
    text = viewer_addresses(orthanc, source_uid, derived_uid)
    printed = dict(ADDRESS.findall(text))
    assert all(a.startswith(f"{orthanc.explorer_url}#series?uuid=") for a in printed.values())
    assert "apt-get install orthanc-webviewer" in text
    with pytest.raises(DemoError, match="does not hold the denoised series"):
        viewer_addresses(orthanc, source_uid, "1.2.3.4")
