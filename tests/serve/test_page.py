"""The served web page in a real headless browser (Debian's chromium + chromium-driver, driven by
Selenium): the form is built from /api/info, a submitted prompt shows progress, and the image
appears in the gallery with its parameters. Skipped, saying why, where no Chromium is installed
(.ci/run installs it)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from tests.serve.support import (
    HintRecorder,
    LiveServer,
    edit_plugin_manager,
    plugin_manager,
    start_service,
    write_edit_job,
    write_job,
)

webdriver = pytest.importorskip("selenium.webdriver", reason="the page test drives Chromium with selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason=f"no headless browser: chromium {'found' if CHROMIUM else 'not found'}, chromedriver "
           f"{'found' if CHROMEDRIVER else 'not found'} (apt-get install chromium chromium-driver; .ci/run does)")

# the flags that work in a closed sandbox as root (no GPU, no network besides loopback)
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1100,900")


def browser(profile: str) -> Any:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def served_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """``(driver, service)``: one browser and one resident model for the module."""
    job = write_job(tmp_path_factory.mktemp("page"), queue_size=4)
    service, worker, _ = start_service(job, plugin_manager())
    driver = browser(str(tmp_path_factory.mktemp("chromium-profile")))
    try:
        yield driver, service
    finally:
        driver.quit()
        worker.stop()


@pytest.fixture(scope="module")
def page(served_page: tuple[Any, Any]) -> Iterator[tuple[Any, str]]:
    from t2i_engine.serve.app import create_app

    driver, service = served_page
    with LiveServer(create_app(service)) as server:
        yield driver, server.url


def test_submitting_a_prompt_shows_the_image_in_the_gallery(page, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from t2i_engine.utils.images import from_pil

    driver, url = page
    hint = tmp_path / "hint.png"
    Image.new("RGB", (16, 16), (0, 0, 255)).save(hint)
    driver.get(url + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text != "")  # /api/info filled the form
    assert driver.find_element(By.ID, "width").get_attribute("value") == "16"
    assert "ddim" in [o.text for o in Select(driver.find_element(By.ID, "sampler")).options]
    uploads = driver.find_elements(By.CSS_SELECTOR, "#uploads input[type=file]")
    assert [u.get_attribute("data-field") for u in uploads] == ["conditioners.0.hint", "init_image"]
    driver.find_element(By.ID, "prompt").send_keys("a red square in the browser")
    driver.find_element(By.ID, "seed").send_keys("42")
    uploads[0].send_keys(str(hint))  # the conditioner's input, chosen as a user would
    driver.find_element(By.ID, "submit").click()
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery .card[data-state=done]")))
    thumb = card.find_element(By.CSS_SELECTOR, ".inputs img")
    assert thumb.get_attribute("title") == "conditioners.0.hint"
    wait.until(lambda d: (thumb.get_attribute("src") or "").startswith("blob:"))
    wait.until(lambda d: (card.find_element(By.TAG_NAME, "img").get_attribute("src") or "").startswith("blob:"))
    loaded = driver.execute_script("const i = arguments[0]; return [i.complete, i.naturalWidth, i.naturalHeight];",
                                   card.find_element(By.TAG_NAME, "img"))
    assert loaded == [True, 16, 16]
    assert "a red square in the browser" in card.text and "42" in card.text
    assert driver.find_element(By.ID, "status").text == "done"
    assert driver.find_element(By.ID, "error").text == ""
    assert HintRecorder.seen[-1].equal(from_pil(Image.open(hint).convert("RGB"))[None])  # the file reached it


def test_a_refused_request_shows_the_servers_message(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, url = page
    driver.get(url + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text != "")
    driver.find_element(By.ID, "prompt").send_keys("too wide")
    width = driver.find_element(By.ID, "width")
    width.clear()
    width.send_keys("17")
    driver.execute_script("document.getElementById('form').noValidate = true")  # let the server judge
    driver.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text != "")
    assert "request.width/height: must be multiples of 2" in driver.find_element(By.ID, "error").text


def test_with_a_token_the_page_asks_for_it(served_page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from t2i_engine.serve.app import Service, create_app

    driver, service = served_page
    locked = Service(board=service.board, builder=service.builder, info=service.info, token="s3cret")
    with LiveServer(create_app(locked)) as server:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "bearer token" in d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "token").is_displayed()
        assert driver.find_element(By.ID, "model").text == ""  # nothing loaded without it
        token = driver.find_element(By.ID, "token")
        token.send_keys("s3cret")
        driver.find_element(By.ID, "prompt").click()  # leaving the field commits it ("change")
        wait.until(lambda d: d.find_element(By.ID, "model").text != "")
        assert driver.find_element(By.ID, "error").text == ""
        driver.execute_script("sessionStorage.clear()")


@pytest.fixture(scope="module")
def edit_page(served_page: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """The browser on a served tiny InstructPix2Pix editor (the plugin's ``edit`` generator)."""
    pytest.importorskip("diffusers", reason="the tiny editor is made with diffusers")
    pytest.importorskip("t2i_plugin_instructpix2pix")
    from plugins.instructpix2pix.tests.conftest import tiny_ip2p_folder

    from t2i_engine.serve.app import create_app

    root = tmp_path_factory.mktemp("edit-page")
    job = write_edit_job(root, tiny_ip2p_folder(root), steps=2, text_scale=5.0, image_scale=1.5)
    service, worker, _ = start_service(job, edit_plugin_manager())
    try:
        with LiveServer(create_app(service)) as server:
            yield served_page[0], server.url
    finally:
        worker.stop()


def test_an_editor_page_asks_for_the_source_and_s_i(edit_page, tmp_path):
    from plugins.instructpix2pix.tests.conftest import source_png
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver, url = edit_page
    source = source_png(tmp_path / "source.png", seed=1)
    driver.get(url + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text != "")
    assert not driver.find_element(By.ID, "width").is_displayed()  # an edit has the source's size
    uploads = driver.find_elements(By.CSS_SELECTOR, "#uploads input[type=file]")
    assert [u.get_attribute("data-field") for u in uploads] == ["source"]
    assert uploads[0].get_attribute("required") is not None
    s_i = driver.find_element(By.CSS_SELECTOR, "#extra input[data-key=image_guidance_scale]")
    assert s_i.get_attribute("value") == "1.5"
    s_i.clear()
    s_i.send_keys("1.25")
    driver.find_element(By.ID, "prompt").send_keys("make it red in the browser")
    uploads[0].send_keys(str(source))
    driver.find_element(By.ID, "submit").click()
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery .card[data-state=done]")))
    assert card.find_element(By.CSS_SELECTOR, ".inputs img").get_attribute("title") == "source"
    assert "make it red in the browser" in card.text and "1.25" in card.text
    assert driver.find_element(By.ID, "error").text == ""
