"""``precache`` applies ``[[conditioners]]``: the dataset's further fields (a hint) are stored in the
shards with what each conditioner's ``precache(batch)`` computes from them, and a training run on
those shards hands both to the conditioner's ``condition()``."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch.utils.data import Dataset

from t2i_engine.config.loader import load_config
from t2i_engine.data.precache import PrecachedConfig, PrecachedDataset
from t2i_engine.errors import ConfigError, DataError
from t2i_engine.hookspecs import hookimpl
from t2i_engine.interfaces import Conditioning
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config


class HintedShapes(Dataset):
    """Images with a caption and a ``hint`` field (a per-sample constant image)."""

    @attrs.frozen
    class Config:
        count: int = 6
        field: str = "hint"

    def __init__(self, config: Config) -> None:
        self.count, self.field = config.count, config.field

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, 16, 16, generator=g) * 2 - 1, "caption": f"shape {i}",
                self.field: torch.full((3, 16, 16), float(i))}


class HintMean:
    """``precache``: the hint's per-sample mean (what a real conditioner would encode once with the
    frozen model); ``condition``: records the batch fields it receives and adds nothing."""

    seen: list[dict[str, torch.Tensor]] = []

    @attrs.frozen
    class Config:
        out: str = "hint_mean"

    def __init__(self, config: Config) -> None:
        self.out = config.out

    def precache(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {self.out: batch["hint"].mean(dim=(1, 2, 3)) * 10}

    def condition(self, cond: Conditioning, inputs: Any) -> Conditioning:
        if inputs.batch is not None:
            HintMean.seen.append({k: v for k, v in inputs.batch.items() if k in ("hint", "hint_mean")})
        return cond


def _pm() -> EnginePluginManager:
    pm = EnginePluginManager().load()
    module = types.ModuleType("hinted")
    module.register_conditioners = hookimpl(lambda: {"hint-mean": HintMean})  # type: ignore[attr-defined]
    module.register_datasets = hookimpl(lambda: {"hinted": HintedShapes})  # type: ignore[attr-defined]
    pm.register(module, name="hinted")
    return pm


def _precache(tmp_path: Path, pm: EnginePluginManager, extra: str = "") -> Path:
    job = tmp_path / "precache.toml"
    job.write_text(f'[engine]\nplugins = ["sd"]\ndevice = "cpu"\noutput_dir = "{tmp_path / "out"}"\n'
                   '[task]\nname = "precache"\nbatch_size = 4\nshard_size = 4\n'
                   '[model]\ntype = "stable-diffusion"\npreset = "tiny"\n'
                   f'[data]\ntype = "hinted"\n{extra}'
                   '[[conditioners]]\ntype = "hint-mean"\n')
    return Path(run_config(load_config(job, pm), pm)["precached"])


def test_precache_stores_the_fields_and_conditioner_outputs(tmp_path: Path) -> None:
    pm = _pm()
    url = _precache(tmp_path, pm)
    data = PrecachedDataset(PrecachedConfig(url=str(url)))
    assert len(data) == 6
    for i in range(6):
        sample = data[i]
        assert torch.equal(sample["hint"], torch.full((3, 16, 16), float(i)))  # the dataset's field, as it was
        assert sample["hint_mean"].item() == pytest.approx(10.0 * i)  # the conditioner's precache()
        assert sample["latents"].shape == (4, 8, 8)


def test_training_on_the_shards_hands_the_fields_to_the_conditioner(tmp_path: Path) -> None:
    pm = _pm()
    url = _precache(tmp_path, pm)
    job = tmp_path / "train.toml"
    job.write_text(f'[engine]\nplugins = ["sd"]\ndevice = "cpu"\noutput_dir = "{tmp_path / "train"}"\n'
                   '[task]\nname = "train"\n[model]\ntype = "stable-diffusion"\npreset = "tiny"\n'
                   f'[data]\ntype = "precached"\nurl = "{url}"\n'
                   '[train]\nmax_steps = 2\nbatch_size = 2\nema = false\nprogress_bar = false\n'
                   '[[conditioners]]\ntype = "hint-mean"\n')
    HintMean.seen.clear()
    run_config(load_config(job, pm), pm)
    assert HintMean.seen, "condition() never saw a training batch"
    for fields in HintMean.seen:
        assert set(fields) == {"hint", "hint_mean"}
        means = fields["hint"].mean(dim=(1, 2, 3))
        torch.testing.assert_close(fields["hint_mean"], means * 10)


def test_a_field_name_the_shards_reserve_is_refused(tmp_path: Path) -> None:
    pm = _pm()
    with pytest.raises(DataError, match="'latents' is reserved"):
        _precache(tmp_path, pm, 'field = "latents"\n')


def test_a_conditioner_overwriting_a_dataset_field_is_refused(tmp_path: Path) -> None:
    pm = _pm()
    job = tmp_path / "precache.toml"
    job.write_text(f'[engine]\nplugins = ["sd"]\ndevice = "cpu"\noutput_dir = "{tmp_path / "out"}"\n'
                   '[task]\nname = "precache"\n[model]\ntype = "stable-diffusion"\npreset = "tiny"\n'
                   '[data]\ntype = "hinted"\n[[conditioners]]\ntype = "hint-mean"\nout = "hint"\n')
    with pytest.raises(ConfigError, match=r"conditioners\[0\].*precache\(\) returned the field 'hint'"):
        run_config(load_config(job, pm), pm)
