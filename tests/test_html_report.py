"""report.html in a real browser (headless Chromium driven by selenium/chromedriver): every image
decodes, the summary table shows summary.json's numbers, nothing is logged to the console and
nothing but the page itself and its embedded images is requested."""
import json
import math
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,2000"]

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="headless browser test needs Chromium and chromedriver "
                                       "(Debian: apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test drives Chromium with selenium")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def _open(driver, page: Path) -> dict:
    driver.get_log("browser"), driver.get_log("performance")      # start from empty logs
    driver.get(page.resolve().as_uri())
    state = driver.execute_script("""
        const imgs = Array.from(document.images);
        return {ready: document.readyState,
                images: imgs.map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
                cells: Array.from(document.querySelectorAll('#summary-table td[data-key]')).map(td => ({
                    variant: td.parentElement.dataset.variant, key: td.dataset.key,
                    value: td.dataset.value, text: td.textContent.trim()})),
                rows: document.querySelectorAll('#summary-table tbody tr').length,
                verdict: document.getElementById('verdict').textContent,
                alpha: document.getElementById('alpha-split').textContent};""")
    state["console"] = driver.get_log("browser")
    requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    uri = page.resolve().as_uri()
    # the page's own requests (the browser's start page makes chrome:// requests of its own)
    state["urls"] = [m["params"]["request"]["url"] for m in requests
                     if m["method"] == "Network.requestWillBeSent" and m["params"].get("documentURL") == uri]
    return state


def _check(state: dict, run_dir: Path, tmp_path: Path, driver) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert state["ready"] == "complete"
    figures = {p.stem for p in (run_dir / "figures").glob("*.png")}
    assert len(state["images"]) == len(figures) >= 3            # every figure and gallery is on the page
    for img in state["images"]:
        assert img["complete"] and img["width"] > 0, img["alt"]
    assert state["rows"] == len(summary["variants"])
    for cell in state["cells"]:
        expected = summary["variants"][cell["variant"]][cell["key"]]
        assert json.loads(cell["value"]) == expected, cell
        if isinstance(expected, (int, float)) and not isinstance(expected, bool):
            shown = float(cell["text"])
            assert math.isclose(shown, expected, rel_tol=5e-4, abs_tol=1e-12), cell   # 4 significant digits
        elif expected is None:
            assert cell["text"] == "", cell
        else:
            assert cell["text"] == str(expected), cell
    assert len(state["cells"]) == len(summary["variants"]) * 13
    run = summary["run"]
    assert f"{run['audit_tests']} tests" in state["alpha"] and f"alpha = {run['alpha']:.4g}" in state["alpha"]
    assert state["verdict"].startswith("OK") or state["verdict"].startswith("FAIL")
    errors = [e for e in state["console"] if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    assert state["urls"] and all(u.startswith(("file:", "data:")) for u in state["urls"]), state["urls"]
    shot = tmp_path / "report.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 0


def test_tiny_run_report_in_chromium(browser, tiny_digits_run, tmp_path):
    run_dir, _ = tiny_digits_run
    _check(_open(browser, run_dir / "report.html"), run_dir, tmp_path, browser)


def test_committed_default_report_in_chromium(browser, tmp_path):
    run_dir = REPO / "results" / "default"
    if not (run_dir / "report.html").is_file():
        pytest.skip("results/default has no report.html")
    _check(_open(browser, run_dir / "report.html"), run_dir, tmp_path, browser)


def test_a_broken_image_is_caught(browser, tiny_digits_run, tmp_path):
    """The checks above can fail: a page with an undecodable image and a console error."""
    run_dir, _ = tiny_digits_run
    page = tmp_path / "broken.html"
    html = (run_dir / "report.html").read_text()
    page.write_text(html.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
                    .replace("</body>", "<script>console.error('broken')</script></body>"))
    state = _open(browser, page)
    assert min(i["width"] for i in state["images"]) == 0
    assert any("broken" in e["message"] for e in state["console"])
