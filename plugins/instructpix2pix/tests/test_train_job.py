"""``edit-train`` end to end on tiny models: a 4-channel SD folder grows to an 8-channel editor
and trains 2 steps on an edit-triplet folder; an interrupted run resumed equals an uninterrupted
one; each task key acts; what the task cannot use is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config
from t2i_plugin_instructpix2pix import plugin
from t2i_plugin_sd.formats import load_checkpoint

from .conftest import tiny_ip2p_folder
from .test_datasets import _folder

pytestmark = pytest.mark.filterwarnings("ignore:.*yaml cannot express", "ignore:.*does not have many workers")


def _pm() -> EnginePluginManager:
    import t2i_plugin_sd.plugin

    pm = EnginePluginManager()
    pm.load(autoload=False)
    pm.register(t2i_plugin_sd.plugin, name="sd")
    pm.register(plugin, name="instructpix2pix")
    return pm


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("triplets") / "data", n_prompts=4)


def _job(tmp_path: Path, checkpoint: Path, data: Path, *, task: str = "", train: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = tmp_path / "job.toml"
    job.write_text(f"""[engine]
plugins = ["sd", "instructpix2pix"]
device = "cpu"
seed = 3
output_dir = "{tmp_path / 'out'}"
[task]
name = "edit-train"
export = "edit"
{task}
[model]
type = "stable-diffusion"
checkpoint = "{checkpoint}"
preset = "sd-1"
[data]
type = "ip2p-folder"
root = "{data}"
split = "all"
extension = "png"
resolution = 16
crop = "random"
hflip = true
[train]
accelerator = "cpu"
max_steps = 2
batch_size = 2
lr = 1e-3
ema = false
checkpoint_every = 1
progress_bar = false
{train}""")
    return job


def _run(job: Path, *sets: str) -> dict:
    pm = _pm()
    return dict(run_config(load_config(job, pm, overrides=list(sets)), pm))


def _unet(path: str, fmt: str | None = None) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, format=fmt).unet


def test_two_steps_from_sd_make_an_edit_model(sd1_folder, triplets, tmp_path):
    _, folder = sd1_folder
    summary = _run(_job(tmp_path, folder, triplets))
    assert summary["step"] == 2 and summary["loss"] == summary["loss"]
    unet, sd = _unet(summary["exported"]), _unet(str(folder))
    assert unet["conv_in.weight"].shape[1] == 8
    assert unet["conv_in.weight"][:, 4:].abs().sum() > 0  # the source channels trained away from zero
    assert not torch.equal(unet["conv_in.weight"][:, :4], sd["conv_in.weight"])
    # the exported folder is an edit model for the edit path
    from t2i_plugin_instructpix2pix.edit import check_edit_model
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    check_edit_model(build_model(load_checkpoint(summary["exported"]), PRESETS["sd-1"]))


def test_resume_equals_an_uninterrupted_run(sd1_folder, triplets, tmp_path):
    _, folder = sd1_folder
    whole = _run(_job(tmp_path / "whole", folder, triplets), "train.max_steps=4", "train.ema=true")
    job = _job(tmp_path / "parts", folder, triplets, train="resume = true")
    _run(job, "train.ema=true")  # 2 steps, checkpointed
    resumed = _run(job, "train.max_steps=4", "train.ema=true")
    assert resumed["step"] == 4
    a, b = _unet(whole["exported"]), _unet(resumed["exported"])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_task_keys_act(sd1_folder, triplets, tmp_path):
    _, folder = sd1_folder
    base = _run(_job(tmp_path / "base", folder, triplets))
    text_before = load_checkpoint(str(folder)).text
    text_after = load_checkpoint(base["exported"]).text
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)  # frozen by default
    trained = load_checkpoint(_run(_job(tmp_path / "te", folder, triplets, task="train_text_encoder = true"))["exported"]).text
    assert any(not torch.equal(text_before[k], trained[k]) for k in text_before)
    dropped = _unet(_run(_job(tmp_path / "p", folder, triplets, task="conditioning_dropout = 0.3"))["exported"])
    assert not torch.equal(dropped["conv_in.weight"], _unet(base["exported"])["conv_in.weight"])
    cached = _unet(_run(_job(tmp_path / "c", folder, triplets, task="cache_latents = 8"))["exported"])
    assert not torch.equal(cached["conv_in.weight"], _unet(base["exported"])["conv_in.weight"])
    single = _run(_job(tmp_path / "s", folder, triplets, task='export_format = "single-file"\nexport_dtype = "float16"'),
                  'task.export="edit.safetensors"')
    unet = _unet(single["exported"], "single-file")
    assert unet["conv_in.weight"].dtype == torch.float16 and unet["conv_in.weight"].shape[1] == 8


def test_ema_key_picks_the_starting_weights(ema_file, triplets, tmp_path):
    """From a timbrooks-style file: ema = true trains from the model_ema.* UNet, false from the
    trained one (0 steps of change are not possible, so compare after the same 2 steps)."""
    path, _, _ = ema_file
    a = _unet(_run(_job(tmp_path / "ema", path, triplets))["exported"])
    b = _unet(_run(_job(tmp_path / "raw", path, triplets, task="ema = false"))["exported"])
    assert not torch.equal(a["conv_in.weight"], b["conv_in.weight"])


def test_refusals(sd1_folder, triplets, tmp_path):
    _, folder = sd1_folder
    with pytest.raises(ConfigError, match="train.sample_every"):
        _run(_job(tmp_path / "g", folder, triplets, train='sample_every = 1\nsample_prompts = ["x"]'))
    inpaint = tiny_ip2p_folder(tmp_path / "inpaint", in_channels=9)
    with pytest.raises(ConfigError, match="inpainting"):
        _run(_job(tmp_path / "i", inpaint, triplets))
    with pytest.raises(ConfigError, match="conditioning_dropout"):
        _run(_job(tmp_path / "d", folder, triplets, task="conditioning_dropout = 0.5"))


def test_an_interrupted_run_exports_nothing(sd1_folder, triplets, tmp_path, monkeypatch):
    """A run stopped early (SIGTERM: the loop checkpoints and returns interrupted) leaves the
    export alone; the resumed run writes it."""
    import t2i_engine.training.loop as loop

    real = loop.fit

    def stopped(*args, **kwargs):
        return {**real(*args, **kwargs), "interrupted": True}

    _, folder = sd1_folder
    job = _job(tmp_path, folder, triplets)
    monkeypatch.setattr(loop, "fit", stopped)
    summary = _run(job)
    assert summary["interrupted"] and "exported" not in summary
    assert not (tmp_path / "out" / "edit").exists()
    monkeypatch.setattr(loop, "fit", real)
    assert Path(_run(job)["exported"]).exists()
