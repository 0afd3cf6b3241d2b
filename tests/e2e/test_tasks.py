"""The core's model tasks run in-process through the config loader and the run context:
the on_sample_step hook, [guidance] guidance_interval, fit's EMA hand-back, precache -> train from precached shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.training.tiny_denoiser import DictDataset, TinyDenoiser

from t2i_engine.config.loader import load_config
from t2i_engine.hookspecs import hookimpl
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config
from t2i_engine.training.checkpoints import CheckpointPaths
from t2i_engine.training.config import TrainConfig
from t2i_engine.training.loop import fit
from t2i_sdk.testing import check_training_lowers_loss

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


class StepRecorder:
    """A plugin (registered in-process) that records on_sample_step calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float]] = []

    @hookimpl
    def on_sample_step(self, step: int, total: int, sigma: float) -> None:
        self.calls.append((step, total, sigma))


def _pm(*extra: tuple[object, str]) -> EnginePluginManager:
    pm = EnginePluginManager().load()
    for plugin, name in extra:
        pm.register(plugin, name=name)
    return pm


@pytest.mark.slow
def test_sample_task_calls_on_sample_step(tmp_path):
    recorder = StepRecorder()
    pm = _pm((recorder, "step-recorder"))
    config = load_config(EXAMPLES / "sd-sample.toml", pm, overrides=[
        f"engine.output_dir={str(tmp_path)!r}", "task.prompts=['a red square']", "task.images_per_prompt=1",
        "task.width=16", "task.height=16", "sampler.steps=3"])
    summary = run_config(config, pm)
    assert len(summary["images"]) == 1
    assert [(s, t) for s, t, _ in recorder.calls] == [(1, 3), (2, 3), (3, 3)]
    sigmas = [s for _, _, s in recorder.calls]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[-1] > 0


def test_fit_copies_ema_into_the_model_when_asked(tmp_path):
    cfg = TrainConfig(accelerator="cpu", progress_bar=False, batch_size=4, max_steps=4, lr=1e-2,
                      ema_decay=0.5, checkpoint_every=0)
    model = TinyDenoiser()
    fit(model, DictDataset(), cfg, output_dir=tmp_path, seed=0, copy_ema=True)
    paths = CheckpointPaths(str(tmp_path / "checkpoints"), 4)
    from t2i_engine.checkpoint.io import load_safetensors

    trained, ema = load_safetensors(paths.model), load_safetensors(paths.ema)
    state = model.state_dict()
    assert set(ema) and all(torch.equal(state[k], ema[k]) for k in ema)  # the model now holds the EMA
    assert any(not torch.equal(trained[k], ema[k]) for k in ema)  # ... which differs from training
    plain = TinyDenoiser()
    fit(plain, DictDataset(), cfg, output_dir=tmp_path / "plain", seed=0)
    plain_trained = load_safetensors(CheckpointPaths(str(tmp_path / "plain" / "checkpoints"), 4).model)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in plain_trained.items())  # default: untouched


def _precache_config(tmp_path: Path) -> Path:
    path = tmp_path / "precache.toml"
    path.write_text(f"""
[engine]
plugins = ["sd"]
output_dir = {str(tmp_path / "out")!r}

[task]
name = "precache"
out = "shards"
batch_size = 4
shard_size = 3

[model]
type = "stable-diffusion"
preset = "tiny"

[data]
type = "shapes"
size = 16
count = 8
""")
    return path


@pytest.mark.slow
def test_precache_then_training_from_shards_matches_images(tmp_path):
    from t2i_engine.data.precache import PrecachedConfig, PrecachedDataset
    from t2i_engine.data.shapes import ShapesDataset
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS
    from t2i_plugin_sd.trainable import SDTrainable

    pm = _pm()
    summary = run_config(load_config(_precache_config(tmp_path), pm), pm)
    assert summary["count"] == 8 and summary["shards"] == 3
    cached = PrecachedDataset(PrecachedConfig(url=summary["precached"]))
    images = ShapesDataset(size=16, count=8)

    # the precache task built the preset with its fixed seed: the same weights here
    model = build_model(None, PRESETS["tiny"])
    trainable = SDTrainable(model, caption_dropout=0.5, sample_posterior=False)
    from_images = {"image": torch.stack([images[i]["image"] for i in range(8)]),
                   "caption": [images[i]["caption"] for i in range(8)]}
    from_cache = torch.utils.data.default_collate([{k: v for k, v in cached[i].items() if k != "caption"}
                                                   for i in range(8)])
    assert [cached[i]["caption"] for i in range(8)] == from_images["caption"]
    with torch.no_grad():
        for seed in range(3):  # dropout draws differ per seed; the rows dropped must match too
            a = trainable.training_loss(from_images, generator=torch.Generator().manual_seed(seed))
            b = trainable.training_loss(from_cache, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # a few optimizer steps on the precached batch lower its loss
    check_training_lowers_loss(trainable, from_cache, steps=8)


@pytest.mark.slow
def test_sample_precision_follows_engine_precision(tmp_path):
    """bf16 (autocast or cast weights) gives the float32 image up to bf16 rounding."""
    import numpy as np
    from PIL import Image

    pm = _pm()
    images = {}
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        config = load_config(EXAMPLES / "sd-sample.toml", pm, overrides=[
            f"engine.output_dir={str(tmp_path / precision)!r}", f"engine.precision={precision!r}",
            "task.prompts=['a red square']", "task.images_per_prompt=1", "task.width=16", "task.height=16",
            "sampler.steps=2"])
        path = run_config(config, pm)["images"][0]
        images[precision] = np.asarray(Image.open(path), dtype=np.float64)
    for precision in ("bf16-mixed", "bf16-true"):
        assert np.abs(images[precision] - images["32-true"]).max() <= 24  # of 255


def test_guidance_interval_key_reaches_the_sample_task(tmp_path):
    """[guidance] guidance_interval through the job: an interval holding every step's sigma is plain
    CFG, one holding none is no guidance (scale 1), one holding some steps is neither."""
    import numpy as np
    from PIL import Image

    recorder = StepRecorder()
    pm = _pm((recorder, "step-recorder"))

    def image(name: str, *sets: str) -> np.ndarray:
        config = load_config(EXAMPLES / "sd-sample.toml", pm, overrides=[
            f"engine.output_dir={str(tmp_path / name)!r}", "task.prompts=['a red square']",
            "task.images_per_prompt=1", "task.width=16", "task.height=16", "sampler.steps=3", *sets])
        return np.asarray(Image.open(run_config(config, pm)["images"][0]), dtype=np.int16)

    guided = image("cfg")
    sigmas = [s for _, _, s in recorder.calls]
    top, bottom = max(sigmas), min(sigmas)
    assert np.array_equal(image("all", f"guidance.guidance_interval=[0, {top * 2}]"), guided)
    unguided = image("none", f"guidance.guidance_interval=[{top * 2}, {top * 4}]")
    assert np.array_equal(unguided, image("scale1", "guidance.guidance_scale=1.0"))
    assert np.abs(unguided - guided).max() > 0
    some = image("some", f"guidance.guidance_interval=[{bottom}, {top * 2}]")  # all but the last step
    assert np.abs(some - guided).max() > 0 and np.abs(some - unguided).max() > 0
