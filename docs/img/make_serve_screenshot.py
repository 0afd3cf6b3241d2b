"""Re-make the screenshots of docs/serving.md: serve a shipped example job on a free loopback port,
make three images through the API and one through the page in headless Chromium, and save the
page (64 colours, to keep the file small).

    PYTHONPATH=.:core:sdk:plugins/sd:plugins/instructpix2pix python docs/img/make_serve_screenshot.py
    ... docs/img/make_serve_screenshot.py --edit   # the shapes editor (examples/serve-edit.toml)

The first writes docs/img/serve-page.png (examples/serve.toml, the quickstart model), the second
docs/img/serve-edit-page.png (three held-out edits of examples/ip2p-sources through the API, a
fourth uploaded through the page's source field).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from tests.serve.support import LiveServer, start_service
from tests.serve.test_page import browser

from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.serve.app import create_app

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "examples" / "ip2p-sources"
# (job, output, API requests as (prompt, source or None), the page's prompt and source)
SHOTS = {
    "text": ("serve.toml", "serve-page.png",
             [("a red circle on a blue background", None), ("a white square on a purple background", None),
              ("a yellow circle on a green background", None)],
             ("a green triangle on a yellow background", None)),
    "edit": ("serve-edit.toml", "serve-edit-page.png",
             [("make the circle green", "0-white-circle-on-yellow.png"),
              ("make the background purple", "1-white-triangle-on-green.png"),
              ("turn the circle into a triangle", "2-red-circle-on-blue.png")],
             ("make the triangle red", "3-blue-triangle-on-purple.png")),
}


def _submit(client: httpx.Client, prompt: str, source: str | None, seed: int) -> str:
    params = {"prompt": prompt, "seed": seed}
    if source is None:
        return client.post("/api/generations", json=params).json()["id"]
    png = (SOURCES / source).read_bytes()
    return client.post("/api/generations", data={"params": json.dumps(params)},
                       files={"source": (source, png, "image/png")}).json()["id"]


def _job(name: str, work: Path) -> Path:
    job = (ROOT / "examples" / name).read_text(encoding="utf-8")
    job = job.replace('"models/', f'"{ROOT}/examples/models/').replace(f'"../outputs/{name.removesuffix(".toml")}"', f'"{work}/out"')
    (work / name).write_text(job, encoding="utf-8")
    return work / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edit", action="store_true", help="the editor's page (examples/serve-edit.toml)")
    kind = "edit" if parser.parse_args().edit else "text"
    job_name, out_name, requests, (page_prompt, page_source) = SHOTS[kind]
    work = Path(tempfile.mkdtemp())
    service, worker, _ = start_service(_job(job_name, work), EnginePluginManager().load())
    try:
        with LiveServer(create_app(service)) as server:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for seed, (prompt, source) in enumerate(requests):
                    job_id = _submit(client, prompt, source, seed)
                    with client.stream("GET", f"/api/generations/{job_id}/events") as stream:
                        for _ in stream.iter_lines():
                            pass
            driver = browser(tempfile.mkdtemp())
            try:
                driver.set_window_size(1000, 1120)
                driver.get(server.url + "/")
                wait = WebDriverWait(driver, 60)
                wait.until(lambda d: d.find_element(By.ID, "model").text != "")
                driver.find_element(By.ID, "prompt").send_keys(page_prompt)
                driver.find_element(By.ID, "seed").send_keys("5")
                if page_source is not None:
                    driver.find_element(By.CSS_SELECTOR, "#uploads input[data-field=source]").send_keys(
                        str(SOURCES / page_source))
                driver.find_element(By.ID, "submit").click()
                wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card[data-state=done]")) == 4)
                driver.save_screenshot(str(work / "page.png"))
            finally:
                driver.quit()
    finally:
        worker.stop()
    out = ROOT / "docs" / "img" / out_name
    Image.open(work / "page.png").convert("RGB").quantize(colors=64).save(out, optimize=True)
    print(out, out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
