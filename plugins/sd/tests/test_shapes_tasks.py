"""The shapes-model tasks: shapes-train as written in examples/ (shrunk with --set), its export
read back by the single-file format, the quickstart and shapes-eval configs, and the
autoencoder objective."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "t2i-engine"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_kl_divergence_matches_torch_distributions() -> None:
    from t2i_plugin_sd.autoencoder_training import kl_divergence

    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    post = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    ref = torch.distributions.kl_divergence(post, torch.distributions.Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(kl_divergence(mean, logvar), ref)


def test_latent_scaling_factor_whitens_the_latents() -> None:
    from t2i_plugin_sd.autoencoder import AutoencoderConfig, AutoencoderKL
    from t2i_plugin_sd.autoencoder_training import latent_scaling_factor

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(channels=(32, 32), layers_per_block=1))
    images = [torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(2)]
    vae.scaling_factor = latent_scaling_factor(vae, images)
    with torch.no_grad():
        z = torch.cat([vae.encode(x) for x in images])
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.slow
def test_shapes_train_config_runs_as_written_and_exports_a_loadable_model(tmp_path: Path) -> None:
    from t2i_plugin_sd.formats import load_checkpoint
    from t2i_plugin_sd.plugin import StableDiffusionConfig, build_stable_diffusion
    from t2i_plugin_sd.presets import PRESETS

    out = tmp_path / "shapes.safetensors"
    r = _cli("run", str(EXAMPLES / "shapes-train.toml"), "--set", "task.autoencoder.max_steps=2",
             "--set", "task.autoencoder.batch_size=4", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
             "--set", "task.latent_samples=8", "--set", f"task.output={out}",
             "--set", f"engine.output_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"model: {out}" in r.stdout
    assert out.stat().st_size <= 15 * 2**20
    assert (tmp_path / "run" / "autoencoder" / "checkpoints").is_dir()
    assert (tmp_path / "run" / "unet" / "checkpoints").is_dir()
    assert load_checkpoint(str(out)).hints["scaling_factor"] > 0
    arch = PRESETS["shapes-64"]
    model = build_stable_diffusion(StableDiffusionConfig(preset="shapes-64", checkpoint=str(out)))
    assert model.arch.unet == arch.unet
    assert model.arch.text == arch.text
    assert attrs_equal_but_scale(model.arch.vae, arch.vae)
    assert model.vae.downsample_factor == 8 and model.vae.latent_channels == 4

    # re-running resumes both finished stages and only re-exports
    r2 = _cli("run", str(EXAMPLES / "shapes-train.toml"), "--set", "task.autoencoder.max_steps=2",
              "--set", "task.autoencoder.batch_size=4", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
              "--set", "task.latent_samples=8", "--set", f"task.output={out}",
              "--set", f"engine.output_dir={tmp_path / 'run'}")
    assert r2.returncode == 0, r2.stderr[-3000:]

    # the quickstart and eval configs run on that model
    grid = _cli("run", str(EXAMPLES / "quickstart.toml"), "--set", f"model.checkpoint={out}",
                "--set", "sampler.steps=2", "--set", "task.images_per_prompt=1",
                "--set", f"engine.output_dir={tmp_path / 'qs'}")
    assert grid.returncode == 0, grid.stderr[-3000:]
    png = tmp_path / "qs" / "quickstart-grid.png"
    assert f"image: {png}" in grid.stdout and png.is_file()
    ev = _cli("run", str(EXAMPLES / "shapes-eval.toml"), "--set", f"model.checkpoint={out}",
              "--set", "sampler.steps=2", "--set", "task.images_per_prompt=1",
              "--set", f"engine.output_dir={tmp_path / 'ev'}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "background" in ev.stdout and "images: 14" in ev.stdout


def attrs_equal_but_scale(a: object, b: object) -> bool:
    import attrs

    return attrs.evolve(a, scaling_factor=1.0) == attrs.evolve(b, scaling_factor=1.0)
