"""The try-it page at GET /, used in a real headless Chromium (Debian's chromium + chromedriver,
installed by `make browser`), driven by selenium: type a query and documents, click Rank, read
the ranked table, and hold it to the API's own answer; on a server with an API key, type the key too.

Skipped when chromium or chromedriver is absent, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from servers import export, no_torch, serving  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)

QUERY = "is the kitchen good"
DOCS = ["the kitchen album is vocalist tune", "player i is marathon", "to storm raincoat drink is good sunny",
        "snake the an seasoning soup ylkhbm jopiwxpx goldfish lion good"]


@pytest.fixture()
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium/chromedriver missing under CI: run `make browser`")
        pytest.skip("chromium/chromedriver not installed (make browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # the system driver: nothing downloaded
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_ranks_documents_in_headless_chromium(browser, export, no_torch, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(str(export), block_torch=no_torch, log_dir=tmp_path) as s:
        want = httpx.post(f"{s.url}/v1/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60).json()["results"]
        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))  # the page listed /v1/models
        assert browser.find_element(By.CSS_SELECTOR, "#model option").get_attribute("value") == "tiny"
        browser.find_element(By.ID, "query").send_keys(QUERY)
        browser.find_element(By.ID, "documents").send_keys("\n".join(DOCS))
        browser.find_element(By.ID, "rank").click()
        wait.until(ec.visibility_of_element_located((By.ID, "results")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        shown = [(int(r.get_attribute("data-index")), r.find_element(By.CSS_SELECTOR, "td.document").text,
                  float(r.find_element(By.CSS_SELECTOR, "td.score").text)) for r in rows]
        assert [i for i, _, _ in shown] == [r["index"] for r in want]
        assert [doc for _, doc, _ in shown] == [DOCS[r["index"]] for r in want]
        assert [score for _, _, score in shown] == [round(r["relevance_score"], 4) for r in want]
        assert browser.find_element(By.ID, "error").text == ""
        browser.save_screenshot(str(tmp_path / "page.png"))

        # a server-side error reaches the page as text, not a silent failure
        browser.find_element(By.ID, "documents").clear()
        browser.find_element(By.ID, "rank").click()
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text.startswith("422")


def test_page_sends_the_key_typed_into_it(browser, export, no_torch, tmp_path):
    """A server with an API key: the page loads (it is open), says 401 until the key is typed, then ranks."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    key = "browser-test-key_0123456789"
    with serving(str(export), env={"QCONV_API_KEY": key}, block_torch=no_torch, log_dir=tmp_path) as s:
        want = httpx.post(f"{s.url}/v1/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}).json()["results"]
        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text.startswith("401: this server needs an API key")
        assert browser.find_elements(By.CSS_SELECTOR, "#model option") == []
        browser.find_element(By.ID, "apikey").send_keys(key + Keys.TAB)  # change event: the models are listed again
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        assert browser.find_element(By.ID, "error").text == ""
        browser.find_element(By.ID, "query").send_keys(QUERY)
        browser.find_element(By.ID, "documents").send_keys("\n".join(DOCS))
        browser.find_element(By.ID, "rank").click()
        wait.until(ec.visibility_of_element_located((By.ID, "results")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert [int(r.get_attribute("data-index")) for r in rows] == [r["index"] for r in want]
        assert [float(r.find_element(By.CSS_SELECTOR, "td.score").text) for r in rows] == [round(r["relevance_score"], 4) for r in want]

        # a wrong key reaches the page as the server's 401, not a silent failure
        field = browser.find_element(By.ID, "apikey")
        field.clear()
        field.send_keys("wrong" + Keys.TAB)
        wait.until(lambda d: d.find_element(By.ID, "error").text == "401: invalid API key")  # listing the models
        assert browser.find_elements(By.CSS_SELECTOR, "#model option") == []
