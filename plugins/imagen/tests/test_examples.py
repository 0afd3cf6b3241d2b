"""The shipped Imagen example jobs load and validate (keys, types, paths), and the shipped demo
weights are what the docs say: float16 stage files that rebuild from their own metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
JOBS = sorted(EXAMPLES.glob("imagen-*.toml"))


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_example_job_validates(job):
    import t2i_plugin_imagen.plugin as plugin
    from t2i_engine.config.loader import load_config
    from t2i_engine.plugins.manager import EnginePluginManager

    pm = EnginePluginManager().load(autoload=False)
    pm.register(plugin, name="imagen", distribution="t2i-plugin-imagen")
    config = load_config(job, pm)
    assert config.task.name in ("train", "imagen-cascade", "imagen-shapes-eval")


@pytest.mark.parametrize("name", ["base", "sr"])
def test_shipped_demo_stages(name):
    from safetensors.torch import load_file

    from t2i_plugin_imagen.stage import load_imagen_stage

    path = EXAMPLES / "models" / f"imagen-shapes-{name}.safetensors"
    assert all(t.dtype == torch.float16 for t in load_file(str(path)).values())
    stage = load_imagen_stage(str(path))
    assert (stage.image_size, stage.lowres_size) == ((32, None) if name == "base" else (64, 32))


def test_demo_weights_fit_the_budget():
    total = sum((EXAMPLES / "models" / f"imagen-shapes-{n}.safetensors").stat().st_size for n in ("base", "sr"))
    assert total <= 15 * 2**20
