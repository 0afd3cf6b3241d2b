"""``controlnet-eval`` on a tiny model: its summary, the keys that change it, and the IoU it reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config
from t2i_plugin_controlnet import plugin
from t2i_plugin_controlnet.eval_task import iou


def _run(tmp_path: Path, sd: Path, net: Path, *sets: str, data: str = 'type = "controlnet-shapes"') -> dict:
    import t2i_plugin_sd.plugin

    tmp_path.mkdir(parents=True, exist_ok=True)
    job = tmp_path / "eval.toml"
    job.write_text(f"""[engine]
plugins = ["sd", "controlnet"]
device = "cpu"
output_dir = "{tmp_path / 'out'}"
[task]
name = "controlnet-eval"
controlnet = "{net}"
count = 3
batch_size = 2
[model]
type = "stable-diffusion"
checkpoint = "{sd}"
preset = "sd-1"
[data]
{data}
size = 16
count = 10
[sampler]
name = "ddim"
steps = 3
[guidance]
guidance_scale = 2.0
""")
    pm = EnginePluginManager()
    pm.load(autoload=False)
    pm.register(t2i_plugin_sd.plugin, name="sd")
    pm.register(plugin, name="controlnet")
    return dict(run_config(load_config(job, pm, overrides=sets), pm))


def test_iou_of_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b[:2, :] = True
    assert iou(a, b) == 0.5 and iou(a, a) == 1.0 and iou(b & False, a & False) == 1.0 and iou(a, ~a) == 0.0


def test_an_eval_job_scores_with_and_without(sd_controlnets, tmp_path):
    sd, (net, _) = sd_controlnets
    out = _run(tmp_path, sd, net)
    assert out["images"] == 3 and set(out["with"]) == {"iou", "colour", "background", "shape", "all"}
    assert 0 <= out["with"]["iou"] <= 1 and Path(out["grid"]).is_file()
    assert out["with"] != out["without"]  # the ControlNet acts
    zero = _run(tmp_path / "zero", sd, net, "task.scale=0.0")
    assert zero["with"] == zero["without"]  # scale 0: exactly no ControlNet
    alone = _run(tmp_path / "alone", sd, net, "task.compare_without=false", 'task.grid=""')
    assert "without" not in alone and "grid" not in alone and alone["with"] == out["with"]
    # a step window that keeps none of the 3 steps (the core's rule): exactly no ControlNet
    late = _run(tmp_path / "late", sd, net, "task.start=0.99", "task.compare_without=false")
    early = _run(tmp_path / "early", sd, net, "task.end=0.01", "task.compare_without=false")
    assert late["with"] == early["with"] == out["without"]


def test_eval_window_must_be_ordered(sd_controlnets, tmp_path):
    sd, (net, _) = sd_controlnets
    with pytest.raises(ConfigError, match="end"):
        _run(tmp_path, sd, net, "task.start=0.6", "task.end=0.5")


def test_eval_needs_the_shapes_hints(sd_controlnets, tmp_path):
    sd, (net, _) = sd_controlnets
    with pytest.raises(ConfigError, match="controlnet-shapes"):
        _run(tmp_path, sd, net, data='type = "shapes"')


def test_the_targets_decide_targets_met(sd_controlnets, tmp_path):
    sd, (net, _) = sd_controlnets
    low = ("task.iou_target=0.0", "task.colour_target=0.0", "task.shape_target=0.0", "task.compare_without=false")
    assert _run(tmp_path / "a", sd, net, *low)["targets_met"] is True
    for key in ("iou_target", "colour_target", "shape_target"):
        assert _run(tmp_path / key, sd, net, *low, f"task.{key}=1.01")["targets_met"] is False
