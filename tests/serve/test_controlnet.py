"""A served ControlNet: the hint a request uploads drives the image, which is diffusers'
StableDiffusionControlNetPipeline image for that hint (8-bit, within 1), not the job's default hint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("t2i_plugin_controlnet")
from fastapi.testclient import TestClient  # noqa: E402
from plugins.controlnet.tests.conftest import hint_png, tiny_controlnet  # noqa: E402
from plugins.sd.tests.conftest import tiny_pipeline  # noqa: E402
from tests.serve.support import start_service  # noqa: E402

from t2i_engine.pipeline import seeded_noise  # noqa: E402
from t2i_engine.plugins.manager import EnginePluginManager  # noqa: E402
from t2i_engine.serve.app import create_app  # noqa: E402


def _pm() -> EnginePluginManager:
    import t2i_plugin_controlnet.plugin
    import t2i_plugin_sd.plugin

    pm = EnginePluginManager()
    pm.load(autoload=False)  # the plugins under test, whether or not they are installed
    pm.register(t2i_plugin_sd.plugin, name="sd")
    pm.register(t2i_plugin_controlnet.plugin, name="controlnet")
    return pm


@pytest.mark.slow
def test_an_uploaded_hint_gives_diffusers_controlnet_image(tmp_path):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    pipe = tiny_pipeline(tokenizer_dir=tmp_path / "tok")
    pipe.save_pretrained(tmp_path / "sd")
    tiny_controlnet(pipe.unet, seed=10).save_pretrained(tmp_path / "cn")
    default = hint_png(tmp_path / "default-hint.png", seed=1)
    uploaded = hint_png(tmp_path / "upload.png", seed=2)
    job = tmp_path / "serve.toml"
    job.write_text(f"""[engine]
plugins = ["sd", "controlnet"]
device = "cpu"
output_dir = "out"
[task]
name = "serve"
width = 16
height = 16
[model]
type = "stable-diffusion"
checkpoint = "{tmp_path / 'sd'}"
preset = "sd-1"
[sampler]
name = "ddim"
steps = 6
[guidance]
guidance_scale = 7.5
[[conditioners]]
type = "controlnet"
checkpoint = "{tmp_path / 'cn'}"
inputs = {{ image = "{default}" }}
scale = 0.7
""")
    service, worker, _ = start_service(job, _pm())
    try:
        client = TestClient(create_app(service))
        assert [u["field"] for u in client.get("/api/info").json()["uploads"]] == ["conditioners.0.image", "init_image"]
        r = client.post("/api/generations", data={"params": json.dumps({"prompt": "a red square", "seed": 7})},
                        files={"conditioners.0.image": ("hint.png", uploaded.read_bytes(), "image/png")})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        with client.stream("GET", f"/api/generations/{job_id}/events") as stream:
            assert [x for x in stream.iter_lines() if x.startswith("event: ")][-1] == "event: done"
        got = np.asarray(Image.open(io.BytesIO(client.get(f"/api/generations/{job_id}/image").content)))
    finally:
        worker.stop()
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        str(tmp_path / "sd"), controlnet=ControlNetModel.from_pretrained(str(tmp_path / "cn")), safety_checker=None,
        requires_safety_checker=False)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)

    def draw(hint: Path) -> np.ndarray:
        image = ref(["a red square"], image=Image.open(hint), latents=seeded_noise([7], (4, 8, 8)),
                    num_inference_steps=6, guidance_scale=7.5, height=16, width=16,
                    controlnet_conditioning_scale=0.7, output_type="np").images[0]
        return (image * 255).round().astype(np.int16)

    assert np.abs(got.astype(np.int16) - draw(uploaded)).max() <= 1
    assert np.abs(got.astype(np.int16) - draw(default)).max() > 2  # the upload, not the job's hint
