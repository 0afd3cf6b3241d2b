"""A served InstructPix2Pix editor (the plugin's ``edit`` generator) through the HTTP client on a
tiny 8-channel model: the image for an uploaded source is diffusers'
StableDiffusionInstructPix2PixPipeline image on the same weights and noise (1e-3 before the PNG,
one 8-bit level in it), the request's ``image_guidance_scale`` acts, the PNG records the source
and s_I and re-runs with ``--from-png``, and bad sources or keys are refused naming the field."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
pytest.importorskip("t2i_plugin_instructpix2pix")
from fastapi.testclient import TestClient  # noqa: E402
from plugins.instructpix2pix.tests.conftest import source_png, tiny_ip2p_folder  # noqa: E402
from tests.serve.support import edit_plugin_manager, start_service, write_edit_job  # noqa: E402

from t2i_engine.pipeline import seeded_noise  # noqa: E402
from t2i_engine.serve.app import create_app  # noqa: E402

STEPS, S_T, JOB_S_I = 6, 5.0, 1.8


@pytest.fixture(scope="module")
def editor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``(client, service, folder, root)``: a served tiny editor (no ``generator`` key: chosen for the model)."""
    root = tmp_path_factory.mktemp("ip2p-serve")
    folder = tiny_ip2p_folder(root)
    job = write_edit_job(root, folder, steps=STEPS, text_scale=S_T, image_scale=JOB_S_I)
    service, worker, _ = start_service(job, edit_plugin_manager())
    try:
        yield TestClient(create_app(service)), service, folder, root
    finally:
        worker.stop()


def _submit(client: TestClient, params: dict[str, Any], files: dict[str, bytes]) -> Any:
    if not files:
        return client.post("/api/generations", json=params)
    return client.post("/api/generations", data={"params": json.dumps(params)},
                       files={k: ("upload.png", v, "image/png") for k, v in files.items()})


def _done(client: TestClient, job_id: str) -> dict[str, Any]:
    with client.stream("GET", f"/api/generations/{job_id}/events") as stream:
        events = [x for x in stream.iter_lines() if x.startswith("event: ")]
    assert events[0] == "event: queued" and events[1] == "event: started" and events[-1] == "event: done", events
    assert events.count("event: step") == STEPS
    return client.get(f"/api/generations/{job_id}").json()


def _reference(folder: Path, source: Path, *, seed: int, s_i: float) -> torch.Tensor:
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(folder), safety_checker=None,
                                                                  requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe(["make it red"], image=Image.open(source), latents=seeded_noise([seed], (4, 8, 8)),
                num_inference_steps=STEPS, guidance_scale=S_T, image_guidance_scale=s_i, output_type="pt").images[0]


def test_info_shows_the_source_upload_and_the_edit_keys(editor):
    client = editor[0]
    info = client.get("/api/info").json()
    assert info["generator"] == "edit"
    assert info["uploads"] == [{"field": "source", "label": "source image to edit (required; the edit has its size)",
                                "required": True}]
    assert "width" not in info["keys"] and "strength" not in info["keys"]
    assert {"prompt", "guidance_scale", "image_guidance_scale", "seed"} <= set(info["keys"])
    assert [e["key"] for e in info["extra"]] == ["image_guidance_scale"]
    assert info["defaults"]["image_guidance_scale"] == JOB_S_I


@pytest.mark.slow
def test_a_served_edit_is_diffusers_edit(editor, monkeypatch):
    import t2i_plugin_instructpix2pix.task as task_module

    client, service, folder, root = editor
    source = source_png(root / "src.png", seed=2)
    made: list[torch.Tensor] = []
    edit_one = task_module.edit_one

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:  # the float image, before the PNG's 8 bits
        made.append(edit_one(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(task_module, "edit_one", recording)
    r = _submit(client, {"prompt": "make it red", "seed": 7, "image_guidance_scale": 1.2},
                {"source": source.read_bytes()})
    assert r.status_code == 202, r.text
    assert r.json()["params"]["image_guidance_scale"] == 1.2 and r.json()["params"]["width"] == 16
    job = _done(client, r.json()["id"])
    ref = _reference(folder, source, seed=7, s_i=1.2)
    assert (made[0][0] / 2 + 0.5 - ref).abs().max() <= 1e-3
    png = Image.open(io.BytesIO(client.get(job["image"]).content))
    want = (ref.permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert np.abs(np.asarray(png).astype(np.int16) - want).max() <= 1
    stored = service.board.get(job["id"]).inputs["source"]
    assert Path(stored).parent == Path(service.builder.inputs_dir)
    assert np.array_equal(np.asarray(Image.open(stored)), np.asarray(Image.open(source).convert("RGB")))
    meta = png.text
    assert (meta["source"], meta["image_guidance_scale"], meta["guidance_scale"]) == (stored, "1.2", str(S_T))
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["sampler"]) == ("make it red", "7", str(STEPS), "ddim")

    # without the key: the job's s_I (1.8), another image
    r = _submit(client, {"prompt": "make it red", "seed": 7}, {"source": source.read_bytes()})
    job = _done(client, r.json()["id"])
    assert job["metadata"]["image_guidance_scale"] == str(JOB_S_I)
    assert (made[1] - made[0]).abs().max() > 1e-2


@pytest.mark.slow
def test_the_png_re_runs_as_an_edit_job(editor):
    from t2i_engine.runner import run_config
    from t2i_engine.utils.recipe import load_png_job

    client, service, _, root = editor
    source = source_png(root / "src3.png", seed=3)
    r = _submit(client, {"prompt": "make it blue", "seed": 4, "image_guidance_scale": 1.1},
                {"source": source.read_bytes()})
    job = _done(client, r.json()["id"])
    served = service.board.get(job["id"]).image
    pm = edit_plugin_manager()
    summary = run_config(load_png_job(served, pm), pm)
    assert np.array_equal(np.asarray(Image.open(summary["images"][0])), np.asarray(Image.open(served)))


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("params,files,message", [
    ({"prompt": "x"}, {}, "source: this server needs this upload"),
    ({"prompt": "x"}, {"source": b"not an image"}, "source: the upload is not a readable image"),
    ({"prompt": "x"}, {"source": _png((1, 16))}, "source: 1x16 pixels; the edit has the source's size"),
    ({"prompt": "x"}, {"source": _png((40, 16))}, "source: 40x16 pixels; the edit has the source's size, so each side "
                                                  "must be between 2 and 32 pixels (task.max_side)"),
    ({"prompt": "x", "width": 16}, {"source": _png((16, 16))}, "request.width: unknown key"),
    ({"prompt": "x", "image_guidance_scale": -1}, {"source": _png((16, 16))}, "request.image_guidance_scale"),
    ({"prompt": "x"}, {"source": _png((16, 16)), "init_image": _png((16, 16))},
     "init_image: not an upload this server takes; valid fields: source"),
])
def test_bad_edit_requests_are_refused_naming_the_field(editor, params, files, message):
    client, service, _, _ = editor
    before = sorted(Path(service.builder.inputs_dir).glob("*")) if Path(service.builder.inputs_dir).exists() else []
    r = _submit(client, params, files)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(message), r.json()["error"]
    after = sorted(Path(service.builder.inputs_dir).glob("*")) if Path(service.builder.inputs_dir).exists() else []
    assert after == before  # a refused request leaves no upload behind
