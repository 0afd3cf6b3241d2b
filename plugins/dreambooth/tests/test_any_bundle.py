"""DreamBooth drives any model that implements the bundle contract, not only Stable Diffusion: here
the SDK's toy bundle (core UNet named ``denoiser``, a hashing text encoder, an average-pooling
autoencoder), made trainable and savable by a few lines of a test plugin, trains for 2 steps with
prior preservation as a LoRA and as a full fine-tune."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i_engine.adapters import KeyMap, TargetNames, find_targets, load_lora
from t2i_engine.checkpoint.io import load_safetensors, save_safetensors
from t2i_engine.config.loader import load_config
from t2i_engine.diffusion.parameterization import training_batch
from t2i_engine.hookspecs import hookimpl
from t2i_engine.interfaces import Conditioning
from t2i_engine.runner import run_config
from t2i_sdk.testing import plugin_manager_with
from t2i_sdk.toy_model import ToyModel

from plugins.dreambooth.tests.conftest import instance_folder


class ToyTrainable(nn.Module):
    """eps-prediction MSE of the toy's denoiser: the plugin half of the training contract."""

    def __init__(self, model: "TrainableToy") -> None:
        super().__init__()
        self.model = model

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.denoiser.parameters()

    def training_loss(self, batch: Any, *, generator: torch.Generator | None) -> torch.Tensor:
        x0 = self.model.autoencoder.encode(batch["image"])
        cond = Conditioning(text=self.model.text_encoder.encode(list(batch["caption"])))
        tb = training_batch(x0, self.model.schedule, prediction="eps", generator=generator)
        return tb.loss(self.model.denoiser(tb.net_input, tb.t, cond))


class TrainableToy(ToyModel):
    def trainable(self, *, caption_dropout: float = 0.0, train_text_encoder: bool = False) -> nn.Module:
        return ToyTrainable(self)

    def save(self, url: str, *, format: str | None = None) -> None:
        save_safetensors(dict(self.denoiser.state_dict()), url)

    def lora_key_map(self) -> KeyMap:
        names = [n for n in find_targets(self) if n.startswith("denoiser.")]
        return KeyMap({n: TargetNames("lora_toy_" + n.replace(".", "_"), "toy." + n) for n in names})


def _factory(config: Any = None) -> TrainableToy:
    return TrainableToy(seed=3)


class ToyPlugin:
    """The test plugin: registers the trainable toy bundle as ``toy-bundle``."""

    @hookimpl
    def register_models(self) -> dict[str, Any]:
        return {"toy-bundle": _factory}


plugin = ToyPlugin()


def _run(tmp_path: Path, task: str, name: str) -> dict:
    import t2i_plugin_dreambooth.plugin as dreambooth

    pm = plugin_manager_with(plugin, name="toy")
    pm.register(dreambooth, name="dreambooth")
    path = tmp_path / f"{name}.toml"
    inst = instance_folder(tmp_path / "inst") if not (tmp_path / "inst").exists() else tmp_path / "inst"
    path.write_text(f"""
[engine]
device = "cpu"
output_dir = "{tmp_path / name}"
[task]
name = "dreambooth"
instance_data = "{inst}"
resolution = 32
class_prompt = "a circle"
num_class_images = 2
sample_batch_size = 2
{task}
[model]
type = "toy-bundle"
[sampler]
name = "euler"
steps = 2
[train]
accelerator = "cpu"
max_steps = 2
batch_size = 2
lr = 0.01
ema = false
progress_bar = false
checkpoint_every = 0
""")
    return dict(run_config(load_config(path, pm), pm))


def test_lora_on_a_bundle_whose_denoiser_is_not_called_unet(tmp_path):
    summary = _run(tmp_path, "lora_rank = 2", "lora")
    assert summary["step"] == 2 and summary["class_images_sampled"] == 2
    fresh = TrainableToy(seed=3)
    adapter, report = load_lora(fresh, summary["lora"], fresh.lora_key_map())
    assert not report.unmatched
    assert sorted(adapter.names()) == sorted(n for n in find_targets(fresh)
                                             if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or
                                             n.endswith("to_out.0"))
    assert any(layer.up.weight.abs().max() > 0 for _, layer in adapter.items())


def test_full_fine_tune_of_the_toy_exports_changed_weights(tmp_path):
    summary = _run(tmp_path, 'method = "full"\nexport = "toy.safetensors"', "full")
    tuned = load_safetensors(summary["exported"])
    base = TrainableToy(seed=3).denoiser.state_dict()
    assert tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
