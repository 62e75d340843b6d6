"""`mole ui` in a real browser: the app is served on 127.0.0.1, Debian's headless Chromium (driven by selenium through
the system chromedriver; nothing downloads a browser) types a prompt, presses Generate, waits for the three images and
the gate plot, saves a screenshot, then checks that an empty prompt and a missing run folder give a message in the
page. Skips, saying why, without gradio / selenium / chromium. Needs: pip install 'mole-diffusion[ui]' selenium;
apt-get install chromium chromium-driver. The screenshot goes to $MOLE_UI_SCREENSHOT (default: the test's tmp
folder); its path is printed (pytest -s) and recorded as the test's `screenshot` property."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver")


def _skip_reason() -> str | None:
    # find_spec, not import: collecting this file stays cheap (gradio takes seconds to import)
    if importlib.util.find_spec("gradio") is None:
        return "gradio is not installed: pip install 'mole-diffusion[ui]'"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: pip install selenium"
    if CHROMIUM is None or DRIVER is None:
        return "no system Chromium / chromedriver on PATH: apt-get install chromium chromium-driver"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from mole.ui import Studio, UIOptions, launch

    studio = Studio(UIOptions(steps=4, out_dir=str(tmp_path_factory.mktemp("ui-out"))))
    app = launch(studio, port=_free_port(), block=False)
    studio.preload().join(120)  # as `mole ui` does; loaded before the page is driven
    assert studio.loaded
    assert app.local_url.startswith("http://127.0.0.1:")
    yield app.local_url, studio
    app.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1400"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)


def _loaded_image(driver, elem_id: str):
    """The <img> inside the component, once its picture has arrived and decoded (naturalWidth > 0)."""
    return driver.execute_script(
        "const i = document.querySelector(`#${arguments[0]} img`);"
        "return i && i.complete && i.naturalWidth > 0 ? [i.src, i.naturalWidth, i.naturalHeight] : null;",
        elem_id,
    )


def _status(driver, elem_id="status") -> str:
    return driver.execute_script("const e = document.getElementById(arguments[0]); return e ? e.innerText : '';",
                                 elem_id)  # fmt: skip


def test_generate_in_chromium_shows_three_images_and_the_gate_plot(app_url, browser, tmp_path, record_property):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, studio = app_url
    browser.get(url)
    box = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    box.send_keys("a close-up photo of a face")
    browser.find_element(By.ID, "generate").click()
    ids = ("image-none", "image-fixed", "image-mole", "gate-plot", "local-maps")
    found = _wait(browser, lambda d: all(_loaded_image(d, i) for i in ids) and "done in" in _status(d)
                  and {i: _loaded_image(d, i) for i in ids})  # fmt: skip
    # the model's 64 px images, and Pillow's 640 x 400 gate chart, served from this generation's folder
    for i in ("image-none", "image-fixed", "image-mole"):
        assert found[i][1:] == [64, 64], (i, found[i])
    assert found["gate-plot"][1:] == [640, 400]
    assert "seed 0, 4 steps" in _status(browser) and "face" in _status(browser)
    [folder] = [p for p in studio.out_dir.iterdir() if p.name.endswith("-seed0")]
    assert sorted(p.name for p in folder.glob("*.png")) == ["fixed.png", "gates_global.png", "local_maps.png",
                                                            "mole.png", "none.png"]  # fmt: skip
    shot = Path(os.environ.get("MOLE_UI_SCREENSHOT") or tmp_path / "mole-ui.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    record_property("screenshot", str(shot))
    print(f"screenshot: {shot}")

    # bad input: a message in the page, and the page still works
    box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)  # (clear() sets the value without the input event the page listens to)
    browser.find_element(By.ID, "generate").click()
    _wait(browser, lambda d: "the prompt is empty" in _status(d), timeout=30)
    assert _loaded_image(browser, "image-mole")[0] == found["image-mole"][0]  # the earlier images stay

    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Training run')]").click()
    run_box = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#run-folder textarea, #run-folder input"))
    run_box.send_keys(str(tmp_path / "no-such-run"))
    browser.find_element(By.ID, "run-show").click()
    _wait(browser, lambda d: "does not exist" in _status(d, "run-status"), timeout=30)
