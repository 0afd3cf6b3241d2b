"""EditTrainable: the reference's training inputs (unscaled source mode concatenated after the
noisy latent, scaled target latents, one dropout draw for text and image), and precached
latents equal to encoding every batch."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.diffusion.parameterization import training_batch
from t2i_engine.errors import ConfigError
from t2i_plugin_instructpix2pix.dropout import conditioning_dropout
from t2i_plugin_instructpix2pix.init import grow_to_edit_model
from t2i_plugin_instructpix2pix.train_task import cache_edit_latents
from t2i_plugin_instructpix2pix.trainable import EditTrainable
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS


@pytest.fixture(scope="module")
def edit_model(sd1_folder):
    _, folder = sd1_folder
    model = grow_to_edit_model(build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"]))
    torch.nn.init.normal_(model.unet.conv_in.weight, std=0.1)  # make the source latent matter
    return model


def _batch(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, "source": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1,
            "caption": [f"make it colour {i}" for i in range(n)]}


def test_network_inputs_follow_the_reference(edit_model):
    """The UNet sees x_t * c_in, then the unscaled posterior mode of the source (zeroed where the
    image is dropped) and the instruction's embedding (that of "" where the text is dropped)."""
    trainable = EditTrainable(edit_model, conditioning_dropout=0.3, sample_posterior=False)
    batch = _batch()
    seen = {}
    unet = edit_model.unet
    original = unet.forward

    def spy(x, t, cond):
        seen.update(x=x, t=t, cond=cond)
        return original(x, t, cond)

    unet.forward = spy
    try:
        trainable(batch, generator=torch.Generator().manual_seed(5))
    finally:
        del unet.forward
    g = torch.Generator().manual_seed(5)
    drop_text, drop_image = conditioning_dropout(12, 0.3, generator=g)  # the first draws of the generator
    assert drop_text.any() and drop_image.any() and (~drop_text & ~drop_image).any()
    vae = edit_model.vae
    with torch.no_grad():
        mode = vae.moments(batch["source"])[0]
        x0 = vae.moments(batch["image"])[0] * vae.scaling_factor
        texts = edit_model.text_encoder.encode(["" if d else c for c, d in zip(batch["caption"], drop_text.tolist())])
    expected_source = torch.where(drop_image.view(-1, 1, 1, 1), torch.zeros_like(mode), mode)
    assert torch.allclose(seen["cond"].extras["concat"], expected_source, atol=1e-6)
    assert torch.allclose(seen["cond"].text.tokens, texts.tokens, atol=1e-6)
    tb = training_batch(x0, edit_model.schedule, prediction=edit_model.prediction, generator=g)
    assert torch.allclose(seen["x"], tb.net_input, atol=1e-5)
    assert torch.equal(seen["t"], tb.t)


def test_cached_latents_train_as_encoding_each_batch(edit_model):
    """cache_edit_latents stores the posterior mean (scaled) and the mode (unscaled): the loss on
    them equals the loss on the images when the posterior is not sampled."""
    batch = _batch(8)
    samples = [{"image": batch["image"][i], "source": batch["source"][i], "caption": batch["caption"][i]}
               for i in range(8)]
    cached = cache_edit_latents(edit_model.vae, samples, count=8, batch_size=3)
    trainable = EditTrainable(edit_model, conditioning_dropout=0.2, sample_posterior=False)
    from_images = trainable(batch, generator=torch.Generator().manual_seed(2))
    c = {"latents": cached.latents, "source_latents": cached.sources, "caption": cached.captions}
    assert torch.allclose(trainable(c, generator=torch.Generator().manual_seed(2)), from_images, atol=1e-5)


def test_a_four_channel_model_and_grids_refused(sd1_folder, edit_model):
    _, folder = sd1_folder
    with pytest.raises(ValueError, match="8 input channels"):
        EditTrainable(build_model(DiffusersFolder().load(str(folder)), PRESETS["sd-1"]))
    with pytest.raises(ConfigError, match="sample_every"):
        EditTrainable(edit_model).sample_images(["x"], generator=None)


def test_latent_cache_file_is_reused_only_when_it_fits(edit_model, tmp_path, monkeypatch):
    from t2i_plugin_instructpix2pix import train_task

    batch = _batch(4)
    samples = [{"image": batch["image"][i], "source": batch["source"][i], "caption": batch["caption"][i]}
               for i in range(4)]
    url = str(tmp_path / "cache.safetensors")
    first = train_task.cached_latents_file(edit_model.vae, samples, count=4, data_config="A", url=url)
    calls = []
    real = train_task.cache_edit_latents
    monkeypatch.setattr(train_task, "cache_edit_latents", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = train_task.cached_latents_file(edit_model.vae, samples, count=4, data_config="A", url=url)
    assert not calls and again.captions == first.captions and torch.equal(again.latents, first.latents)
    train_task.cached_latents_file(edit_model.vae, samples, count=3, data_config="A", url=url)
    train_task.cached_latents_file(edit_model.vae, samples, count=3, data_config="B", url=url)
    assert len(calls) == 2
