"""The page at `/` of `edgesd serve`, in a real headless browser (Debian's chromium through Selenium): type a
prompt, press Generate, read back the picture and its parameters; the progress bar and previews; cancel; a token.

Without chromium, chromedriver or selenium the tests skip, except where EDGESD_REQUIRE_BROWSER=1 (CI) makes
that a failure."""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import edgesd

from .servers import Running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PROMPT = "a red circle on a blue background"


def _need(what: str, present: bool) -> None:
    if present:
        return
    if os.environ.get("EDGESD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what} is missing and EDGESD_REQUIRE_BROWSER=1 (apt-get install chromium chromium-driver)")
    pytest.skip(f"{what} is missing (apt-get install chromium chromium-driver; pip install selenium)")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    _need("selenium", webdriver is not None)
    _need("chromium", os.path.exists(CHROMIUM))
    _need("chromedriver", os.path.exists(CHROMEDRIVER))
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server():
    pipe = edgesd.Pipeline.load()
    running = Running({"edgesd-tiny": pipe})
    yield running, pipe
    running.stop()


def _wait(driver, condition, seconds: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(condition)


def _fill(driver, field: str, value) -> None:
    element = driver.find_element("id", field)
    element.clear()
    element.send_keys(str(value))


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(driver, lambda d: d.find_element("id", "status").text == "ready")


def _png(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2])))


def test_the_page_generates_the_picture_the_pipeline_makes(browser, page_server):
    running, pipe = page_server
    _open(browser, running.url + "/")
    # the form starts from the model's own defaults
    assert browser.find_element("id", "width").get_attribute("value") == str(pipe.constants.default_image_size)
    assert browser.find_element("id", "steps").get_attribute("value") == str(pipe.defaults.num_inference_steps)
    samplers = [o.get_attribute("value") for o in browser.find_elements("css selector", "#sampler option")]
    assert "Euler a" in samplers and "DPM++ 2M" in samplers

    _fill(browser, "prompt", PROMPT)
    _fill(browser, "negative_prompt", "green")
    _fill(browser, "seed", 7)
    _fill(browser, "steps", 6)
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "sampler")).select_by_value("Euler a")
    browser.find_element("id", "generate").click()
    _wait(browser, lambda d: d.find_element("id", "status").text == "done")

    result = browser.find_element("id", "result")
    picture = _png(result.get_attribute("src"))
    expected = pipe(PROMPT, negative_prompt="green", seed=7, num_inference_steps=6, scheduler="Euler a").images[0]
    np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), np.asarray(expected))
    assert picture.text["parameters"] == browser.find_element("id", "parameters").text
    text = browser.find_element("id", "parameters").text
    assert text.startswith(PROMPT) and "Negative prompt: green" in text
    assert "Steps: 6" in text and "Seed: 7" in text and "Sampler: Euler a" in text
    download = browser.find_element("id", "download")
    assert download.is_displayed() and download.get_attribute("download") == "edgesd-7.png"
    assert download.get_attribute("href") == result.get_attribute("src")
    assert browser.find_element("id", "error").is_displayed() is False


def test_progress_previews_and_cancel(browser, page_server):
    running, pipe = page_server
    _open(browser, running.url + "/")
    _fill(browser, "prompt", PROMPT)
    _fill(browser, "steps", 500)  # seconds of work, cut short by the cancel
    browser.find_element("id", "generate").click()
    # the bar moves and a step preview shows while the model denoises
    _wait(browser, lambda d: float(d.find_element("id", "progress").get_attribute("value")) > 0)
    _wait(browser, lambda d: d.find_element("id", "preview").is_displayed())
    latent_side = 64 // pipe.constants.vae_scale_factor  # the cheap preview: one pixel per latent pixel
    assert _png(browser.find_element("id", "preview").get_attribute("src")).size == (latent_side, latent_side)
    assert browser.find_element("id", "generate").is_enabled() is False
    browser.find_element("id", "cancel").click()
    error = _wait(browser, lambda d: d.find_element("id", "error").is_displayed() and d.find_element("id", "error"))
    assert error.text.startswith("interrupted")
    assert browser.find_element("id", "generate").is_enabled()
    # the server goes on: the next picture is made
    _fill(browser, "steps", 3)
    browser.find_element("id", "generate").click()
    _wait(browser, lambda d: d.find_element("id", "status").text == "done")
    assert "Steps: 3" in browser.find_element("id", "parameters").text


def test_a_bad_request_shows_the_servers_message(browser, page_server):
    running, _ = page_server
    _open(browser, running.url + "/")
    _fill(browser, "prompt", PROMPT)
    _fill(browser, "width", 60)  # not a multiple of 8
    browser.find_element("id", "generate").click()
    error = _wait(browser, lambda d: d.find_element("id", "error").is_displayed() and d.find_element("id", "error"))
    assert "60" in error.text and "multiple" in error.text


def test_a_token_is_asked_for_and_sent(browser):
    pipe = edgesd.Pipeline.load()
    running = Running({"edgesd-tiny": pipe}, token="secret")
    try:
        browser.get(running.url + "/")
        token = _wait(browser, lambda d: d.find_element("id", "token-row").is_displayed()
                      and d.find_element("id", "token"))
        assert "bearer token" in browser.find_element("id", "error").text
        token.send_keys("secret\t")  # the field is read when it loses focus
        _wait(browser, lambda d: d.find_element("id", "status").text == "ready")
        _fill(browser, "prompt", PROMPT)
        _fill(browser, "steps", 3)
        browser.find_element("id", "generate").click()
        _wait(browser, lambda d: d.find_element("id", "status").text == "done")
    finally:
        browser.execute_script("sessionStorage.clear()")
        running.stop()
