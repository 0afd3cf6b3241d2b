"""Training an Imagen stage: the loss is NeMo's EDM loss (reconstructed from what the UNet saw),
noise conditioning augmentation, caption dropout to the zero null text, a 2-step smoke training
through the core loop, and the stage file round trip."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from safetensors.torch import load_file

from t2i_engine.errors import CheckpointError, ConfigError
from t2i_plugin_imagen.stage import NoiseAugConfig, load_imagen_stage, lowres_extras
from tests.helpers import count_draws


class Recorder:
    """Wraps a UNet's forward, keeping its inputs and output."""

    def __init__(self, net):
        self.calls = []
        self.inner = net.forward

        def forward(x, t, cond):
            out = self.inner(x, t, cond)
            self.calls.append((x, t, cond, out))
            return out

        net.forward = forward


def _batch(size: int, n: int = 6):
    g = torch.Generator().manual_seed(5)
    captions = ["a red circle on a blue background", "a green square on a white background"] * (n // 2)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "caption": captions}


def test_base_loss_is_nemo_edm_loss(make_stage):
    stage = make_stage("base")
    rec = Recorder(stage.unet)
    batch = _batch(8)
    loss = stage.trainable(caption_dropout=0.0).training_loss(batch, generator=torch.Generator().manual_seed(0))
    x_in, t, _, F_x = rec.calls[0]
    sigma = (4 * t).exp().reshape(-1, 1, 1, 1)  # c_noise = ln(sigma) / 4
    sd = 0.5
    x = x_in * (sigma**2 + sd**2).sqrt()  # c_in = 1 / sqrt(sigma^2 + sd^2)
    D = sd**2 / (sigma**2 + sd**2) * x + sigma * sd / (sigma**2 + sd**2).sqrt() * F_x
    weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).sqrt()
    nemo = torch.nn.functional.mse_loss(weight * batch["image"], weight * D)  # NeMo EDMPrecond.compute_loss
    torch.testing.assert_close(loss, nemo, rtol=1e-4, atol=1e-6)
    assert ((x - batch["image"]) / sigma).std().item() == pytest.approx(1.0, abs=0.1)  # x = x0 + sigma * noise


def test_caption_dropout_gives_the_zero_null_text(make_stage):
    stage = make_stage("base")
    rec = Recorder(stage.unet)
    for p in (1.0, 0.0):
        stage.trainable(caption_dropout=p).training_loss(_batch(8), generator=torch.Generator().manual_seed(0))
    dropped, kept = rec.calls[0][2].text.tokens, rec.calls[1][2].text.tokens
    assert dropped.abs().max() == 0 and kept.abs().max() > 0
    assert stage.text_encoder.encode([""]).tokens.abs().max() == 0  # guidance's unconditional branch: the same null


def test_sr_training_augments_the_lowres_input(make_stage):
    stage = make_stage("sr")
    rec = Recorder(stage.unet)
    batch = _batch(16, n=64)
    stage.trainable().training_loss(batch, generator=torch.Generator().manual_seed(0))
    cond = rec.calls[0][2]
    assert cond.extras["lowres"].shape == (64, 3, 16, 16)
    sigma = (4 * cond.extras["lowres_t"]).exp()  # EDM time input of the augmentation level
    assert sigma.min() >= 0.002 * 0.999 and sigma.max() <= 1.0 * 1.001  # loguniform in [sigma_min, sigma_max]
    assert sigma.log().mean().item() == pytest.approx((math.log(0.002) + 0.0) / 2, abs=0.5)


def test_lowres_extras_are_nemo_noise_cond_aug():
    from t2i_plugin_imagen.precond import Preconditioning

    pre = Preconditioning()
    low, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)
    s = torch.tensor([0.002, 0.7])
    got = lowres_extras(low, (8, 8), prediction=pre.prediction, sigma_data=0.5, schedule=pre.schedule(),
                        aug_sigma=s, noise=noise)
    up = torch.nn.functional.interpolate(low, size=(8, 8), mode="bicubic")
    sv = s.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(got["lowres"], (up + sv * noise) / (0.25 + sv**2).sqrt())
    torch.testing.assert_close(got["lowres_t"], s.log() / 4)
    assert set(lowres_extras(low, (8, 8), prediction="edm", sigma_data=0.5, schedule=pre.schedule(),
                             aug_sigma=None, noise=None)) == {"lowres"}


def test_noise_aug_schedule_draws_the_training_sigmas():
    from t2i_plugin_imagen.precond import Preconditioning

    schedule = Preconditioning().schedule()
    got = NoiseAugConfig(train="schedule").training_sigmas(20000, schedule, generator=torch.Generator().manual_seed(0))
    assert got.log().mean().item() == pytest.approx(-1.2, abs=0.05)  # NeMo: the EDM training distribution


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_two_step_training_and_round_trip(tmp_path, make_stage, kind, monkeypatch):
    from t2i_engine.data.shapes import ShapesDataset
    from t2i_engine.training.config import TrainConfig
    from t2i_engine.training.loop import fit

    stage = make_stage(kind)
    data = ShapesDataset(size=stage.image_size, count=16, colours=["red", "green", "blue", "white"])
    before = [p.detach().clone() for p in stage.unet.parameters()]
    summary = fit(stage.trainable(train_text_encoder=kind == "base"), data,
                  TrainConfig(accelerator="cpu", max_steps=2, batch_size=4, ema=False, checkpoint_every=0,
                              progress_bar=False, log_every=1), output_dir=tmp_path / "run", seed=0)
    assert summary["step"] == 2 and math.isfinite(summary["loss"])
    assert any((a - b).abs().max() > 0 for a, b in zip(before, stage.unet.parameters()))
    stage.save(str(tmp_path / "s.safetensors"))
    draws = count_draws(monkeypatch)
    back = load_imagen_stage(str(tmp_path / "s.safetensors"))
    assert draws == []  # built undrawn: the strict loads replace every parameter (UNet and T5)
    want, got = dict(stage.named_buffers()), dict(back.named_buffers())  # non-persistent ones too
    want.update(stage.state_dict())
    got.update(back.state_dict())
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert back.description == stage.description and back.noise_aug == stage.noise_aug
    stage.save(str(tmp_path / "h.safetensors"), dtype=torch.float16)
    half = load_imagen_stage(str(tmp_path / "h.safetensors"))
    w = next(iter(stage.unet.parameters()))
    torch.testing.assert_close(next(iter(half.unet.parameters())), w.half().float())


def test_stage_file_errors(tmp_path, stage_files):
    from safetensors.torch import save_file

    tensors = load_file(str(stage_files["base"]))
    save_file(tensors, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CheckpointError, match="not an Imagen stage file"):
        load_imagen_stage(str(tmp_path / "nometa.safetensors"))
    from t2i_plugin_imagen.stage import safetensors_metadata

    meta = safetensors_metadata((stage_files["base"]).read_bytes())
    save_file({k: v for k, v in tensors.items() if "out.2" not in k}, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="missing keys.*out.2.weight"):
        load_imagen_stage(str(tmp_path / "short.safetensors"))
    bad = {**meta, "unet": meta["unet"].replace('"embed_dim": 8', '"embed_dim": 8, "bogus": 1')}
    save_file(tensors, str(tmp_path / "bogus.safetensors"), metadata=bad)
    with pytest.raises(CheckpointError, match="bogus"):
        load_imagen_stage(str(tmp_path / "bogus.safetensors"))


def test_model_config_keys(tmp_path, stage_files, make_stage):
    from t2i_plugin_imagen.plugin import ImagenStageConfig, build_imagen_stage

    with pytest.raises(ConfigError, match="unet_type cannot be set with checkpoint"):
        build_imagen_stage(ImagenStageConfig(checkpoint=str(stage_files["base"]), unet_type="base"))
    with pytest.raises(ConfigError, match="needs unet_type, unet, image_size, text"):
        build_imagen_stage(ImagenStageConfig())
    sr = make_stage("sr")
    opts = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(sr.unet.config).items()}
    built = build_imagen_stage(ImagenStageConfig(unet_type="sr", unet=opts, image_size=16, lowres_size=8,
                                                 text_from=str(stage_files["base"]), save_dtype="float16"))
    base = load_imagen_stage(str(stage_files["base"]))
    for a, b in zip(built.text_encoder.parameters(), base.text_encoder.parameters()):
        assert torch.equal(a, b)  # text_from: the base stage's T5 weights
    assert built.save_dtype == "float16"
    built.save(str(tmp_path / "sr.safetensors"))
    assert all(v.dtype == torch.float16 for v in load_file(str(tmp_path / "sr.safetensors")).values())
    with pytest.raises(ConfigError, match="needs lowres_size"):
        build_imagen_stage(ImagenStageConfig(unet_type="sr", unet=opts, image_size=16, text_from=str(stage_files["base"])))


def test_seed_sample_sigma_and_image_size_keys(make_stage):
    from t2i_plugin_imagen.cascade import sample_stage
    from t2i_plugin_imagen.plugin import ImagenStageConfig, build_imagen_stage

    from t2i_engine.diffusion.registry import SAMPLERS, ChurnConfig

    base, sr = make_stage("base"), make_stage("sr")
    opts = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(base.unet.config).items()}
    built = [build_imagen_stage(ImagenStageConfig(unet_type="base", unet=opts, text=base.text, image_size=8, seed=s))
             for s in (0, 0, 1)]
    weights = [next(iter(b.unet.parameters())) for b in built]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    sampler = SAMPLERS["heun"](ChurnConfig(steps=2))
    low, noise = torch.rand(1, 3, 8, 8) * 2 - 1, torch.randn(1, 3, 16, 16)

    def run(stage, **kw):
        return sample_stage(stage, ["a red circle"], noise, sampler=sampler, lowres=low,
                            generator=torch.Generator().manual_seed(0), **kw)

    default = run(sr)  # noise_aug.sample_sigma = 0.1
    torch.testing.assert_close(default, run(sr, aug_sigma=0.1))
    sr.noise_aug = NoiseAugConfig(train="loguniform", sample_sigma=0.5)
    assert (run(sr) - default).abs().max() > 0
    with pytest.raises(ConfigError, match="set \\[data\\] size = 8"):
        base.trainable().training_loss(_batch(16), generator=None)
    with pytest.raises(ValueError, match="needs lowres"):
        sample_stage(sr, ["a"], noise, sampler=sampler)


@pytest.mark.parametrize("objective", ["eps", "x0"])
def test_continuous_ddpm_stage_trains_and_samples(make_stage, objective):
    from t2i_plugin_imagen.cascade import sample_stage
    from t2i_plugin_imagen.precond import Preconditioning
    from t2i_plugin_imagen.stage import ImagenStage

    from t2i_engine.diffusion.registry import SAMPLERS, ChurnConfig, SamplerConfig

    tiny = make_stage("sr")
    stage = ImagenStage(tiny.unet, tiny.text_encoder, Preconditioning(kind="continuous-ddpm", objective=objective),
                        image_size=16, lowres_size=8, noise_aug=tiny.noise_aug, text=tiny.text)
    rec = Recorder(stage.unet)
    loss = stage.trainable().training_loss(_batch(16), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item())
    lam = rec.calls[0][1]  # the UNet's time input: the log-SNR, in the schedule's clipped range
    assert lam.min() >= -15 and lam.max() <= 15
    low = torch.rand(1, 3, 8, 8) * 2 - 1
    for sampler in (SAMPLERS["ddpm"](SamplerConfig(steps=3)), SAMPLERS["heun"](ChurnConfig(steps=3))):
        out = sample_stage(stage, ["a red circle"], torch.randn(1, 3, 16, 16), sampler=sampler, lowres=low,
                           generator=torch.Generator().manual_seed(0))
        assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
