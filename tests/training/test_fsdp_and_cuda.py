"""FSDP (refused on the CPU; full-state save and resume through Fabric on a GPU) and SD training
on CUDA with a CUDA generator. The GPU tests are marked ``gpu`` and skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from t2i_engine.checkpoint.io import safe_torch_load
from t2i_engine.errors import ConfigError
from t2i_engine.training.checkpoints import CheckpointPaths, latest_checkpoint
from t2i_engine.training.config import TrainConfig
from t2i_engine.training.loop import fit
from tests.training.tiny_denoiser import DictDataset, TinyDenoiser


def test_fsdp_is_refused_on_the_cpu_with_a_message(tmp_path: Path) -> None:
    cfg = TrainConfig(accelerator="cpu", strategy="fsdp", ema=False, progress_bar=False, max_steps=1)
    with pytest.raises(ConfigError, match=r"train.strategy: 'fsdp' needs CUDA GPUs .* use strategy = 'ddp'"):
        fit(TinyDenoiser(), DictDataset(), cfg, output_dir=tmp_path, seed=0)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was built or written
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs CUDA GPUs"):
            fit(TinyDenoiser(), DictDataset(), TrainConfig(strategy="fsdp", ema=False), output_dir=tmp_path, seed=0)


def test_fsdp_refuses_what_needs_unsharded_weights() -> None:
    from t2i_engine.training.fsdp import check_fsdp

    with pytest.raises(ConfigError, match="train.ema is not supported with strategy = 'fsdp'"):
        check_fsdp(TrainConfig(strategy="fsdp"), device_type="cuda")
    with pytest.raises(ConfigError, match="train.sample_every"):
        check_fsdp(TrainConfig(strategy="fsdp", ema=False, sample_every=5), device_type="cuda")
    with pytest.raises(ConfigError, match="local folder"):
        check_fsdp(TrainConfig(strategy="fsdp", ema=False), device_type="cuda", checkpoint_dir="s3://b/c")
    check_fsdp(TrainConfig(strategy="fsdp", ema=False), device_type="cuda")


def _fsdp_run(out: Path, *, max_steps: int, resume: bool = False) -> dict:
    torch.manual_seed(1234)  # the same initial weights in every run
    cfg = TrainConfig(accelerator="cuda", devices=1, strategy="fsdp", ema=False, progress_bar=False, batch_size=4,
                      max_steps=max_steps, checkpoint_every=2, lr=1e-2, deterministic=False, resume=resume)
    return fit(TinyDenoiser(), DictDataset(n=32), cfg, output_dir=out, seed=7)


@pytest.mark.gpu
def test_fsdp_full_state_save_and_resume(tmp_path: Path) -> None:
    """A run stopped at step 2 and resumed to 4 ends where an uninterrupted 4-step run does; the
    checkpoint holds the full (unsharded) model state, loadable without FSDP."""
    _fsdp_run(tmp_path / "ref", max_steps=4)
    _fsdp_run(tmp_path / "cut", max_steps=2)
    assert latest_checkpoint(str(tmp_path / "cut" / "checkpoints")) == 2
    _fsdp_run(tmp_path / "cut", max_steps=4, resume=True)
    states = []
    for run in ("ref", "cut"):
        ckpt = CheckpointPaths(str(tmp_path / run / "checkpoints"), 4)
        full = torch.load(ckpt.fabric, map_location="cpu", weights_only=True)  # Fabric's full-state file
        assert safe_torch_load(ckpt.state)["step"] == 4 and "optimizer" in full
        states.append(full["model"])
    own = TinyDenoiser().state_dict()
    assert states[0].keys() == own.keys()
    assert all(states[0][k].shape == v.shape for k, v in own.items())  # full tensors, not shards
    for k in own:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.gpu
def test_training_sigmas_and_caption_mask_follow_a_cuda_generator() -> None:
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS
    from t2i_plugin_sd.trainable import SDTrainable

    from t2i_engine.diffusion.schedules import DiscreteSchedule, EDMSchedule, VPCosineSchedule

    g = torch.Generator(device="cuda").manual_seed(0)
    device = torch.device("cuda")
    for schedule in (DiscreteSchedule.from_betas("scaled_linear"), EDMSchedule(), VPCosineSchedule()):
        sigmas = schedule.sample_training_sigmas(3, generator=g, device=device)
        assert sigmas.device.type == "cuda" and bool((sigmas > 0).all())
    trainable = SDTrainable(build_model(None, PRESETS["tiny"]).to(device), caption_dropout=0.5)
    assert trainable.keep_mask(4, generator=g).shape == (4,)
    batch = {"image": torch.rand(2, 3, 32, 32, device=device) * 2 - 1, "caption": ["a red square", "a blue circle"]}
    loss = trainable.training_loss(batch, generator=g)
    assert loss.device.type == "cuda" and torch.isfinite(loss)


@pytest.mark.gpu
def test_sd_fit_on_cuda(tmp_path: Path) -> None:
    """The SD trainable through the Fabric loop on the GPU (the generator is a CUDA one)."""
    from t2i_engine.data.shapes import ShapesDataset
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS
    from t2i_plugin_sd.trainable import SDTrainable

    trainable = SDTrainable(build_model(None, PRESETS["tiny"]), caption_dropout=0.5)
    cfg = TrainConfig(accelerator="cuda", progress_bar=False, batch_size=4, max_steps=3, checkpoint_every=0,
                      gradient_checkpointing=True)
    summary = fit(trainable, ShapesDataset(size=32, count=16), cfg, output_dir=tmp_path, seed=0)
    assert summary["step"] == 3 and summary["loss"] == summary["loss"]  # finite, not NaN
