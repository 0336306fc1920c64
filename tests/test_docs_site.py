"""The documentation site in a real browser (headless Chromium, as the report.html test): every page
opens from the file system with no console error, every page is reachable from the navigation
(the linked documents from a page of it), and search works offline.

The site is built by `python .docs/tutorials/execute.py && python .docs/build.py` (.ci/run does it
before the tests, with DPMEM_REQUIRE_SITE=1 so that a missing site fails instead of skipping)."""
import os
import time
from pathlib import Path

import pytest
from test_html_report import CHROMEDRIVER, CHROMIUM, browser  # noqa: F401  (the browser fixture)

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / ".docs" / "build" / "site"
DOCS = REPO / ".docs" / "build" / "docs"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs Chromium and chromedriver"),
    pytest.mark.skipif(not (SITE / "index.html").is_file() and not os.environ.get("DPMEM_REQUIRE_SITE"),
                       reason="the site is not built (python .docs/tutorials/execute.py && python .docs/build.py)"),
]


def _pages() -> tuple[set[str], set[str]]:
    """The site's pages (nav pages, linked documents) as paths relative to the site, from its sources."""
    rendered = {p.relative_to(DOCS).with_suffix(".html").as_posix() for p in DOCS.rglob("*.md")}
    linked = {p for p in rendered if p.startswith("src/")}
    return rendered - linked, linked


def _visit(driver, page: str) -> dict:
    driver.get_log("browser")
    driver.get((SITE / page).as_uri())
    deadline = time.monotonic() + 20          # a busy machine may hand the page back before it has loaded
    while driver.execute_script("return document.readyState") != "complete" and time.monotonic() < deadline:
        time.sleep(0.1)
    state = driver.execute_script("""
        const base = document.baseURI;
        return {ready: document.readyState, title: document.title,
                nav: Array.from(document.querySelectorAll('nav.md-nav--primary a.md-nav__link[href]'))
                        .map(a => a.href.split('#')[0]),
                links: Array.from(document.querySelectorAll('article a[href]')).map(a => a.href.split('#')[0]),
                images: Array.from(document.querySelectorAll('article img'))
                        .map(i => ({src: i.src, complete: i.complete, width: i.naturalWidth}))};""")
    state["console"] = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    return state


def test_every_page_opens_without_errors_and_is_reached_from_the_navigation(browser):  # noqa: F811
    nav_pages, linked = _pages()
    assert len(nav_pages) >= 25
    uri = {page: (SITE / page).as_uri() for page in nav_pages | linked}
    home = _visit(browser, "index.html")
    in_nav = set(home["nav"])
    missing = sorted(p for p in nav_pages if uri[p] not in in_nav)
    assert not missing, f"pages not in the navigation: {missing}"
    reached = set()
    for page in sorted(nav_pages):
        state = _visit(browser, page)
        assert state["ready"] == "complete" and state["title"], page
        assert not state["console"], (page, state["console"])
        for img in state["images"]:
            assert img["complete"] and img["width"] > 0, (page, img["src"])
        reached |= set(state["links"])
    unreached = sorted(p for p in linked if uri[p] not in reached)
    assert not unreached, f"linked documents no page of the navigation links to: {unreached}"
    for page in sorted(linked)[:5]:     # a few of them, opened as well
        state = _visit(browser, page)
        assert state["ready"] == "complete" and not state["console"], (page, state["console"])


def test_search_works_offline(browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    _visit(browser, "index.html")
    browser.execute_script("document.getElementById('__search').click()")     # open the search overlay
    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    deadline = time.monotonic() + 10
    while not box.is_enabled() and time.monotonic() < deadline:   # enabled once the index is loaded
        time.sleep(0.1)
    box.send_keys("canaries")
    deadline, results = time.monotonic() + 20, []
    while time.monotonic() < deadline and not results:
        time.sleep(0.25)
        results = browser.find_elements(By.CSS_SELECTOR, ".md-search-result__item")
    assert results, "no search results for 'canaries'"
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
