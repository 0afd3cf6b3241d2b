"""An ``edit`` job end to end: the PNG it writes is diffusers' StableDiffusionInstructPix2PixPipeline
image (8-bit); each of its keys changes the image; keys it does not apply are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.pipeline import seeded_noise
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config
from t2i_plugin_instructpix2pix import plugin

from .conftest import source_png, tiny_ip2p_folder


def _pm() -> EnginePluginManager:
    import t2i_plugin_sd.plugin

    pm = EnginePluginManager()
    pm.load(autoload=False)  # the plugins under test, whether or not they are installed
    pm.register(t2i_plugin_sd.plugin, name="sd")
    pm.register(plugin, name="instructpix2pix")
    return pm


def _job(tmp_path: Path, folder: Path, src: Path, guidance: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = tmp_path / "job.toml"
    job.write_text(f"""[engine]
plugins = ["sd", "instructpix2pix"]
device = "cpu"
output_dir = "{tmp_path / 'out'}"
[task]
name = "edit"
sources = ["{src}"]
prompts = ["make it red"]
seeds = [7]
[model]
type = "stable-diffusion"
checkpoint = "{folder}"
preset = "sd-1"
[sampler]
name = "ddim"
steps = 6
[guidance]
{guidance}""")
    return job


def _run(job: Path, *sets: str) -> np.ndarray:
    pm = _pm()
    summary = run_config(load_config(job, pm, overrides=sets), pm)
    return np.array(Image.open(summary["images"][0])).astype(np.int16)


def test_an_edit_job_draws_diffusers_image(ip2p_folder, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

    src = source_png(tmp_path / "src.png", seed=2)
    got = _run(_job(tmp_path, ip2p_folder, src))  # defaults: s_T 7.5, s_I 1.5
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(ip2p_folder), safety_checker=None,
                                                                  requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(["make it red"], image=Image.open(src), latents=seeded_noise([7], (4, 8, 8)), num_inference_steps=6,
               output_type="np").images[0]
    assert got.shape == (16, 16, 3)
    assert np.abs(got - (ref * 255).round().astype(np.int16)).max() <= 1


@pytest.mark.parametrize("key", ["guidance_scale = 3.0", "image_guidance_scale = 1.2"])
def test_each_scale_acts(ip2p_folder, tmp_path, key):
    src = source_png(tmp_path / "src.png", seed=2)
    base = _run(_job(tmp_path / "base", ip2p_folder, src))
    assert np.abs(_run(_job(tmp_path / "k", ip2p_folder, src, key)) - base).max() > 2


def test_negative_prompt_acts(ip2p_folder, tmp_path):
    src = source_png(tmp_path / "src.png", seed=2)
    job = _job(tmp_path, ip2p_folder, src)
    assert np.abs(_run(job) - _run(job, 'task.negative_prompt="blurry"')).max() > 2


def test_unused_guidance_key_refused(ip2p_folder, tmp_path):
    src = source_png(tmp_path / "src.png", seed=2)
    with pytest.raises(ConfigError, match="guidance.guidance_rescale"):
        _run(_job(tmp_path, ip2p_folder, src, "guidance_rescale = 0.7"))


def test_counts_and_models_checked(ip2p_folder, tmp_path):
    src = source_png(tmp_path / "src.png", seed=2)
    with pytest.raises(ConfigError, match="one instruction per source"):
        _run(_job(tmp_path, ip2p_folder, src), 'task.prompts=["a", "b"]')
    inpaint = tiny_ip2p_folder(tmp_path / "inpaint", in_channels=9)
    with pytest.raises(ConfigError, match="inpainting"):
        _run(_job(tmp_path / "i", inpaint, src))
    with pytest.raises(ConfigError, match=r"task.sources\[0\]"):
        _run(_job(tmp_path / "m", ip2p_folder, tmp_path / "job.toml"))


@pytest.mark.filterwarnings("ignore:.*yaml cannot express")
def test_ema_key_acts(ema_file, tmp_path):
    """A checkpoint with model_ema.* keys edits with the EMA UNet by default; ema = false takes
    the trained one (the fixture's two UNets differ)."""
    path, _, _ = ema_file
    src = source_png(tmp_path / "src.png", seed=2)
    job = _job(tmp_path, path, src)
    assert np.abs(_run(job) - _run(job, "task.ema=false")).max() > 2


def test_edit_without_the_plugin_names_it(ip2p_folder, tmp_path):
    """A job with task 'edit' where the plugin is not loaded points at its distribution."""
    import t2i_plugin_sd.plugin

    pm = EnginePluginManager()
    pm.load(autoload=False)
    pm.register(t2i_plugin_sd.plugin, name="sd")
    job = _job(tmp_path, ip2p_folder, source_png(tmp_path / "src.png", seed=2))
    job.write_text(job.read_text().replace('plugins = ["sd", "instructpix2pix"]', 'plugins = ["sd"]'))
    with pytest.raises(ConfigError, match="pip install t2i-plugin-instructpix2pix"):
        load_config(job, pm)


def test_sample_with_image_guidance_points_to_edit(ip2p_folder, tmp_path):
    job = _job(tmp_path, ip2p_folder, source_png(tmp_path / "src.png", seed=2), "image_guidance_scale = 1.5")
    text = job.read_text().replace('name = "edit"', 'name = "sample"\nwidth = 16\nheight = 16')
    job.write_text(text.replace(f'sources = ["{tmp_path / "src.png"}"]\n', ""))
    with pytest.raises(ConfigError, match="task 'edit' of t2i-plugin-instructpix2pix"):
        _run(job)


def test_relative_sources_are_relative_to_the_config(ip2p_folder, tmp_path, monkeypatch):
    src = source_png(tmp_path / "src.png", seed=2)
    base = _run(_job(tmp_path / "abs", ip2p_folder, src))
    job = _job(tmp_path, ip2p_folder, src)
    job.write_text(job.read_text().replace(f'sources = ["{src}"]', 'sources = ["src.png"]'))
    monkeypatch.chdir(ip2p_folder)  # anywhere but the config's folder
    assert np.array_equal(_run(job), base)


def test_grid_key_writes_sources_above_edits(ip2p_folder, tmp_path):
    src = source_png(tmp_path / "src.png", seed=2)
    pm = _pm()
    summary = run_config(load_config(_job(tmp_path, ip2p_folder, src), pm, overrides=['task.grid="grid.png"']), pm)
    grid = np.array(Image.open(summary["grid"]).convert("RGB")).astype(np.int16)
    edit = np.array(Image.open(summary["images"][0]).convert("RGB")).astype(np.int16)
    source = np.array(Image.open(src).convert("RGB")).astype(np.int16)
    assert np.abs(grid[2:18, 2:18] - source).max() <= 1  # the source tile, top left (padding 2)
    assert any(np.abs(grid[y:y + 16, 2:18] - edit).max() <= 1 for y in range(18, grid.shape[0] - 15))
    assert "grid" not in _run_summary(_job(tmp_path / "n", ip2p_folder, src))


def _run_summary(job: Path) -> dict:
    pm = _pm()
    return dict(run_config(load_config(job, pm), pm))
