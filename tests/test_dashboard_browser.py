"""The dashboard in a real headless Chromium (Debian's), served by ``serve_web`` (both databases).

Set ``DENOISE_NODE_SCREENSHOTS=docs`` to (re)write ``docs/dashboard.png`` and ``docs/job.png``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.admin import AdminNode, receive_series, settle
from tests.fixtures.browser import save_png

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
SCREENSHOTS = os.environ.get("DENOISE_NODE_SCREENSHOTS")
PREVIEWS_LOADED = """() => ['soft', 'lung', 'diff'].every((kind) => {
    const image = document.getElementById('preview-' + kind);
    return image && image.complete && image.naturalWidth > 0;
})"""


@pytest.fixture
def base_url(admin_web_url: str) -> str:
    """The node's web role on a free port (tests.fixtures.admin)."""
    return admin_web_url


@pytest.fixture
def page(browser: sync_api.Browser, base_url: str) -> Iterator[sync_api.Page]:
    context = browser.new_context(base_url=base_url, viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def screenshot(page: sync_api.Page, name: str) -> None:
    """A full-page PNG (see ``save_png``) where ``DENOISE_NODE_SCREENSHOTS`` asks for one."""
    if SCREENSHOTS:
        save_png(page.screenshot(full_page=True), Path(SCREENSHOTS) / name)


def test_dashboard_shows_jobs_filters_and_refreshes_itself(
    page: sync_api.Page, admin_node: AdminNode
) -> None:
    jobs = admin_node.jobs
    page.goto("/")
    done_row = page.locator("tr", has=page.locator(f'a[href="/jobs/{jobs["done"]}"]'))
    sync_api.expect(done_row.locator(".state")).to_have_text("done")
    sync_api.expect(page.locator("tbody tr")).to_have_count(len(jobs))
    screenshot(page, "dashboard.png")

    new_job = settle(admin_node.ctx, receive_series(admin_node.ctx, seed=5, calling="CT3"))
    sync_api.expect(page.locator(f'a[href="/jobs/{new_job}"]')).to_be_visible(timeout=12_000)

    page.get_by_role("link", name="failed").click()
    sync_api.expect(page).to_have_url("/?state=failed")
    sync_api.expect(page.locator("tbody tr")).to_have_count(1)
    sync_api.expect(page.locator("tbody")).to_contain_text("model output has NaN values")


def test_job_page_previews_and_actions(page: sync_api.Page, admin_node: AdminNode) -> None:
    job_id = admin_node.jobs["done"]
    page.goto("/")
    page.locator(f'a[href="/jobs/{job_id}"]').click()
    sync_api.expect(page).to_have_url(f"/jobs/{job_id}")
    sync_api.expect(page.locator("#job-state")).to_have_text("done")
    sync_api.expect(page.locator("table.timeline tbody tr")).to_have_count(5)
    page.wait_for_function(PREVIEWS_LOADED)
    screenshot(page, "job.png")

    page.locator("#retry").click()
    sync_api.expect(page.locator("#job-state")).to_have_text("queued")
    sync_api.expect(page.locator(".flash")).to_contain_text(f"retry: job {job_id} is now queued")
    assert admin_node.ctx.queries.get_job(job_id).state == "queued"

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()
    sync_api.expect(page.locator("#job-state")).to_have_text("cancelled")
    assert admin_node.ctx.queries.job_events(job_id)[-1].actor == "web:local"


def test_pages_fit_phone_laptop_and_wall_screens(
    browser: sync_api.Browser, base_url: str, admin_node: AdminNode
) -> None:
    for width, height in ((390, 844), (1366, 768), (3840, 2160)):
        context = browser.new_context(
            base_url=base_url, viewport={"width": width, "height": height}
        )
        page = context.new_page()
        try:
            for path in ("/", f"/jobs/{admin_node.jobs['done']}"):
                page.goto(path)
                overflow = page.evaluate(
                    "document.documentElement.scrollWidth - document.documentElement.clientWidth"
                )
                assert overflow <= 0, f"{path} scrolls sideways by {overflow}px at {width}px"
        finally:
            context.close()
