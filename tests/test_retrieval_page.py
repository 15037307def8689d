"""The search page in headless Chromium (Debian's ``chromium``, which ``make test`` installs) driven by Playwright:
type a query and see the result images load; drop an image file and see results; a bad upload shows its error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from server_utils import running_server, tiny_index
from shard_factory import png_bytes

from vlp.retrieval.index import Index

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ALL_IMAGES_LOADED = """() => {
  const images = [...document.querySelectorAll('#results img')];
  return images.length > 0 && images.every((img) => img.complete);
}"""


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    index = Index.load(tiny_index(tmp_path_factory.mktemp("page")))
    with running_server(index) as url:
        yield url


def test_type_a_query_and_see_the_images(page_url: str, tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (make test installs it: apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS, timeout=60_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(page_url)
            page.wait_for_function("() => document.querySelector('#status').textContent.includes('16 images')")
            page.fill("#query", "caption 3")
            page.select_option("#k", "5")
            page.click("#go")
            page.wait_for_function(ALL_IMAGES_LOADED)
            widths = page.eval_on_selector_all("#results img", "imgs => imgs.map((img) => img.naturalWidth)")
            assert len(widths) == 5 and all(width > 0 for width in widths)
            assert "5 results" in page.inner_text("#status")
            assert page.inner_text("#results figure:first-child figcaption").startswith("#1 ")

            query_image = tmp_path / "query.png"
            query_image.write_bytes(png_bytes(9))
            page.set_input_files("#file", str(query_image))
            page.wait_for_function("() => document.querySelector('#status').textContent.includes('query.png')")
            page.wait_for_function(ALL_IMAGES_LOADED)

            (tmp_path / "bad.png").write_bytes(b"not an image")
            page.set_input_files("#file", str(tmp_path / "bad.png"))
            page.wait_for_function("() => document.querySelector('#status').className === 'error'")
            assert "undecodable_image" in page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
