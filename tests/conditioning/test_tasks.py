"""The core tasks build and apply ``[[conditioners]]`` (on the shipped shapes model), refuse them
where they cannot, name a conditioner that fails to build, and train a conditioner's parameters."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.hookspecs import hookimpl
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config

from t2i_engine.conditioning import unet_residual_shapes
from t2i_engine.interfaces import Residuals

from .toys import LearnedOffset, chain

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class MidOffset:
    """A mid-block residual of ``value`` everywhere, shaped for the run's UNet."""

    @attrs.frozen
    class Config:
        value: float = 2.0

    def __init__(self, config: Config) -> None:
        self.value = config.value

    def setup(self, model: Any) -> None:
        self.unet = model.denoiser

    def residuals(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> Residuals:
        _, mid = unet_residual_shapes(self.unet, *x_t.shape[-2:])
        return Residuals(mid=torch.full((x_t.shape[0], *mid), self.value, dtype=x_t.dtype))


class Boom:
    def __init__(self) -> None:
        raise RuntimeError("no weights here")


def _pm() -> EnginePluginManager:
    pm = EnginePluginManager().load()
    module = types.ModuleType("toy_conditioners")
    module.register_conditioners = hookimpl(lambda: {"mid-offset": MidOffset, "boom": Boom})  # type: ignore[attr-defined]
    pm.register(module, name="toy")
    return pm


def _grid_job(tmp_path: Path, conditioners: str = "", task: str = "sample-grid") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = tmp_path / "job.toml"
    job.write_text(f"""[engine]
plugins = ["sd"]
device = "cpu"
output_dir = "{tmp_path / 'out'}"
[task]
name = "{task}"
prompts = ["a red circle on a blue background"]
images_per_prompt = 1
size = 64
captions = false
[model]
type = "stable-diffusion"
checkpoint = "{EXAMPLES / 'models' / 'shapes-64.safetensors'}"
preset = "shapes-64"
[sampler]
name = "ddim"
steps = 2
[guidance]
guidance_scale = 3.0
{conditioners}""")
    return job


def _grid(tmp_path: Path, pm: EnginePluginManager, conditioners: str = "", *sets: str) -> torch.Tensor:
    summary = run_config(load_config(_grid_job(tmp_path, conditioners), pm, overrides=sets), pm)
    return torch.tensor(np.array(Image.open(summary["image"]))).float()


def test_sample_grid_applies_a_conditioner_and_scale_zero_is_exactly_without_it(tmp_path: Path) -> None:
    pm = _pm()
    plain = _grid(tmp_path / "a", pm)
    entry = '[[conditioners]]\ntype = "mid-offset"\nvalue = 2.0\n'
    steered = _grid(tmp_path / "b", pm, entry)
    assert (steered - plain).abs().mean() > 1.0  # a visible change
    assert torch.equal(_grid(tmp_path / "c", pm, entry, "conditioners.0.scale=0.0"), plain)
    assert torch.equal(_grid(tmp_path / "d", pm, entry, "conditioners.0.start=0.9"), plain)  # no step in window


def test_a_conditioner_whose_constructor_raises_stops_the_job_naming_it(tmp_path: Path) -> None:
    pm = _pm()
    job = _grid_job(tmp_path, '\n[[conditioners]]\ntype = "boom"\n')
    with pytest.raises(ConfigError, match=r"conditioners\[0\] \(type 'boom', plugin 'toy'\): could not be built: "
                                          r"RuntimeError: no weights here \(.*job.toml:\d+\)") as info:
        run_config(load_config(job, pm), pm)
    assert info.value.exit_code == 2


def test_a_task_that_cannot_apply_conditioners_refuses_them(tmp_path: Path) -> None:
    pm = _pm()
    job = tmp_path / "job.toml"
    job.write_text(f'[engine]\noutput_dir = "{tmp_path}"\n[task]\nname = "preview-data"\n'
                   '[[conditioners]]\ntype = "mid-offset"\n')
    with pytest.raises(ConfigError, match=r"task 'preview-data' does not apply \[\[conditioners\]\].*job.toml:5"):
        run_config(load_config(job, pm), pm)


BRANCH_LINE = 'branch = "cnd"'


def _line(job: Path, text: str) -> int:
    return job.read_text().splitlines().index(text) + 1


def test_core_keys_are_validated_with_their_line(tmp_path: Path) -> None:
    pm = _pm()
    job = _grid_job(tmp_path, '[[conditioners]]\ntype = "mid-offset"\nstart = 0.8\nend = 0.5\n')
    with pytest.raises(ConfigError, match=rf"conditioners\[0\]\.end: must be greater than start.*job.toml:"
                                          rf"{_line(job, 'end = 0.5')}\)"):
        load_config(job, pm)
    job = _grid_job(tmp_path, '[[conditioners]]\ntype = "mid-offset"\nbranch = "cnd"\n')
    with pytest.raises(ConfigError, match=rf"conditioners\[0\]\.branch: expected one of 'cond'.*job.toml:"
                                          rf"{_line(job, BRANCH_LINE)}\)"):
        load_config(job, pm)
    job = _grid_job(tmp_path, '[[conditioners]]\ntype = "mid-offset"\ninputs = { hint = "missing.png" }\n')
    with pytest.raises(ConfigError, match=r"conditioners\[0\]\.inputs\.hint: path does not exist"):
        load_config(job, pm)


def test_training_gives_batch_fields_to_condition_and_trains_the_conditioner() -> None:
    from t2i_plugin_sd.plugin import StableDiffusionConfig, build_stable_diffusion

    model = build_stable_diffusion(StableDiffusionConfig(preset="shapes-64",
                                                         checkpoint=str(EXAMPLES / "models" / "shapes-64.safetensors")))
    learned = LearnedOffset()
    ch = chain((learned, {}))
    trainable = model.trainable(caption_dropout=0.0, conditioners=ch)
    assert any(p is learned.weight for p in trainable.trainable_parameters())
    batch: dict[str, Any] = {"image": torch.zeros(2, 3, 64, 64), "caption": ["a", "b"], "hint": torch.ones(2, 3, 64, 64)}
    trainable.training_loss(batch, generator=torch.Generator().manual_seed(0)).backward()
    assert learned.weight.grad is not None and learned.weight.grad.abs() > 0
    batch["hint"] = torch.zeros(2, 3, 64, 64)  # a zero hint: the residual is zero, so no gradient reaches it
    learned.weight.grad = None
    trainable.training_loss(batch, generator=torch.Generator().manual_seed(0)).backward()
    assert learned.weight.grad is not None and float(learned.weight.grad) == 0.0


def test_training_also_gives_the_jobs_inputs(tmp_path: Path) -> None:
    from t2i_engine.interfaces import Conditioning, TextEmbedding

    from .toys import ExtraOffset

    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "hint.png")
    extra = ExtraOffset()
    ch = chain((extra, {"inputs": {"hint": str(tmp_path / "hint.png")}}))
    cond = Conditioning(text=TextEmbedding(torch.zeros(2, 3, 4)))
    out = ch.condition_batch(cond, {"caption": ["a", "b"], "hint": torch.zeros(2)}, prompts=["a", "b"],
                             height=16, width=16)
    (seen,) = extra.seen
    assert seen.batch is not None and torch.equal(seen.images["hint"], torch.ones(2, 3, 16, 16))
    assert seen.branch == "cond" and "offset" in out.extras


class TrainableMid(torch.nn.Module):
    """A mid residual ``bias`` everywhere, a trainable parameter; remembers its instances."""

    built: list[TrainableMid] = []

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(0.5))
        TrainableMid.built.append(self)

    def setup(self, model: Any) -> None:
        self.unet = [model.denoiser]  # a list: not registered as a submodule (the model owns it)

    def residuals(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> Residuals:
        _, mid = unet_residual_shapes(self.unet[0], *x_t.shape[-2:])
        return Residuals(mid=self.bias.to(x_t.dtype).expand(x_t.shape[0], *mid))


def test_the_train_task_trains_a_conditioners_parameters(tmp_path: Path) -> None:
    pm = _pm()
    module = types.ModuleType("trainable_conditioner")
    module.register_conditioners = hookimpl(lambda: {"trainable-mid": TrainableMid})  # type: ignore[attr-defined]
    pm.register(module, name="trainable")
    job = tmp_path / "train.toml"
    job.write_text(f'[engine]\nplugins = ["sd"]\ndevice = "cpu"\noutput_dir = "{tmp_path / "out"}"\n'
                   '[task]\nname = "train"\n[model]\ntype = "stable-diffusion"\npreset = "tiny"\n'
                   '[data]\ntype = "shapes"\nsize = 32\ncount = 8\n'
                   '[train]\nmax_steps = 2\nbatch_size = 2\nlr = 0.05\nema = false\n'
                   '[[conditioners]]\ntype = "trainable-mid"\n')
    TrainableMid.built.clear()
    run_config(load_config(job, pm), pm)
    (conditioner,) = TrainableMid.built
    assert conditioner.bias.item() != 0.5  # its parameter was in the optimizer
