"""The HTTP API of ``t2i-engine serve`` over the tiny model: submit, events in order, the PNG and
its metadata against the request (read back by an independent A1111 parser, and re-run through
``--from-png`` to the same pixels), uploads reaching the conditioner, cancel, a full queue, bad
input, the bearer token, and that nothing a client names becomes a path."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tests.serve.support import HintRecorder
from tests.test_png_metadata import parse_a1111

from t2i_engine.utils.images import from_pil

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from t2i_engine.serve.app import Service, create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(served: Any) -> TestClient:
    return TestClient(create_app(served[0]))


def events(client: TestClient, job_id: str, **headers: str) -> list[tuple[str, dict[str, Any]]]:
    """Every server-sent event of a generation, up to its last."""
    out, kind = [], None
    with client.stream("GET", f"/api/generations/{job_id}/events", headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def submit(client: TestClient, params: dict[str, Any], files: dict[str, Any] | None = None) -> Any:
    if files is None:
        return client.post("/api/generations", json=params)
    return client.post("/api/generations", data={"params": json.dumps(params)}, files=files)


def test_submit_streams_events_in_order_and_the_png_records_the_request(client, served, gate):
    request = {"prompt": "a red square", "negative_prompt": "blurry", "width": 24, "height": 16, "steps": 3,
               "sampler": "euler", "guidance_scale": 5.0, "seed": 1234}
    gate.hold, gate.release = True, type(gate.release)()
    gate.waiting.clear()
    r = submit(client, request)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    # held inside step 1, after its event was logged: a finished job's log drops its previews
    # (the image replaces them), so the preview is read while the job runs
    assert gate.waiting.wait(60)
    live = [dict(e["data"]) for e in served[0].board.get(job).events if e["event"] == "step"]  # copies
    gate.hold = False
    gate.release.set()
    got = events(client, job)
    kinds = [k for k, _ in got]
    assert kinds == ["queued", "started", "step", "step", "step", "done"]
    steps = [d for k, d in got if k == "step"]
    assert [(d["step"], d["total"]) for d in steps] == [(1, 3), (2, 3), (3, 3)]
    preview = live[0]["preview"]  # preview_every = 1: every step but the last, which the PNG shows
    assert preview.startswith("data:image/png;base64,")
    import base64

    assert Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1]))).size == (16, 11)  # 24x16 in 16 px
    image = client.get(f"/api/generations/{job}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    pil = Image.open(io.BytesIO(image.content))
    assert pil.size == (24, 16)
    text = pil.text  # type: ignore[attr-defined]
    assert (text["prompt"], text["negative_prompt"], text["seed"], text["sampler"], text["steps"],
            text["guidance_scale"]) == ("a red square", "blurry", "1234", "euler", "3", "5.0")
    a1111 = parse_a1111(text["parameters"])  # the A1111 reader written from its documented format
    assert (a1111["Prompt"], a1111["Negative prompt"], a1111["Seed"], a1111["Steps"], a1111["Sampler"],
            a1111["CFG scale"], a1111["Size-1"], a1111["Size-2"]) == (
        "a red square", "blurry", "1234", "3", "Euler", "5.0", "24", "16")
    status = client.get(f"/api/generations/{job}").json()
    assert status["state"] == "done" and status["metadata"] == dict(text)
    assert status["params"] == {**request, "guidance_scale": 5.0}


def test_the_png_reruns_to_the_same_pixels_as_a_sample_job(client, served):
    """The recorded job is a ``sample`` job: ``--from-png`` runs it through the sample task."""
    from t2i_engine.runner import run_config
    from t2i_engine.utils.recipe import load_png_job

    service, _, ctx = served
    job = submit(client, {"prompt": "a blue circle", "seed": 7}).json()["id"]
    assert events(client, job)[-1][0] == "done"
    path = Path(ctx.output_dir) / f"{job}.png"
    config = load_png_job(path, ctx.plugins)
    assert config.task.name == "sample"
    rerun = run_config(config, ctx.plugins)["images"]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(rerun[0])))


def test_an_upload_reaches_the_conditioner_and_is_kept_under_a_server_made_name(client, served):
    ctx = served[2]
    HintRecorder.seen.clear()
    r = submit(client, {"prompt": "x", "seed": 1}, files={"conditioners.0.hint": ("../../../etc/evil.png",
                                                                                png((255, 0, 0)), "image/png")})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert events(client, job)[-1][0] == "done"
    red = from_pil(Image.new("RGB", (16, 16), (255, 0, 0)))[None]
    assert torch_equal(HintRecorder.seen[-1], red)
    stored = client.get(f"/api/generations/{job}/inputs/conditioners.0.hint")
    assert stored.status_code == 200 and Image.open(io.BytesIO(stored.content)).getpixel((0, 0)) == (255, 0, 0)
    # the next request without an upload gets the job's own hint (grey) again
    job2 = submit(client, {"prompt": "x", "seed": 1}).json()["id"]
    assert events(client, job2)[-1][0] == "done"
    assert torch_equal(HintRecorder.seen[-1], from_pil(Image.new("RGB", (16, 16), (128, 128, 128)))[None])
    out = Path(ctx.output_dir)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert f"inputs/{job}-0.png" in names
    assert not any("evil" in n or n.startswith("..") for n in names)
    assert not (out.parent / "etc").exists()


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a.float().cpu(), b.float().cpu()))


def test_cancel_and_a_full_queue(client, served, gate):
    """The first generation is held at its first step (a hook), so the queue fills: 2 waiting,
    the next refused with 429. Cancelling a waiting one removes it at once; cancelling the running
    one stops it at its next step; the other waiting one then runs to the end."""
    gate.hold, gate.release = True, type(gate.release)()
    gate.waiting.clear()
    running = submit(client, {"prompt": "held", "seed": 1}).json()["id"]
    assert gate.waiting.wait(60)
    waiting = [submit(client, {"prompt": f"w{i}", "seed": i}) for i in range(2)]
    assert [r.status_code for r in waiting] == [202, 202]
    full = submit(client, {"prompt": "one too many"})
    assert full.status_code == 429 and "queue is full" in full.json()["error"] and full.headers["retry-after"]
    first, second = (r.json()["id"] for r in waiting)
    assert client.delete(f"/api/generations/{second}").status_code == 202
    assert [k for k, _ in events(client, second)] == ["queued", "cancelled"]
    assert client.delete(f"/api/generations/{running}").status_code == 202
    gate.hold = False
    gate.release.set()
    kinds = [k for k, _ in events(client, running)]
    assert kinds[0] == "queued" and kinds[-1] == "cancelled" and "done" not in kinds
    assert client.get(f"/api/generations/{running}/image").status_code == 404
    assert events(client, first)[-1][0] == "done"
    assert client.delete(f"/api/generations/{first}").status_code == 409  # finished already
    states = {j["id"]: j["state"] for j in client.get("/api/generations").json()["generations"]}
    assert (states[running], states[first], states[second]) == ("cancelled", "done", "cancelled")


@pytest.mark.parametrize(("params", "status", "message"), [
    ({"promt": "x"}, 422, "request.promt: unknown key (did you mean 'prompt'?)"),
    ({"prompt": "x", "width": 4}, 422, "request.width: must be between 8 and 16384 pixels: 4"),
    ({"prompt": "x", "width": 17}, 422, "request.width/height: must be multiples of 2"),
    ({"prompt": "x", "width": 2048}, 422, "request.width: at most 1024 pixels on this server"),
    ({"prompt": "x", "steps": 0}, 422, "request.steps: must be >= 1: 0"),
    ({"prompt": "x", "steps": 500}, 422, "request.steps: at most 150 on this server"),
    ({"prompt": "x", "sampler": "ddin"}, 422, "sampler.name: unknown sampler 'ddin' (did you mean 'ddim'?)"),
    ({"prompt": "x", "seed": -1}, 422, "request.seed: must be between 0 and 2**63-1"),
    ({"prompt": 3}, 422, "request.prompt: expected a string, got 3"),
    ({"prompt": "x", "guidance_scale": "high"}, 422, "request.guidance_scale: expected a number"),
    ({}, 422, "request.prompt: required key is missing"),
    (["x"], 400, "request: expected a JSON object, got list"),
])
def test_bad_parameters_get_the_job_file_message(client, params, status, message):
    r = client.post("/api/generations", json=params)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_bad_bodies_and_uploads(client, served):
    out = Path(served[2].output_dir)
    before = sorted(p.name for p in (out / "inputs").glob("*")) if (out / "inputs").exists() else []
    r = client.post("/api/generations", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/api/generations", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/api/generations", files={"init_image": ("a.png", png((0, 0, 0)), "image/png")})
    assert r.status_code == 400 and "no 'params' field" in r.json()["error"]
    r = submit(client, {"prompt": "x"}, files={"init_image": ("a.png", b"not an image", "image/png")})
    assert r.status_code == 422 and r.json()["error"].startswith("init_image: the upload is not a readable image")
    r = submit(client, {"prompt": "x"}, files={"../secret": ("a.png", png((0, 0, 0)), "image/png")})
    assert r.status_code == 422 and "not an upload this server takes; valid fields: conditioners.0.hint, " \
        "init_image" in r.json()["error"]
    r = submit(client, {"prompt": "x"}, files={"init_image": ("big.png", b"\0" * 300_000, "image/png")})
    assert r.status_code == 413 and "task.max_upload_bytes" in r.json()["error"]
    after = sorted(p.name for p in (out / "inputs").glob("*")) if (out / "inputs").exists() else []
    assert after == before  # a refused request leaves no file behind
    assert client.get("/api/generations/../../etc/passwd").status_code == 404
    assert client.get("/api/generations/nope/image").status_code == 404
    assert client.get("/api/generations/nope/inputs/..%2F..%2Fserve.toml").status_code == 404


def test_img2img_upload_records_the_source_and_strength(client, served):
    r = submit(client, {"prompt": "x", "seed": 2, "strength": 0.5},
               files={"init_image": ("x.png", png((0, 255, 0), size=40), "image/png")})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    got = events(client, job)
    assert got[-1][0] == "done" and got[1][1]["total"] == 1  # half of the 2 steps
    text = Image.open(io.BytesIO(client.get(f"/api/generations/{job}/image").content)).text  # type: ignore[attr-defined]
    assert text["strength"] == "0.5" and text["init_image"] == str(Path(served[2].output_dir) / "inputs" /
                                                                      f"{job}-0.png")
    assert parse_a1111(text["parameters"])["Denoising strength"] == "0.5"


def test_bearer_token(served):
    service = served[0]
    locked = TestClient(create_app(Service(board=service.board, builder=service.builder, info=service.info,
                                           token="s3cret")))
    assert locked.get("/").status_code == 200  # the page itself holds no data
    assert locked.get("/static/app.js").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        r = locked.get("/api/generations", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["error"]
        assert locked.post("/api/generations", json={"prompt": "x"}, headers=headers).status_code == 401
    assert locked.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_token_env_must_be_set(tmp_path, monkeypatch):
    from tests.serve.support import plugin_manager, write_job

    from t2i_engine.config.loader import load_config
    from t2i_engine.errors import ConfigError
    from t2i_engine.serve.task import _token

    monkeypatch.delenv("T2I_TEST_TOKEN", raising=False)
    config = load_config(write_job(tmp_path, extra='token_env = "T2I_TEST_TOKEN"'), plugin_manager())
    with pytest.raises(ConfigError, match="task.token_env: the environment variable 'T2I_TEST_TOKEN' is not set"):
        _token(config.task.options)
    monkeypatch.setenv("T2I_TEST_TOKEN", "abc")
    assert _token(config.task.options) == "abc"


def test_info_lists_defaults_and_uploads(client):
    info = client.get("/api/info").json()
    assert info["defaults"] | {} == {"negative_prompt": "", "width": 16, "height": 16, "sampler": "ddim", "steps": 2,
                                     "guidance_scale": 7.5, "strength": 0.8}
    assert [u["field"] for u in info["uploads"]] == ["conditioners.0.hint", "init_image"]
    assert "ddim" in info["samplers"] and info["queue"]["size"] == 2


def test_the_jobs_own_defaults_must_fit_the_servers_limits(tmp_path):
    from tests.serve.support import plugin_manager, start_service, write_job

    from t2i_engine.errors import ConfigError

    for extra, message in (("max_steps = 1", r"task.max_steps: 1 is below the job's own sampler.steps \(2\)"),
                           ("max_side = 8", r"task.width: 16 is above task.max_side \(8\)")):
        with pytest.raises(ConfigError, match=message):
            start_service(write_job(tmp_path / extra[:8], extra=extra), plugin_manager())
