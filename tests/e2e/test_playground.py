"""The playground page (GET /), served as-is and driven in headless Chromium.

The browser test needs Debian's `chromium` and `chromium-driver` packages and the `selenium`
package; without them it is skipped (the page's HTTP test still runs). Set
RERANKD_UPDATE_SCREENSHOTS=1 to also refresh docs/playground.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,860",
)

QUERY = "What is the capital of China?"
DOCS = [
    "Beijing is the capital of China.",
    "Gravity is a force that attracts objects with mass.",
    "Shanghai is the largest city in China by population.",
    "Paris is the capital of France.",
]
INSTRUCTION = "Given a question, find passages that answer it"


def test_root_serves_the_playground_page_outside_the_openapi_schema(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for element in ('id="query"', 'id="documents"', 'id="model"', 'id="api-key"', "/v1/rerank"):
        assert element in page
    assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere
    assert "/" not in client.get("/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("headless Chromium not installed: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _fill(driver, element_id: str, text: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(text)


def test_playground_ranks_pasted_documents_like_the_api(
    browser, client, qwen3_server, qwen3_model, tmp_path
):
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(qwen3_server + "/")
    # the model list comes from /v1/models
    wait.until(lambda d: d.execute_script("return document.getElementById('model').value"))
    options = browser.execute_script(
        "return [...document.getElementById('model').options].map(o => o.value)"
    )
    assert options == [qwen3_model["id"]]

    _fill(browser, "query", QUERY)
    _fill(browser, "documents", "\n".join(DOCS) + "\n\n")  # blank lines are ignored
    _fill(browser, "instruction", INSTRUCTION)
    browser.find_element("id", "submit").click()
    wait.until(lambda d: len(d.find_elements("css selector", "li.result")) == len(DOCS))

    items = browser.find_elements("css selector", "li.result")
    shown = [
        (
            int(li.get_attribute("data-index")),
            float(li.find_element("css selector", ".score").text),
            li.find_element("css selector", ".text").text,
        )
        for li in items
    ]
    expected = client.post(
        "/v1/rerank", json={"query": QUERY, "documents": DOCS, "instruction": INSTRUCTION}
    ).json()["results"]
    assert [index for index, _, _ in shown] == [r["index"] for r in expected]
    for (index, score, text), r in zip(shown, expected, strict=True):
        assert score == pytest.approx(r["relevance_score"], abs=6e-5)  # shown with 4 decimals
        assert text.startswith(DOCS[index])
    widths = [
        float(li.find_element("css selector", ".bar > div").value_of_css_property("width")[:-2])
        for li in items
    ]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    status = browser.find_element("id", "status").text
    assert f"{len(DOCS)} documents ranked by {qwen3_model['id']}" in status

    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("RERANKD_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_playground_shows_the_servers_error_message(browser, qwen3_server):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(qwen3_server + "/")
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.getElementById('model').value")
    )
    _fill(browser, "query", QUERY)
    _fill(browser, "documents", "one document")
    browser.execute_script("document.getElementById('model').add(new Option('nope', 'nope'))")
    browser.execute_script("document.getElementById('model').value = 'nope'")
    browser.find_element("id", "submit").click()
    WebDriverWait(browser, 30).until(
        lambda d: "error" in d.find_element("id", "status").get_attribute("class")
    )
    status = browser.find_element("id", "status").text
    assert status.startswith("404 NotFoundError: model 'nope' is not served here")
