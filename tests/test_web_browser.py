"""The live page in headless Chromium, driven by Selenium, against the real programs: a base station
with ``--http`` and a recorder that replays a real recording through a real Mosquitto.

The page is opened before the recorder starts. The test then waits, without
reloading, for a detection row, the recorder's row, the site's head version
to go from v0 to v1, and the plots. Debian's ``chromium`` and
``chromium-driver`` packages provide the browser and its driver (``.ci/run``
installs them), so Selenium needs nothing from the network.
"""

from __future__ import annotations

import shutil
import time

import pytest

from dawnchorus.protocol.signing import generate_key_files
from dawnchorus.server.broker import free_port

SITE = "browser-site"
DEVICE = "rec-browser"
# Species of the recording, so that the site's head detects some of them at the threshold below.
SPECIES = ["Poecile atricapillus", "Cardinalis cardinalis", "Baeolophus bicolor", "Haemorhous mexicanus",
           "Turdus migratorius", "Cyanocitta cristata", "Zenaida macroura", "Setophaga ruticilla"]

# Records every head version the page shows for the site and in the recorder's row, so the
# test can check that v0 turned into v1 even if both happen between two polls.
_WATCH_VERSIONS = """
window.dawnchorusTestMarker = arguments[0];
window.seenVersions = {site: [], recorder: []};
const remember = (list, text) => {
  if (text !== undefined && list[list.length - 1] !== text) list.push(text);
};
const record = () => {
  for (const node of document.querySelectorAll('.site .head-version')) remember(window.seenVersions.site, node.textContent);
  for (const row of document.querySelectorAll('#recorders tr.recorder')) {
    remember(window.seenVersions.recorder, row.cells[4].textContent);
  }
};
new MutationObserver(record).observe(document.body, {childList: true, subtree: true, characterData: true});
record();
"""


def _browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium binary: apt-get install chromium chromium-driver (.ci/run does)")
    driver = shutil.which("chromedriver")
    if driver is None:
        pytest.fail(f"{browser} is installed but chromedriver is not: apt-get install chromium-driver")
    return browser, driver


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # With the driver's path given, Selenium does not look for (or download) a driver of its own.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()



def _wait_for_log(programs, name: str, text: str, process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in programs.log(name):
        assert process.poll() is None, programs.log(name)[-3000:]
        assert time.monotonic() < deadline, f"{name} lacks {text!r} after {timeout} s: {programs.log(name)[-3000:]}"
        time.sleep(0.2)


@pytest.mark.slow
def test_browser_page_shows_detection_and_new_head(browser, start_mosquitto, programs, data_dir, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    broker = start_mosquitto("broker")
    generate_key_files(tmp_path / "keys")
    species = tmp_path / "species.txt"
    species.write_text("\n".join(SPECIES) + "\n")
    port = free_port()
    server = programs.start(
        "server", "run", "--broker", broker.address, "--state-dir", str(tmp_path / "server"),
        "--signing-key", str(tmp_path / "keys" / "head-signing.key"), "--default-species", f"@{species}",
        "--update-interval", "16", "--min-buffer", "16", "--buffer", "1000", "--http", f"127.0.0.1:{port}",
        log="server.log")
    _wait_for_log(programs, "server.log", "base station ready", server, 180)

    browser.get(f"http://127.0.0.1:{port}/")
    # The page re-renders a table on each update, so an element found a moment ago can be stale and the wait retries.
    wait = WebDriverWait(browser, 120, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda driver: driver.find_element(By.ID, "connection").text == "live")
    assert browser.find_elements(By.CSS_SELECTOR, "#detections tr.detection") == []
    marker = f"page-{time.monotonic_ns()}"
    browser.execute_script(_WATCH_VERSIONS, marker)

    recorder = programs.start(
        "edge", "run", "--device", DEVICE, "--site", SITE, "--broker", broker.address,
        "--input", str(data_dir / "soundscapes/birdnet-example/soundscape.flac"), "--speed", "10", "--stay",
        "--min-conf", "0.3", "--species-file", str(species), "--state-dir", str(tmp_path / "edge"),
        "--head-public-key", str(tmp_path / "keys" / "head-signing.pub"), "--threads", "1", log="recorder.log")

    def failure(what: str) -> str:
        return (f"{what}; server log: {programs.log('server.log')[-2000:]}\n"
                f"recorder log: {programs.log('recorder.log')[-2000:]}")

    def first_detection(driver) -> tuple[list[str], str] | None:
        rows = driver.find_elements(By.CSS_SELECTOR, "#detections tr.detection")
        if not rows:
            return None
        return [cell.text for cell in rows[0].find_elements(By.TAG_NAME, "td")], rows[0].get_attribute("data-label")

    try:
        cells, label = wait.until(first_detection)
    except Exception:
        pytest.fail(failure("no detection row appeared"))
    assert cells[3] == DEVICE
    assert cells[4] == SITE
    assert float(cells[2]) >= 0.3
    assert cells[1] == f"{label.partition('_')[2]} {label.partition('_')[0]}"

    head = f"#site-{SITE} .head-version"
    try:
        wait.until(lambda driver: [node.text for node in driver.find_elements(By.CSS_SELECTOR, head)] == ["v1"])
    except Exception:
        pytest.fail(failure(f"the site's head version did not become v1 (seen {browser.execute_script('return window.seenVersions')})"))
    seen = browser.execute_script("return window.seenVersions")
    assert seen["site"] == ["v0", "v1"]

    recorder_row = f"#recorders tr[data-device='{DEVICE}']"

    def recorder_on_v1(driver) -> list[str] | None:
        texts = [cell.text for cell in driver.find_element(By.CSS_SELECTOR, recorder_row).find_elements(By.TAG_NAME, "td")]
        return texts if texts[4] == "v1" else None

    recorder_cells = wait.until(recorder_on_v1)
    # "–" is a recorder whose data arrived before its first status, so its head is not known yet.
    recorder_versions = browser.execute_script("return window.seenVersions")["recorder"]
    assert [version for version in recorder_versions if version != "–"] == ["v0", "v1"]
    assert recorder_cells[1] == SITE
    # A fast replay can end before the head arrives; the recorder stays for heads either way.
    assert recorder_cells[2] in ("online", "finished")

    assert browser.find_elements(By.CSS_SELECTOR, f"#site-{SITE} svg polyline")
    assert "published" in browser.find_element(By.CSS_SELECTOR, f"#site-{SITE} table.rounds").text
    assert browser.find_elements(By.CSS_SELECTOR, f".counts-site[data-site='{SITE}'] tr[data-label]")
    # The marker set after the first load is still there: the page never reloaded.
    assert browser.execute_script("return window.dawnchorusTestMarker") == marker
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    assert recorder.poll() is None, programs.log("recorder.log")[-3000:]


def test_browser_small_values_ticks_distinct(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from dawnchorus.protocol.messages import StationStats
    from dawnchorus.server.live import LiveState
    from dawnchorus.server.metrics import metrics_registry
    from dawnchorus.server.web import WebServer

    # Mean pseudo-labels of a site with little to detect are about 1e-4, as a user's page showed.
    state = LiveState("station")
    now = time.time()
    for index, value in enumerate([0.000120, 0.000128, 0.000135, 0.000150]):
        state.round(SITE, index + 1, True, "published", {"mean_pseudo_label": value, "mean_teacher_score": value},
                    buffer_size=100, when=now - 600 + index * 60)
    stats = StationStats("station", now, {}, {})
    server = WebServer(state, metrics_registry(lambda: stats, state), "127.0.0.1", 0)
    server.start()
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        chart = f"#site-{SITE} svg[aria-label='Mean pseudo-label']"
        WebDriverWait(browser, 60, poll_frequency=0.2).until(
            lambda driver: driver.find_elements(By.CSS_SELECTOR, chart))
        ticks = [node.text for node in browser.find_elements(By.CSS_SELECTOR, f"{chart} text.tick")]
    finally:
        server.stop()

    # Three value ticks on the y axis, then the first and last round's time on the x axis.
    values = ticks[:3]
    assert len(ticks) == 5
    assert len(set(values)) == 3, values
    assert [float(text) for text in values] == sorted(float(text) for text in values)
    for text in values:
        assert 1.0e-4 <= float(text) <= 1.6e-4, text
