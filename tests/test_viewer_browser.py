"""The derived series as a radiologist sees it: Orthanc Explorer and the Orthanc Web Viewer
(Debian's orthanc-webviewer) in Debian's headless Chromium.

The scanner sends a phantom series to the PACS (Orthanc) and to the node (a real
``denoise-node serve`` process with the tiny mean-filter model); the node sends the
derived series back to the PACS.  The test opens the study in Orthanc Explorer, opens each
series in the web viewer from the explorer's own button, scrolls both to the same slice
and reads the pixels the viewer drew, in its default quality (8-bit JPEG) and lossless.
The side-by-side screenshot goes to the test's folder (printed);
``DENOISE_NODE_SCREENSHOTS=docs`` also writes ``docs/viewer.png``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from devtools.databases import temporary_database
from devtools.node_process import NodeProcess
from devtools.orthanc import OrthancServer
from devtools.phantom import PhantomSpec, uniform_roi, write_phantom_series
from node.jobs import JobState
from tests.fixtures.browser import save_png
from tests.fixtures.dicom import storescu

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

SLICES = 12
SPEC = PhantomSpec(slices=SLICES, size=256, noise_hu=40.0, seed=21)
SUFFIX = " [denoised]"
VIEWPORT = {"width": 680, "height": 680}
SCREENSHOTS = os.environ.get("DENOISE_NODE_SCREENSHOTS")
#: Water (0 HU) in the phantom's window (centre 40, width 400), as an 8-bit gray level.
WATER_GRAY = (0 - (40 - 400 / 2)) / 400 * 255
IMAGE_SHOWN = """([imageId, compression]) => {
    try {
        const image = cornerstone.getEnabledElement(document.getElementById('dicomImage')).image;
        return image !== undefined && (imageId === null || image.imageId === imageId)
            && (compression === null || image.Orthanc.Compression === compression);
    } catch (error) {
        return false;
    }
}"""
#: The viewer's default quality sends each slice as an 8-bit JPEG (95 %) of the slice's
#: whole range; its toolbar's "Best quality (lossless)" sends the stored values (deflate).
QUALITIES = {"default (JPEG 95 %)": "Jpeg", "lossless": "Deflate"}
#: The gray levels the viewer drew for an image region (cornerstone maps image pixels to
#: canvas pixels; the rendered canvas is what the radiologist sees).
REGION_GRAYS = """async ([top, left, bottom, right]) => {
    await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
    const element = document.getElementById('dicomImage');
    const start = cornerstone.pixelToCanvas(element, {x: left, y: top});
    const end = cornerstone.pixelToCanvas(element, {x: right, y: bottom});
    const x = Math.ceil(start.x), y = Math.ceil(start.y);
    const width = Math.floor(end.x) - x, height = Math.floor(end.y) - y;
    const canvas = element.querySelector('canvas');
    const data = canvas.getContext('2d').getImageData(x, y, width, height).data;
    const grays = [];
    for (let i = 0; i < data.length; i += 4) grays.push(data[i]);
    return grays;
}"""


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: this test is about what the PACS shows, not about the job table."""
    with temporary_database("sqlite", tmp_path) as url:
        yield url


class Viewer:
    """One Orthanc Web Viewer tab, with every alert it raised (the viewer's error path)."""

    def __init__(self, page: sync_api.Page) -> None:
        self.page = page
        self.alerts: list[str] = []
        page.on("dialog", self._dismiss)
        page.set_default_timeout(20_000)

    def _dismiss(self, dialog: sync_api.Dialog) -> None:
        self.alerts.append(dialog.message)
        dialog.dismiss()

    def slice_count(self) -> int:
        """Slices the viewer's slider offers."""
        return int(self.page.evaluate("$('#slider').slider('option', 'max')")) + 1

    def scroll_to(self, index: int, image_id: str, compression: str) -> None:
        """Page with the mouse wheel over the image, as a radiologist does, to slice ``index``."""
        self.page.locator("#dicomImage canvas").hover()
        current = int(self.page.evaluate("$('#slider').slider('value')"))
        for _ in range(abs(index - current)):
            self.page.mouse.wheel(0, 120 if index > current else -120)
        self.page.wait_for_function(IMAGE_SHOWN, arg=[image_id, compression])
        assert self.page.evaluate("$('#slider').slider('value')") == index

    def best_quality(self) -> None:
        """The toolbar's "Best quality (lossless)" button; the toolbar is closed again.

        The viewer loads the slice again but redraws the canvas only for another slice:
        page away and back to see it.
        """
        self.page.locator("#open-toolbar").click()
        self.page.locator(".jsPanel button[title='Best quality (lossless)']").click()
        self.page.wait_for_function(IMAGE_SHOWN, arg=[None, QUALITIES["lossless"]])
        self.page.locator("#open-toolbar").click()

    def region_grays(self, rows: slice, cols: slice) -> np.ndarray:
        box = [rows.start, cols.start, rows.stop, cols.stop]
        return np.asarray(self.page.evaluate(REGION_GRAYS, box), dtype=float)


def open_in_viewer(explorer: sync_api.Page, study_id: str, description: str) -> Viewer:
    """Study page → the series → the plugin's "Orthanc Web Viewer" button (a new tab)."""
    explorer.goto(f"/app/explorer.html#study?uuid={study_id}")
    heading = explorer.locator("#list-series h3").filter(
        has_text=re.compile(f"^{re.escape(description)}$")
    )
    heading.click()
    sync_api.expect(explorer.locator("#series")).to_be_visible()
    with explorer.context.expect_page() as opened:
        explorer.locator("#series a", has_text="Orthanc Web Viewer").click()
    viewer = Viewer(opened.value)
    viewer.page.wait_for_function(IMAGE_SHOWN, arg=[None, None])
    return viewer


def series_record(orthanc: OrthancServer, study_uid: str, series_uid: str) -> dict[str, Any]:
    (record,) = [
        series
        for series in orthanc.study_series(study_uid)
        if series["MainDicomTags"]["SeriesInstanceUID"] == series_uid
    ]
    return record


def slice_position(orthanc: OrthancServer, image_id: str) -> str:
    """ImagePositionPatient of the slice the viewer shows (its image id: ``<instance>_<frame>``)."""
    instance = image_id.rsplit("_", 1)[0]
    return str(orthanc.get(f"/instances/{instance}/simplified-tags")["ImagePositionPatient"])


def side_by_side(left: sync_api.Page, right: sync_api.Page, path: Path) -> None:
    """Both viewer tabs in one PNG, original left, derived right, 8 px apart."""
    images = [Image.open(io.BytesIO(page.screenshot())) for page in (left, right)]
    width = sum(image.width for image in images) + 8
    combined = Image.new("RGB", (width, max(image.height for image in images)), "white")
    combined.paste(images[0], (0, 0))
    combined.paste(images[1], (images[0].width + 8, 0))
    save_png(combined, path, colors=256, method=Image.Quantize.MAXCOVERAGE)


def test_radiologist_sees_the_derived_series_beside_the_original(
    node_factory: Any,
    web_viewer_orthanc: OrthancServer,
    browser: sync_api.Browser,
    tmp_path: Path,
) -> None:
    orthanc = web_viewer_orthanc
    scan = write_phantom_series(tmp_path / "scan", SPEC)
    header = pydicom.dcmread(scan[0], stop_before_pixels=True)
    destination = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
    node: NodeProcess = node_factory(destinations={"pacs": destination}).start()
    assert storescu(orthanc.dicom_port, scan) == [0] * SLICES  # the scanner archives it
    assert storescu(node.port, scan) == [0] * SLICES
    (job,) = node.wait_jobs_final(1)
    assert job.state == JobState.DONE, job.last_error

    original = series_record(orthanc, header.StudyInstanceUID, header.SeriesInstanceUID)
    derived = series_record(orthanc, header.StudyInstanceUID, job.output_series_uid)
    description = SPEC.series_description
    context = browser.new_context(base_url=orthanc.url, viewport=VIEWPORT)
    try:
        explorer = context.new_page()
        explorer.set_default_timeout(20_000)
        explorer.goto(f"/app/explorer.html#study?uuid={original['ParentStudy']}")
        listed = explorer.locator("#list-series li:has(h3)")
        sync_api.expect(listed).to_have_count(2)
        for name in (description, description + SUFFIX):
            item = listed.filter(
                has=explorer.locator("h3", has_text=re.compile(f"^{re.escape(name)}$"))
            )
            sync_api.expect(item.locator(".ui-li-count")).to_have_text(str(SLICES))

        series = {"original": (original, description), "derived": (derived, description + SUFFIX)}
        middle = SLICES // 2
        rows, cols = uniform_roi(SPEC.size)
        viewers, grays, positions = {}, {}, {}
        for name, (record, title) in series.items():
            viewer = viewers[name] = open_in_viewer(explorer, record["ParentStudy"], title)
            sync_api.expect(viewer.page.locator("#topright")).to_contain_text(title)
            assert viewer.slice_count() == SLICES
            slices = orthanc.get(f"/web-viewer/series/{record['ID']}")["Slices"]
            viewer.scroll_to(middle, slices[middle], QUALITIES["default (JPEG 95 %)"])
            positions[name] = slice_position(orthanc, slices[middle])
            sync_api.expect(viewer.page.locator("#bottomleft")).to_have_text("WW/WL:400/40")
            grays[name, "default (JPEG 95 %)"] = viewer.region_grays(rows, cols)
            viewer.best_quality()
            viewer.scroll_to(middle + 1, slices[middle + 1], QUALITIES["lossless"])
            viewer.scroll_to(middle, slices[middle], QUALITIES["lossless"])
            grays[name, "lossless"] = viewer.region_grays(rows, cols)
            assert viewer.alerts == []

        shot = tmp_path / "viewer.png"
        side_by_side(viewers["original"].page, viewers["derived"].page, shot)
        print(f"\nviewer screenshot (original left, derived right): {shot}")
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, Path(SCREENSHOTS) / "viewer.png")
    finally:
        context.close()

    assert positions["original"] == positions["derived"]  # the same slice, side by side
    for quality in QUALITIES:
        before, after = grays["original", quality], grays["derived", quality]
        print(
            f"soft tissue gray, {quality}: original {before.mean():.1f} ± {before.std():.1f}, "
            f"derived {after.mean():.1f} ± {after.std():.1f} ({before.size} canvas pixels; "
            f"{len(set(before))} and {len(set(after))} distinct grays)"
        )
        assert before.size > 1000
        assert abs(before.mean() - WATER_GRAY) < 6 and abs(after.mean() - before.mean()) < 3
        assert after.std() < 0.5 * before.std()
