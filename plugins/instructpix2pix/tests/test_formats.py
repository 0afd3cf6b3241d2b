"""The files InstructPix2Pix users hold, with diffusers' own single-file loader as the truth:

* timbrooks' ``instruct-pix2pix-00-22000.ckpt`` layout: a Lightning checkpoint (``state_dict``
  beside ``global_step``, ``epoch``, ...) holding the trained UNet as ``model.diffusion_model.*``
  and its EMA copy as ``model_ema.<name without dots>``; diffusers'
  ``UNet2DConditionModel.from_single_file(extract_ema=True/False)`` reads the same UNet the engine
  takes with ``ema = true/false``;
* an A1111 ``.safetensors`` (no EMA keys): ``StableDiffusionInstructPix2PixPipeline.from_single_file``
  edits as the engine does on it (1e-3);
* export: a diffusers folder ``from_pretrained`` loads as ``StableDiffusionInstructPix2PixPipeline``
  and a single file ``from_single_file`` reads, both holding the chosen weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from t2i_plugin_instructpix2pix.ema import choose_weights
from t2i_plugin_instructpix2pix.formats import save_edit_model
from t2i_plugin_sd.formats import SingleFile, load_checkpoint, read_state_dict
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

from .test_edit_parity import NEGATIVE, PROMPTS, STEPS, TOL, _noise, _sources

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:.*yaml cannot express")


@pytest.fixture(scope="module")
def lightning_ckpt(ema_file, tmp_path_factory):
    """ema_file's tensors in a Lightning checkpoint, as (ckpt, trained folder, EMA folder)."""
    path, trained, other = ema_file
    ckpt = tmp_path_factory.mktemp("ckpt") / "instruct-pix2pix-00-22000.ckpt"
    torch.save({"epoch": 21, "global_step": 22000, "pytorch-lightning_version": "1.6.5",
                "state_dict": read_state_dict(str(path)), "optimizer_states": [], "lr_schedulers": []}, ckpt)
    return ckpt, trained, other


def _ours(path, *, ema: bool):
    # a .ckpt records no attention heads (the real SD 1 sizes are known; the tiny ones are given,
    # as a user would with [model] unet_heads / text_heads)
    model = build_model(load_checkpoint(str(path)), PRESETS["sd-1"], overrides={"unet_heads": (2, 2), "text_heads": 4})
    choose_weights(model, ema=ema)
    return model


def _equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("ema", [True, False])
def test_lightning_ckpt_unet_as_diffusers_reads_it(lightning_ckpt, ema):
    ckpt, trained, other = lightning_ckpt
    theirs = diffusers.UNet2DConditionModel.from_single_file(str(ckpt), config=str(trained), subfolder="unet",
                                                             extract_ema=ema).state_dict()
    _equal(_ours(ckpt, ema=ema).denoiser.state_dict(), theirs)
    truth = diffusers.UNet2DConditionModel.from_pretrained(str(other if ema else trained), subfolder="unet")
    _equal(theirs, truth.state_dict())  # the fixture's two UNets: the file holds what it should


def _pipeline_images(pipe, paths):
    """Euler ancestral, the reference checkpoint's scheduler (a single file carries no scheduler
    config, so DDIM's set_alpha_to_one would be the engine's default, not the folder's)."""
    from PIL import Image

    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe(PROMPTS, image=[Image.open(p).convert("RGB") for p in paths], negative_prompt=NEGATIVE,
                latents=_noise(), num_inference_steps=STEPS, output_type="pt",
                generator=torch.Generator().manual_seed(11)).images


def _engine_images(model, paths):
    from t2i_engine.diffusion.registry import SAMPLERS
    from t2i_plugin_instructpix2pix.edit import edit_images, load_source

    sources = torch.cat([load_source(str(p), factor=model.autoencoder.downsample_factor) for p in paths])
    sampler = SAMPLERS["euler_ancestral"](SAMPLERS["euler_ancestral"].Config(steps=STEPS))
    out = edit_images(model, PROMPTS, sources, _noise(), sampler=sampler, negative_prompts=NEGATIVE,
                      generator=torch.Generator().manual_seed(11))
    return out / 2 + 0.5


def test_a1111_safetensors_edits_as_diffusers_from_single_file(ip2p_folder, tmp_path):
    """The A1111 file (the pruned single file, no model_ema.* keys), written from the diffusers folder."""
    model = build_model(load_checkpoint(str(ip2p_folder)), PRESETS["sd-1"])
    path = tmp_path / "instruct-pix2pix-00-22000.safetensors"
    SingleFile().save(model, str(path))
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_single_file(
        str(path), config=str(ip2p_folder), safety_checker=None, requires_safety_checker=False)
    paths = _sources(tmp_path)
    ref = _pipeline_images(pipe, paths)
    got = _engine_images(_ours(path, ema=True), paths)
    assert (got - ref).abs().max() <= TOL


@pytest.mark.parametrize("ema", [True, False])
def test_export_round_trips_through_diffusers(lightning_ckpt, tmp_path, ema):
    ckpt, trained, other = lightning_ckpt
    model = _ours(ckpt, ema=ema)
    truth = diffusers.UNet2DConditionModel.from_pretrained(str(other if ema else trained), subfolder="unet").state_dict()
    save_edit_model(model, str(tmp_path / "folder"))
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(str(tmp_path / "folder"))
    assert type(pipe).__name__ == "StableDiffusionInstructPix2PixPipeline"
    _equal(pipe.unet.state_dict(), truth)
    save_edit_model(model, str(tmp_path / "edit.safetensors"), format="single-file")
    single = diffusers.UNet2DConditionModel.from_single_file(str(tmp_path / "edit.safetensors"), config=str(trained),
                                                             subfolder="unet")
    _equal(single.state_dict(), truth)


def test_single_file_yaml_says_editor(lightning_ckpt, tmp_path):
    """The yaml beside an exported editor is timbrooks' generate.yaml in what a CompVis/A1111 tool
    reads to build an editor (hybrid conditioning of ddpm_edit.LatentDiffusion, 8 UNet channels);
    read back, a yaml that says otherwise is refused naming conditioning_key."""
    import yaml

    from t2i_engine.errors import CheckpointError

    ckpt, _, _ = lightning_ckpt
    path = tmp_path / "edit.safetensors"
    save_edit_model(_ours(ckpt, ema=True), str(path), format="single-file")
    cfg = yaml.safe_load((tmp_path / "edit.yaml").read_text())
    params = cfg["model"]["params"]
    assert cfg["model"]["target"] == "ldm.models.diffusion.ddpm_edit.LatentDiffusion"
    assert (params["conditioning_key"], params["first_stage_key"], params["cond_stage_key"]) == ("hybrid", "edited", "edit")
    assert params["unet_config"]["params"]["in_channels"] == 8
    save_file(read_state_dict(str(path)), str(tmp_path / "bare.safetensors"))  # no metadata: the yaml is read
    bare_yaml = tmp_path / "bare.yaml"
    bare_yaml.write_text(yaml.safe_dump(cfg))
    model = build_model(load_checkpoint(str(tmp_path / "bare.safetensors")), PRESETS["sd-1"],
                        overrides={"unet_heads": (2, 2), "text_heads": 4})
    assert model.unet.conv_in.in_channels == 8
    for edit, message in [({"conditioning_key": "crossattn"}, "in_channels is 8"),
                          ({"conditioning_key": "concat"}, "InstructPix2Pix editors"),
                          ({"unet_config": {**params["unet_config"], "params": {**params["unet_config"]["params"],
                                                                                "in_channels": 9}}}, "inpainting")]:
        bare_yaml.write_text(yaml.safe_dump({"model": {**cfg["model"], "params": {**params, **edit}}}))
        with pytest.raises(CheckpointError, match=f"conditioning_key.*{message}"):
            load_checkpoint(str(tmp_path / "bare.safetensors"))


def test_export_refuses_a_plain_sd_model(sd1_folder, tmp_path):
    _, folder = sd1_folder
    with pytest.raises(ValueError, match="8 input channels"):
        save_edit_model(build_model(load_checkpoint(str(folder)), PRESETS["sd-1"]), str(tmp_path / "x"))


def _export_job(tmp_path, ckpt, extra=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = tmp_path / "job.toml"
    job.write_text(f"""[engine]
plugins = ["sd", "instructpix2pix"]
device = "cpu"
output_dir = "{tmp_path / 'out'}"
[task]
name = "edit-export"
output = "converted"
{extra}
[model]
type = "stable-diffusion"
checkpoint = "{ckpt}"
preset = "sd-1"
unet_heads = [2, 2]
text_heads = 4
""")
    return job


def test_export_job_keys_act(lightning_ckpt, tmp_path):
    from .test_train_job import _run

    ckpt, trained, other = lightning_ckpt
    ema = _run(_export_job(tmp_path / "a", ckpt))
    raw = _run(_export_job(tmp_path / "b", ckpt, "ema = false"))
    for summary, folder in ((ema, other), (raw, trained)):
        got = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(summary["exported"]).unet.state_dict()
        _equal(got, diffusers.UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").state_dict())
    half = _run(_export_job(tmp_path / "c", ckpt, 'format = "single-file"\ndtype = "float16"'),
                'task.output="edit.safetensors"')
    assert read_state_dict(half["exported"])["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
