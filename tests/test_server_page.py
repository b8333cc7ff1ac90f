"""The server's web page in a headless chromium: a generation plays while it streams, draws its spectrogram and
downloads as a WAV equal to offline generation; the server's errors (a bad value, a missing API key) show in the page.

Debian's chromium and chromedriver are used as installed (`make install-dev` installs them with apt), so Selenium
Manager never downloads a browser; without them these tests fail, naming what is missing.
"""
from __future__ import annotations

import os
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from server_harness import offline, served  # noqa: F401 - fixtures
from server_harness import running_server

from vivace import Engine
from vivace.server.app import ServerSettings
from vivace.server.audio_formats import pcm16

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "server-page.png"
WAIT_S = 120.0  # a generation on the tiny pack takes well under a second; this bounds a stuck one
BACKGROUND = (11, 13, 18)  # the spectrogram's background (app.js, style.css)
PROMPT = "upbeat piano with acoustic bass"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"the browser test needs Debian's chromium and chromium-driver: {' and '.join(missing)} missing "
                    "(make install-dev installs them with apt-get)", pytrace=False)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--autoplay-policy=no-user-gesture-required", "--window-size=1000,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


def page_state(driver: WebDriver) -> dict:
    return driver.execute_script("return Object.assign({}, window.vivace, {body: document.body.dataset.state})")


def wait_for_state(driver: WebDriver, *states: str) -> dict:
    """Waits (bounded) until the page reaches one of `states`; an unexpected error state fails at once with the
    page's message."""
    def reached(d: WebDriver) -> dict | bool:
        state = page_state(d)
        if state["state"] == "error" and "error" not in states:
            pytest.fail(f"the page failed: {d.find_element(By.ID, 'error').text}", pytrace=False)
        return state if state["state"] in states else False

    state = WebDriverWait(driver, WAIT_S, poll_frequency=0.02).until(reached, f"the page never reached {states}")
    assert state["body"] == state["state"]  # body[data-state] mirrors window.vivace.state
    return state


def open_page(driver: WebDriver, url: str, expect: str = "idle") -> dict:
    driver.get(f"{url}/")
    if driver.execute_script("return typeof window.vivace") != "object":  # app.js runs before the load event
        statuses = {path: httpx.get(f"{url}{path}").status_code for path in ("/static/app.js", "/static/style.css")}
        pytest.fail(f"the page's script did not run: {statuses}", pytrace=False)
    return wait_for_state(driver, expect)


def fill(driver: WebDriver, **fields: str) -> None:
    for element_id, value in fields.items():
        element = driver.find_element(By.ID, element_id.replace("_", "-"))
        element.clear()
        element.send_keys(value)


def background_fraction(driver: WebDriver) -> float:
    """The share of the spectrogram canvas's pixels that are its background colour."""
    return driver.execute_script(
        """
        const [r, g, b] = arguments[0];
        const canvas = document.getElementById("spectrogram");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let background = 0;
        for (let i = 0; i < data.length; i += 4) {
          if (data[i] === r && data[i + 1] === g && data[i + 2] === b) background++;
        }
        return background / (data.length / 4);
        """,
        list(BACKGROUND),
    )


def wait_for_file(path: Path) -> bytes:
    deadline = time.monotonic() + 30.0
    while not path.exists() or path.with_name(path.name + ".crdownload").exists():
        present = sorted(p.name for p in path.parent.iterdir())
        assert time.monotonic() < deadline, f"{path.name} was not downloaded (the folder holds {present})"
        time.sleep(0.05)
    return path.read_bytes()


def test_a_generation_plays_while_streaming_and_downloads_the_offline_clip(
    served, browser: WebDriver, offline: Engine, tmp_path: Path,
) -> None:
    card = httpx.get(f"{served.url}/v1/models").json()["data"][0]
    state = open_page(browser, served.url)
    assert state["model"] == card["id"] and state["sampleRate"] == card["sample_rate"]
    assert float(browser.find_element(By.ID, "duration").get_attribute("max")) == card["max_duration_s"]
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.find_element(By.ID, "download").get_attribute("disabled")

    duration, seed = 1.0, 7
    fill(browser, prompt=PROMPT, duration=str(duration), seed=str(seed))
    browser.find_element(By.ID, "generate").click()

    state = wait_for_state(browser, "streaming", "done")
    assert state["scheduledSources"] >= 1 and state["audioContextState"] == "running", state
    state = wait_for_state(browser, "done")
    clip = pcm16(offline.generate(PROMPT, duration, seed=seed)[0])
    assert state["samplesReceived"] == len(clip) // 2 and state["sampleRate"] == card["sample_rate"]
    assert 0 < state["firstAudioSeconds"] < WAIT_S
    assert browser.find_element(By.ID, "first-audio").text.startswith("time to first audio: ")
    assert browser.find_element(By.ID, "progress").get_attribute("value") == "1"
    # the spectrogram covers the canvas: noise-like audio from random weights leaves little background
    assert background_fraction(browser) < 0.5
    if os.environ.get("VIVACE_SCREENSHOT") == "1":
        browser.save_screenshot(str(SCREENSHOT))

    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    download = browser.find_element(By.ID, "download")
    assert download.is_enabled()
    download.click()
    wait_for_file(tmp_path / f"vivace-{seed}.wav")
    with wave.open(str(tmp_path / f"vivace-{seed}.wav"), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, card["sample_rate"])
        assert wav.readframes(wav.getnframes()) == clip


def test_network_chunks_that_split_a_sample_decode_as_the_whole_stream(served, browser: WebDriver) -> None:
    stream = pcm16(np.linspace(-1.0, 1.0, 101, dtype=np.float32))
    cuts = [0, 1, 2, 5, 6, 99, 150, len(stream)]  # odd and even lengths, one byte alone
    open_page(browser, served.url)
    decoded = browser.execute_script(
        """
        const decoder = pcmDecoder();
        const [stream, cuts] = [Uint8Array.from(arguments[0]), arguments[1]];
        const samples = [];
        for (let i = 1; i < cuts.length; i++) samples.push(...decoder.decode(stream.slice(cuts[i - 1], cuts[i])).samples);
        return {samples, midSample: decoder.midSample};
        """,
        list(stream), cuts,
    )
    assert not decoded["midSample"]
    assert np.array_equal(np.array(decoded["samples"]) * 32768, np.frombuffer(stream, "<i2"))


@pytest.mark.parametrize("fields", [{"duration": "0"}, {"prompt": ""}], ids=["zero duration", "empty prompt"])
def test_a_bad_request_shows_the_servers_error(served, browser: WebDriver, fields: dict[str, str]) -> None:
    values = {"prompt": PROMPT, "duration": "1", "seed": "0", **fields}
    body = {"model": "random-tiny", "input": values["prompt"], "response_format": "pcm", "stream_format": "audio",
            "duration": float(values["duration"]), "seed": 0}
    answer = httpx.post(f"{served.url}/v1/audio/speech", json=body, timeout=WAIT_S)
    assert answer.status_code >= 400, f"the server accepted {body}"
    message = answer.json()["error"]["message"]

    open_page(browser, served.url)
    fill(browser, **values)
    browser.find_element(By.ID, "generate").click()
    wait_for_state(browser, "error")
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text == message
    assert browser.find_element(By.ID, "download").get_attribute("disabled")


def test_a_missing_api_key_shows_401_and_generate_retries_with_the_key(tiny_pack: Path, browser: WebDriver) -> None:
    with running_server(Engine.from_pack(tiny_pack), ServerSettings(api_key="sesame")) as served:
        open_page(browser, served.url, expect="error")
        message = httpx.get(f"{served.url}/v1/models").json()["error"]["message"]
        assert browser.find_element(By.ID, "error").text == message

        fill(browser, prompt=PROMPT, duration="0.5", seed="1", api_key="sesame")
        browser.find_element(By.ID, "generate").click()
        state = wait_for_state(browser, "done")
        assert state["model"] == "random-tiny" and state["samplesReceived"] > 0
        assert not browser.find_element(By.ID, "error").is_displayed()
