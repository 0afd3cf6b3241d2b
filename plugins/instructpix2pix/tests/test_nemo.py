"""NeMo ``.nemo`` InstructPix2Pix archives (``megatron_instruct_pix2pix``:
``MegatronLatentDiffusionEdit``, config ``examples/multimodal/text_to_image/instruct_pix2pix/conf/
sd_finetune.yaml``: ``conditioning_key: hybrid``, ``unet_config.in_channels: 8``,
``first_stage_key: edited``, ``cond_stage_key: edit``).

The archive is written from the tiny diffusers-saved ``StableDiffusionInstructPix2PixPipeline`` by
the SD plugin tests' NeMo writer (NeMo's converter names, written independently of the engine's
key maps), loaded through the SD plugin's ``.nemo`` reader, and edited with; the truth is
diffusers' pipeline (and its UNet) on the same weights. NeMo's text embedders pad the embedding
to a multiple of 8 tokens (77 -> 80), so the reference is given those padded embeddings (the SD
plugin tests' ``nemo_padded``, as its NeMo image test does).
"""

from __future__ import annotations

import pytest
import torch

from plugins.sd.tests.test_nemo import hf_archive, nemo_padded, unet_rel
from t2i_engine.diffusion.registry import SAMPLERS
from t2i_engine.errors import CheckpointError
from t2i_plugin_instructpix2pix.edit import edit_images, load_source
from t2i_plugin_sd.formats import detect_format, load_checkpoint
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

from .conftest import tiny_ip2p_folder
from .test_edit_parity import NEGATIVE, PROMPTS, STEPS, TOL, _engine, _noise, _pipe, _sources

diffusers = pytest.importorskip("diffusers")

# the fields NeMo's sd_finetune.yaml for InstructPix2Pix sets on top of its SD config
IP2P_FIELDS = {"conditioning_key": "hybrid", "concat_mode": True, "unet_config__in_channels": 8,
               "first_stage_key": "edited", "cond_stage_key": "edit"}


@pytest.fixture(scope="module")
def nemo_file(ip2p_folder, tmp_path_factory):
    return hf_archive(tmp_path_factory.mktemp("nemo"), _pipe(ip2p_folder), **IP2P_FIELDS)


def _reference(folder, scheduler, paths, *, s_t, s_i):
    from PIL import Image

    pipe = _pipe(folder)
    # a .nemo carries no scheduler config: DDIM runs with the engine's default set_alpha_to_one = true
    extra = {"set_alpha_to_one": True} if scheduler == "DDIMScheduler" else {}
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **extra)
    images = [Image.open(p).convert("RGB") for p in paths]
    return pipe(image=images, prompt_embeds=nemo_padded(pipe, PROMPTS),
                negative_prompt_embeds=nemo_padded(pipe, NEGATIVE), latents=_noise(), num_inference_steps=STEPS, guidance_scale=s_t, image_guidance_scale=s_i,
                output_type="pt", generator=torch.Generator().manual_seed(11)).images


def _ours(path, sampler, paths, *, s_t, s_i):
    model = build_model(load_checkpoint(str(path)), PRESETS["sd-1"])
    sources = torch.cat([load_source(str(p), factor=model.autoencoder.downsample_factor) for p in paths])
    s = SAMPLERS[sampler](SAMPLERS[sampler].Config(steps=STEPS))
    out = edit_images(model, PROMPTS, sources, _noise(), sampler=s, text_scale=s_t, image_scale=s_i,
                      negative_prompts=NEGATIVE, generator=torch.Generator().manual_seed(11))
    return out / 2 + 0.5


def test_nemo_archive_holds_the_same_8_channel_unet(nemo_file, ip2p_folder):
    """The UNet read from the .nemo computes what diffusers' own 8-channel UNet (the weights the
    archive was written from) computes."""
    assert detect_format(str(nemo_file)).name == "nemo"
    ours = build_model(load_checkpoint(str(nemo_file)), PRESETS["sd-1"])
    assert ours.denoiser.config.in_channels == 8
    assert unet_rel(ours, _pipe(ip2p_folder)) <= 1e-5


@pytest.mark.parametrize(("sampler", "scheduler"), [("euler_ancestral", "EulerAncestralDiscreteScheduler"),
                                                    ("ddim", "DDIMScheduler")])
@pytest.mark.parametrize(("s_t", "s_i"), [(7.5, 1.5), (3.0, 1.0), (5.0, 0.5)])
def test_nemo_edits_match_diffusers(nemo_file, ip2p_folder, tmp_path, sampler, scheduler, s_t, s_i):
    paths = _sources(tmp_path)
    ref = _reference(ip2p_folder, scheduler, paths, s_t=s_t, s_i=s_i)
    got = _ours(nemo_file, sampler, paths, s_t=s_t, s_i=s_i)
    assert got.shape == ref.shape == (2, 3, 16, 16)
    assert (got - ref).abs().max() <= TOL


def test_the_padding_matters(nemo_file, ip2p_folder, tmp_path):
    """Without NeMo's 80-token padding diffusers' images differ: the test above would catch a
    .nemo edited as a diffusers folder is."""
    paths = _sources(tmp_path)
    padded = _ours(nemo_file, "ddim", paths, s_t=7.5, s_i=1.5)
    unpadded = _engine(ip2p_folder)
    sources = torch.cat([load_source(str(p), factor=8) for p in paths])
    s = SAMPLERS["ddim"](SAMPLERS["ddim"].Config(steps=STEPS))
    plain = edit_images(unpadded, PROMPTS, sources, _noise(), sampler=s, text_scale=7.5, image_scale=1.5,
                        negative_prompts=NEGATIVE, generator=torch.Generator().manual_seed(11)) / 2 + 0.5
    assert (padded - plain).abs().max() > TOL


def test_inpainting_and_inconsistent_archives_are_refused(ip2p_folder, tmp_path):
    pipe = _pipe(ip2p_folder)
    with pytest.raises(CheckpointError, match="inpainting"):
        nine = _pipe(tiny_ip2p_folder(tmp_path / "nine", in_channels=9))
        load_checkpoint(str(hf_archive(tmp_path / "a", nine, **{**IP2P_FIELDS, "unet_config__in_channels": 9})))
    with pytest.raises(CheckpointError, match="unet_config.in_channels"):
        load_checkpoint(str(hf_archive(tmp_path / "b", pipe, **{**IP2P_FIELDS, "unet_config__in_channels": 4})))
    with pytest.raises(CheckpointError, match="conditioning_key.*crossattn needs 4"):
        load_checkpoint(str(hf_archive(tmp_path / "c", pipe, **{**IP2P_FIELDS, "conditioning_key": "crossattn"})))


def test_an_edit_job_reads_the_nemo(nemo_file, ip2p_folder, tmp_path):
    """``[model] checkpoint = "x.nemo"`` in an ``edit`` job: diffusers' image (padded text), 8-bit."""
    import numpy as np
    from PIL import Image

    from t2i_engine.pipeline import seeded_noise

    from .conftest import source_png
    from .test_job import _job, _run

    src = source_png(tmp_path / "src.png", seed=2)
    got = _run(_job(tmp_path, nemo_file, src))  # DDIM 6 steps, s_T 7.5, s_I 1.5, seed 7
    pipe = _pipe(ip2p_folder)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    ref = pipe(image=Image.open(src), prompt_embeds=nemo_padded(pipe, ["make it red"]),
               negative_prompt_embeds=nemo_padded(pipe, [""]), latents=seeded_noise([7], (4, 8, 8)),
               num_inference_steps=6, output_type="np").images[0]
    assert np.abs(got - (ref * 255).round().astype(np.int16)).max() <= 1
