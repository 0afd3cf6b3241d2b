"""``[[adapters]]`` in a job TOML: every key changes what the job does (path, multiplier,
partial), and ``train`` starts from the adapted weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from t2i_engine.adapters import create_adapter, save_kohya
from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config
from t2i_engine.tasks.common import build_model
from t2i_plugin_sd.model import build_model as build_sd
from t2i_plugin_sd.presets import PRESETS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """A kohya LoRA for the ``tiny`` preset (what examples/sd-sample.toml builds), up weights
    nonzero so it has an effect."""
    model = build_sd(None, PRESETS["tiny"])
    adapter = create_adapter(model, ["unet.*.to_q", "unet.*.to_v", "unet.*.ff.net.2"], rank=2, alpha=1.0)
    with torch.no_grad():
        for _, layer in adapter.items():
            layer.up.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_kohya(adapter, str(path), model.lora_key_map())
    return path


def _job(tmp_path: Path, name: str, adapters: str = "") -> Path:
    text = (EXAMPLES / "sd-sample.toml").read_text() + adapters
    job = tmp_path / f"{name}.toml"
    job.write_text(text)
    return job


def _sample(tmp_path: Path, name: str, adapters: str = "") -> np.ndarray:
    pm = EnginePluginManager().load()
    config = load_config(_job(tmp_path, name, adapters), pm, overrides=[
        f"engine.output_dir={str(tmp_path / name)!r}", "task.prompts=['a red square']", "task.images_per_prompt=1",
        "task.width=16", "task.height=16", "sampler.steps=3"])
    (path,) = run_config(config, pm)["images"]
    return np.asarray(Image.open(path)).astype(np.int16)


def _entry(path: Path, **keys: object) -> str:
    body = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in keys.items())
    return f'\n[[adapters]]\npath = "{path}"\n{body}'


def test_each_adapter_key_has_an_effect(tmp_path, lora_file):
    plain = _sample(tmp_path, "plain")
    full = _sample(tmp_path, "full", _entry(lora_file, multiplier=1.0))
    half = _sample(tmp_path, "half", _entry(lora_file, multiplier=0.5))
    zero = _sample(tmp_path, "zero", _entry(lora_file, multiplier=0.0))
    assert np.abs(full - plain).max() > 0  # path: the LoRA changes the image
    assert np.abs(half - full).max() > 0 and np.abs(half - plain).max() > 0  # multiplier scales it
    assert np.array_equal(zero, plain)  # multiplier 0 adds exactly nothing

    sd = load_file(lora_file)
    sd["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(2, 4)
    save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(ConfigError, match="no_such_module"):  # partial: refused by default ...
        _sample(tmp_path, "strict", _entry(tmp_path / "extra.safetensors"))
    with pytest.warns(UserWarning):  # ... accepted and reported with partial = true
        loose = _sample(tmp_path, "loose", _entry(tmp_path / "extra.safetensors", partial=True))
    assert np.array_equal(loose, full)


def test_unknown_adapter_key_is_located(tmp_path, lora_file):
    pm = EnginePluginManager().load()
    job = _job(tmp_path, "typo", _entry(lora_file, multiplyer=1.0))
    line = job.read_text().splitlines().index("multiplyer = 1.0") + 1
    with pytest.raises(ConfigError, match=rf"adapters\[0\]\.multiplyer: unknown key.*typo\.toml:{line}\)"):
        load_config(job, pm)


def test_train_starts_from_the_adapted_weights(tmp_path, lora_file):
    """``train`` bakes the adapters in: the UNet's weights are base + delta and no hook is left."""
    pm = EnginePluginManager().load()
    config = load_config(_job(tmp_path, "train", _entry(lora_file, multiplier=1.0)), pm,
                         overrides=[f"engine.output_dir={str(tmp_path / 'out')!r}"])
    ctx = RunContext(config=config, plugins=pm, output_dir=tmp_path / "out", device=torch.device("cpu"), seed=0)
    base = build_sd(None, PRESETS["tiny"]).unet
    sample_model = build_model(ctx, task="sample")
    train_model = build_model(ctx, task="train")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = base.get_submodule(name).weight
    assert torch.equal(sample_model.denoiser.get_submodule(name).weight, w0)  # inference: separate layer
    assert not torch.allclose(train_model.denoiser.get_submodule(name).weight, w0)  # train: baked
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    cond = sample_model.text_encoder.encode(["a"])
    from t2i_engine.interfaces import Conditioning

    with torch.no_grad():
        a = sample_model.denoiser(x, t, Conditioning(text=cond))
        b = train_model.denoiser(x, t, Conditioning(text=cond))
    assert (a - b).abs().max() <= 1e-5  # the same function, now in the weights
    assert not train_model.denoiser.get_submodule(name).__dict__.get("_t2i_lora_slot")


def test_png_records_the_adapters_as_a1111_does(tmp_path, lora_file):
    """The ``parameters`` chunk carries ``<lora:name:multiplier>`` after the prompt and a ``Lora
    hashes`` entry (SHA-256, first 10 hex digits, computed here independently)."""
    import hashlib
    import re

    _sample(tmp_path, "tagged", _entry(lora_file, multiplier=0.5))
    (png,) = (tmp_path / "tagged").glob("*.png")
    text = Image.open(png).text["parameters"]
    prompt, params = text.split("\n", 1)
    assert prompt == "a red square <lora:style:0.5>"
    digest = hashlib.sha256(lora_file.read_bytes()).hexdigest()[:10]
    assert re.search(rf'Lora hashes: "style: {digest}"', params)
    assert Image.open(png).text["prompt"] == "a red square"  # the engine's own chunk is the prompt as sampled


def test_bundled_token_embedding_reaches_the_job_through_adapters(tmp_path, lora_file):
    """A kohya file with a bundled embedding (``bundle_emb.sks.string_to_param.*``, what the
    dreambooth task's ``token_embedding`` writes) changes a job's image for a prompt with the word
    and leaves one without it as the plain LoRA draws it."""
    tensors = load_file(str(lora_file))
    bundled = tmp_path / "bundled.safetensors"
    save_file({**tensors, "bundle_emb.sks.string_to_param.*": torch.randn(1, 32, generator=torch.Generator()
                                                                              .manual_seed(1)) * 3}, str(bundled))

    def sample(name: str, path: Path, prompt: str) -> np.ndarray:
        pm = EnginePluginManager().load()
        config = load_config(_job(tmp_path, name, _entry(path)), pm, overrides=[
            f"engine.output_dir={str(tmp_path / name)!r}", f"task.prompts=[{prompt!r}]", "task.images_per_prompt=1",
            "task.width=16", "task.height=16", "sampler.steps=3"])
        (out,) = run_config(config, pm)["images"]
        return np.asarray(Image.open(out)).astype(np.int16)

    assert np.abs(sample("sks-b", bundled, "a red sks") - sample("sks-p", lora_file, "a red sks")).max() > 0
    assert np.array_equal(sample("sq-b", bundled, "a red square"), sample("sq-p", lora_file, "a red square"))
