"""Training: the v-prediction target against diffusers, caption dropout, loss goes down."""

from __future__ import annotations

import torch

from t2i_engine.data.shapes import ShapesDataset
from t2i_engine.diffusion.parameterization import training_batch
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS
from t2i_plugin_sd.trainable import SDTrainable
from t2i_sdk.testing import check_training_lowers_loss


def test_v_target_matches_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    model = build_model(None, PRESETS["tiny-v"])
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([5, 400, 990])
    sigma = model.schedule.sigmas[t]
    tb = training_batch(x0, model.schedule, prediction=model.prediction, sigma=sigma, noise=noise)
    velocity = ref.get_velocity(x0, noise, t)
    assert torch.allclose(tb.target, velocity, atol=1e-6)
    noisy = ref.add_noise(x0, noise, t)
    assert torch.allclose(tb.net_input, noisy, atol=1e-6)
    assert torch.allclose(tb.t, t.double(), atol=1e-4)


def test_caption_dropout_uses_empty_prompt():
    trainable = SDTrainable(build_model(None, PRESETS["tiny"]), caption_dropout=1.0)
    assert trainable.drop_captions(["a", "b"], generator=torch.Generator().manual_seed(0)) == ["", ""]
    trainable.caption_dropout = 0.0
    assert trainable.drop_captions(["a", "b"], generator=None) == ["a", "b"]


def test_frozen_parts_and_loss_decreases():
    torch.manual_seed(0)
    trainable = SDTrainable(build_model(None, PRESETS["tiny"]), caption_dropout=0.1)
    params = list(trainable.trainable_parameters())
    assert {id(p) for p in params} == {id(p) for p in trainable.model.unet.parameters()}
    data = ShapesDataset(size=16, count=8)
    batch = [data[i] for i in range(8)]
    images = torch.stack([b["image"] for b in batch])
    batch = {"image": images, "caption": [b["caption"] for b in batch]}
    check_training_lowers_loss(trainable, batch, steps=15, eval_seeds=4)
    assert all(p.grad is None for p in trainable.model.vae.parameters())


def test_sample_images_for_training_grids():
    """The loop's optional sample_images: images in [-1, 1] at the size of the last batch."""
    trainable = SDTrainable(build_model(None, PRESETS["tiny"]))
    trainable.sample_steps = 2
    batch = {"image": torch.zeros(1, 3, 16, 16), "caption": ["a red square"]}
    with torch.no_grad():
        trainable.training_loss(batch, generator=torch.Generator().manual_seed(0))
    images = trainable.sample_images(["a", "b"], generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert trainable.training
