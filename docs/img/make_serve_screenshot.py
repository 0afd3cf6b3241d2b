"""Re-make docs/img/serve-page.png: serve examples/serve.toml (the shipped shapes model) on a free
loopback port, make three images through the API and one through the page in headless Chromium,
and save the page (64 colours, to keep the file small).

    PYTHONPATH=.:core:sdk:plugins/sd python docs/img/make_serve_screenshot.py
"""

from __future__ import annotations

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
OUT = ROOT / "docs" / "img" / "serve-page.png"
PROMPTS = ["a red circle on a blue background", "a white square on a purple background",
           "a yellow circle on a green background"]


def main() -> None:
    work = Path(tempfile.mkdtemp())
    job = (ROOT / "examples" / "serve.toml").read_text(encoding="utf-8")
    job = job.replace('"models/', f'"{ROOT}/examples/models/').replace('"../outputs/serve"', f'"{work}/out"')
    (work / "serve.toml").write_text(job, encoding="utf-8")
    service, worker, _ = start_service(work / "serve.toml", EnginePluginManager().load())
    try:
        with LiveServer(create_app(service)) as server:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                for seed, prompt in enumerate(PROMPTS):
                    job_id = client.post("/api/generations", json={"prompt": prompt, "seed": seed}).json()["id"]
                    with client.stream("GET", f"/api/generations/{job_id}/events") as stream:
                        for _ in stream.iter_lines():
                            pass
            driver = browser(tempfile.mkdtemp())
            try:
                driver.set_window_size(1000, 1120)
                driver.get(server.url + "/")
                wait = WebDriverWait(driver, 60)
                wait.until(lambda d: d.find_element(By.ID, "model").text != "")
                driver.find_element(By.ID, "prompt").send_keys("a green triangle on a yellow background")
                driver.find_element(By.ID, "seed").send_keys("5")
                driver.find_element(By.ID, "submit").click()
                wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card img[src^=blob]")) == 4)
                driver.save_screenshot(str(work / "page.png"))
            finally:
                driver.quit()
    finally:
        worker.stop()
    Image.open(work / "page.png").convert("RGB").quantize(colors=64).save(OUT, optimize=True)
    print(OUT, OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
