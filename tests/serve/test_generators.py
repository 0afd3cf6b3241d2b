"""Which generator a serve job gets: ``[task] generator`` names one (a model it does not fit is an
error naming the key), else the one a plugin registered (``register_generators``) that claims the
model, else the core's ``text-to-image``; two claimants make the key required. A plugin's
generator drives the whole request path (its keys, uploads, image and PNG text)."""

from __future__ import annotations

import types
from typing import Any

import attrs
import pytest
from PIL import Image
from tests.serve.support import plugin_manager, start_service, write_job

from t2i_engine.config.fields import option
from t2i_engine.errors import ConfigError
from t2i_engine.hookspecs import hookimpl
from t2i_engine.serve.generators import Upload

pytest.importorskip("fastapi")


@attrs.frozen
class FlatRequest:
    prompt: str = option(help="the prompt")
    shade: int = option(default=0, help="the grey level")
    seed: int | None = option(default=None, help="ignored")


class Flat:
    """A generator that paints the grey level ``shade`` at the size of its required upload ``canvas``."""

    Request = FlatRequest

    @staticmethod
    def accepts(model: Any) -> bool:
        return True

    def setup(self, resident: Any) -> None:
        self.resident = resident

    def uploads(self, config: Any) -> list[Upload]:
        return [Upload("canvas", "canvas", required=True)]

    def defaults(self, config: Any) -> dict[str, Any]:
        return {"shade": 0}

    def prepare(self, draft: Any) -> tuple[Any, dict[str, Any]]:
        from t2i_engine.config.schema import ComponentConfig

        task = ComponentConfig(kind="task", name="flat", options=draft.request, plugin="serve-test-generators")
        return attrs.evolve(draft.config, task=task), {"shade": draft.request.shade}

    def generate(self, ctx: Any, sampler: Any, progress: Any) -> tuple[Any, dict[str, str]]:
        callback = progress(1)
        callback({"i": 0, "sigma": 0.0})
        shade = ctx.config.task.options.shade  # the prepared job carries the request
        return Image.new("RGB", (8, 8), (shade,) * 3), {"made-by": "flat", "shade": str(shade)}


def _pm(generators: dict[str, Any]) -> Any:
    pm = plugin_manager()
    module = types.ModuleType("serve_test_generators")
    module.register_generators = hookimpl(lambda: generators)  # type: ignore[attr-defined]
    pm.register(module, name="serve-test-generators")
    return pm


def test_default_is_text_to_image(served):
    service, worker, _ = served
    assert (worker.generator_name, service.info["generator"]) == ("text-to-image", "text-to-image")
    assert "width" in service.info["keys"] and service.info["extra"] == []


def test_a_named_generator_must_fit_the_model(tmp_path):
    job = write_job(tmp_path, conditioners=False, extra='generator = "edit"')
    with pytest.raises(ConfigError, match=r"model.checkpoint: InstructPix2Pix needs a UNet with 8 input channels "
                                          r"\(noisy latent \+ source latent\); this one has 4"):
        start_service(job, plugin_manager())
    job = write_job(tmp_path, conditioners=False, extra='generator = "edt"')
    with pytest.raises(ConfigError, match=r"task.generator: unknown generator 'edt' \(did you mean 'edit'\?\)"):
        start_service(job, plugin_manager())


def test_two_claimants_need_the_key(tmp_path):
    job = write_job(tmp_path, conditioners=False)
    with pytest.raises(ConfigError, match="task.generator: the generators 'flat-a', 'flat-b' all take this model"):
        start_service(job, _pm({"flat-a": Flat, "flat-b": Flat}))
    service, worker, _ = start_service(write_job(tmp_path / "b", conditioners=False, extra='generator = "flat-b"'),
                                       _pm({"flat-a": Flat, "flat-b": Flat}))
    worker.stop()
    assert service.info["generator"] == "flat-b"


def test_a_plugin_generator_serves_through_the_api(tmp_path):
    import io
    import json

    from fastapi.testclient import TestClient

    from t2i_engine.serve.app import create_app

    service, worker, _ = start_service(write_job(tmp_path, conditioners=False), _pm({"flat": Flat}))
    try:
        client = TestClient(create_app(service))
        info = client.get("/api/info").json()
        assert (info["generator"], info["keys"]) == ("flat", ["prompt", "shade", "seed"])
        assert info["uploads"] == [{"field": "canvas", "label": "canvas", "required": True}]
        assert info["defaults"]["shade"] == 0
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        r = client.post("/api/generations", data={"params": json.dumps({"prompt": "p", "shade": 77})},
                        files={"canvas": ("c.png", buffer.getvalue(), "image/png")})
        assert r.status_code == 202, r.text
        assert r.json()["params"]["shade"] == 77
        with client.stream("GET", r.json()["events"]) as stream:
            events = [x for x in stream.iter_lines() if x.startswith("event: ")]
        assert events == ["event: queued", "event: started", "event: step", "event: done"]
        png = Image.open(io.BytesIO(client.get(f"/api/generations/{r.json()['id']}/image").content))
        assert png.getpixel((0, 0)) == (77, 77, 77)
        assert png.text == {"made-by": "flat", "shade": "77"}
    finally:
        worker.stop()
