"""Issue 9, the dashboard in a real headless Chromium (selenium + Debian's chromium-driver,
installed by .ci/run): the page loads with no console error, shows the live worker, and
its numbers change after requests are sent.

``TOKENFLEET_DASHBOARD_SCREENSHOT=docs/dashboard.png`` also saves a screenshot (how the one
in docs/ was made, after ``scripts/dashboard_traffic.py`` filled the charts)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.fleet import Fleet, make_fleet, running_fleet
from tests.integration.waiting import wait_for

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
CHROMEDRIVER = shutil.which("chromedriver")
NUM_REQUESTS = 5


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("dashboard"), TOKENFLEET_ENGINE="null",
                       TOKENFLEET_NULL_ENGINE_TOKENS="8") as fleet:
        yield fleet


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if CHROMEDRIVER is None:
        pytest.skip("chromedriver not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1440,1500"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


# Read in one script call each: the page redraws its tables every poll, so an element found
# by one WebDriver call may be gone by the next (StaleElementReferenceException).
def text_of(browser: webdriver.Chrome, element_id: str) -> str:
    return str(browser.execute_script(
        "return document.getElementById(arguments[0]).innerText", element_id))


def rows(browser: webdriver.Chrome, table: str, attribute: str) -> list[str]:
    return list(browser.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} tbody tr[${arguments[1]}]`)]"
        ".map((row) => row.getAttribute(arguments[1]))", table, attribute))


def first_row_text(browser: webdriver.Chrome, table: str) -> str:
    return str(browser.execute_script(
        "return document.querySelector(`#${arguments[0]} tbody tr`).innerText", table))


def updates(browser: webdriver.Chrome) -> int:
    return int(browser.execute_script("return Number(document.body.dataset.updates || 0)"))


def test_dashboard_shows_the_live_fleet_and_follows_requests(
        fleet: Fleet, browser: webdriver.Chrome) -> None:
    browser.get(f"{fleet.url}/dashboard?interval_ms=500")
    wait_for(lambda: updates(browser) >= 1, timeout_s=15, interval_s=0.1)
    workers = httpx.get(f"{fleet.url}/v1/fleet").json()["workers"]
    wait_for(lambda: rows(browser, "workers", "data-worker-id") == [workers[0]["id"]],
             timeout_s=10, interval_s=0.1)
    worker_row = first_row_text(browser, "workers")
    assert MODEL in worker_row and "ready" in worker_row
    assert text_of(browser, "stat-workers") == "1 / 1"
    assert text_of(browser, "stat-finished") == "0"
    assert rows(browser, "jobs", "data-job-id") == []
    assert rows(browser, "queues", "data-lane") == ["interactive", "batch"]

    ids = []
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        for i in range(NUM_REQUESTS):
            resp = client.post("/v1/completions", json={"model": MODEL, "prompt": f"n{i}"})
            assert resp.status_code == 200, resp.text
            ids.append(resp.json()["id"])

    wait_for(lambda: sorted(rows(browser, "jobs", "data-job-id")) == sorted(ids),
             timeout_s=20, interval_s=0.2)  # workers write their sample every 2 s
    wait_for(lambda: text_of(browser, "stat-finished") == str(NUM_REQUESTS),
             timeout_s=20, interval_s=0.2)  # once the 5 s bucket is complete
    job_row = first_row_text(browser, "jobs")
    assert "length" in job_row and MODEL in job_row
    assert text_of(browser, "stat-ttft") != "\u2013"  # the dash shown before any data
    assert not browser.execute_script(
        "return document.getElementById('status-line').classList.contains('error')")

    screenshot = os.environ.get("TOKENFLEET_DASHBOARD_SCREENSHOT")
    if screenshot:
        browser.save_screenshot(str(Path(screenshot)))
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    browser.get("about:blank")
    assert problems == []


def test_dashboard_asks_for_a_key_when_auth_is_on(browser: webdriver.Chrome,
                                                   tmp_path: Path) -> None:
    api_key = "tf-dashdashdashdashdashdashdashdash"
    fleet = make_fleet(tmp_path, TOKENFLEET_ENGINE="null", TOKENFLEET_AUTH="true",
                       TOKENFLEET_API_KEYS=api_key)
    try:
        fleet.start_gateway()
        fleet.start_worker()
        fleet.wait_ready(num_workers=1)
        browser.get(f"{fleet.url}/dashboard?interval_ms=500")
        form = browser.find_element(By.ID, "auth")
        wait_for(lambda: form.is_displayed(), timeout_s=15, interval_s=0.1)
        assert "requires an API key" in text_of(browser, "status-line")
        browser.find_element(By.ID, "api-key").send_keys(api_key)
        browser.find_element(By.CSS_SELECTOR, "#auth button").click()
        wait_for(lambda: len(rows(browser, "workers", "data-worker-id")) == 1,
                 timeout_s=15, interval_s=0.1)
        assert not form.is_displayed()
        # the 401s before the key was given are the only console errors
        problems = [entry["message"] for entry in browser.get_log("browser")
                    if entry["level"] == "SEVERE"]
        browser.get("about:blank")  # stop polling before the fleet goes
    finally:
        fleet.stop()
    assert problems and all("401" in message for message in problems), problems
