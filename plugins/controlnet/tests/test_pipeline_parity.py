"""Images through the core's generate() with ``controlnet`` entries against diffusers'
StableDiffusionControlNetPipeline: the same saved folders (loaded with from_pretrained), noise,
prompts, hint PNGs and scheduler (DDIM swapped in with from_config), guidance 7.5, at 1e-3."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.conditioning import ConditionerChain, ConditionerKeys, Entry
from t2i_engine.diffusion.guidance import GuidanceConfig
from t2i_engine.diffusion.registry import SAMPLERS, DDIMConfig
from t2i_engine.pipeline import generate
from t2i_plugin_controlnet.conditioner import ControlNetConditioner, ControlNetConditionerConfig
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

from .conftest import hint_png

PROMPTS, NEGATIVE = ["a red square", "a blue circle"], ["", "green"]


@pytest.fixture(scope="module")
def model(sd_controlnets):
    sd, _ = sd_controlnets
    return build_model(DiffusersFolder().load(str(sd)), PRESETS["sd-1"])


def _reference(sd, nets, images, noise, **kwargs):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    controlnets = [ControlNetModel.from_pretrained(str(f)) for f in nets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(sd), controlnet=controlnets if len(nets) > 1 else controlnets[0], safety_checker=None,
        requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pil = [Image.open(p).convert("RGB") for p in images]
    image = pil[0] if len(nets) == 1 and len(pil) == 1 else pil  # one net, several hints: one per prompt
    return pipe(PROMPTS, negative_prompt=NEGATIVE, image=image, latents=noise.clone(),
                num_inference_steps=6, guidance_scale=7.5, height=16, width=16, output_type="pt", **kwargs).images


def _ours(model, entries, noise):
    chain = ConditionerChain([Entry(ControlNetConditioner(ControlNetConditionerConfig(checkpoint=str(f), **own)),
                                    keys=keys) for f, keys, own in entries])
    for e in chain.entries:
        e.conditioner.setup(model)
    return generate(model, PROMPTS, noise, sampler=SAMPLERS["ddim"](DDIMConfig(steps=6)),
                    guidance=GuidanceConfig(guidance_scale=7.5), negative_prompts=NEGATIVE,
                    conditioners=chain if chain.entries else None) / 2 + 0.5


def _noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def test_one_controlnet_with_scale_and_window(sd_controlnets, model, tmp_path):
    sd, (net, _) = sd_controlnets
    hint = hint_png(tmp_path / "hint.png", seed=1)
    ref = _reference(sd, [net], [hint], _noise(), controlnet_conditioning_scale=0.7,
                     control_guidance_start=0.2, control_guidance_end=0.8)
    keys = ConditionerKeys(scale=0.7, start=0.2, end=0.8, inputs={"image": str(hint)})
    got = _ours(model, [(net, keys, {})], _noise())
    assert (got - ref).abs().max() <= 1e-3
    plain = generate(model, PROMPTS, _noise(), sampler=SAMPLERS["ddim"](DDIMConfig(steps=6)),
                     guidance=GuidanceConfig(guidance_scale=7.5), negative_prompts=NEGATIVE) / 2 + 0.5
    assert (got - plain).abs().max() > 1e-2  # the ControlNet acts


def test_two_controlnets_sum(sd_controlnets, model, tmp_path):
    sd, nets = sd_controlnets
    hints = [hint_png(tmp_path / f"hint{i}.png", seed=i) for i in range(2)]
    ref = _reference(sd, nets, hints, _noise(), controlnet_conditioning_scale=[0.7, 1.2],
                     control_guidance_start=[0.0, 0.3], control_guidance_end=[0.6, 1.0])
    entries = [(nets[0], ConditionerKeys(scale=0.7, end=0.6, inputs={"image": str(hints[0])}), {}),
               (nets[1], ConditionerKeys(scale=1.2, start=0.3, inputs={"image": str(hints[1])}), {})]
    got = _ours(model, entries, _noise())
    assert (got - ref).abs().max() <= 1e-3


def test_guess_mode(sd_controlnets, model, tmp_path):
    """diffusers' guess mode = the logspace law (guess_mode) on the conditional branch only (branch)."""
    sd, (net, _) = sd_controlnets
    hint = hint_png(tmp_path / "hint.png", seed=1)
    ref = _reference(sd, [net], [hint], _noise(), guess_mode=True, controlnet_conditioning_scale=0.9)
    keys = ConditionerKeys(scale=0.9, branch="cond", inputs={"image": str(hint)})
    got = _ours(model, [(net, keys, {"guess_mode": True})], _noise())
    assert (got - ref).abs().max() <= 1e-3
    both = _ours(model, [(net, ConditionerKeys(scale=0.9, inputs={"image": str(hint)}), {"guess_mode": True})],
                 _noise())
    assert (both - ref).abs().max() > 1e-2  # the branch key is half of guess mode


def test_sd2_layout_with_v_prediction(sd2v_controlnet, tmp_path):
    """SD 2's layout (linear projections, per-level heads, v-prediction)."""
    sd, net = sd2v_controlnet
    model = build_model(DiffusersFolder().load(str(sd)), PRESETS["sd-1"])
    hint = hint_png(tmp_path / "hint.png", seed=4)
    ref = _reference(sd, [net], [hint], _noise(), controlnet_conditioning_scale=0.8, control_guidance_end=0.7)
    got = _ours(model, [(net, ConditionerKeys(scale=0.8, end=0.7, inputs={"image": str(hint)}), {})], _noise())
    assert (got - ref).abs().max() <= 1e-3
    assert (got - _ours(model, [], _noise())).abs().max() > 1e-2  # the ControlNet acts


def test_per_sample_hints_are_each_sample_alone_with_its_hint(sd_controlnets, model, tmp_path):
    """``ConditionerChain.set_images``: one hint per sample in one batch gives every image as a run of
    that sample alone with its hint file, and diffusers' pipeline given a list of one hint per prompt."""
    from t2i_engine.conditioning.inputs import load_image

    sd, (net, _) = sd_controlnets
    hints = [hint_png(tmp_path / f"hint{i}.png", seed=20 + i) for i in range(2)]
    chain = ConditionerChain([Entry(ControlNetConditioner(ControlNetConditionerConfig(checkpoint=str(net))),
                                    keys=ConditionerKeys(scale=0.8), label="cn")])
    chain.entries[0].conditioner.setup(model)
    chain.set_images("cn", "image", torch.cat([load_image(str(h), width=16, height=16) for h in hints]))
    run = {"sampler": SAMPLERS["ddim"](DDIMConfig(steps=6)), "guidance": GuidanceConfig(guidance_scale=7.5)}
    batch = generate(model, PROMPTS, _noise(), negative_prompts=NEGATIVE, conditioners=chain, **run) / 2 + 0.5
    for i, hint in enumerate(hints):
        alone = _ours(model, [(net, ConditionerKeys(scale=0.8, inputs={"image": str(hint)}), {})], _noise())
        own = ConditionerChain([Entry(chain.entries[0].conditioner,
                                      keys=ConditionerKeys(scale=0.8, inputs={"image": str(hint)}))])
        single = generate(model, PROMPTS[i:i + 1], _noise()[i:i + 1], negative_prompts=NEGATIVE[i:i + 1],
                          conditioners=own, **run) / 2 + 0.5
        assert (batch[i] - single[0]).abs().max() <= 1e-5
        assert (batch[i] - alone[i]).abs().max() <= 1e-5 and (batch[1 - i] - alone[1 - i]).abs().max() > 1e-3
    ref = _reference(sd, [net], hints, _noise(), controlnet_conditioning_scale=0.8)  # a list: one hint per prompt
    assert (batch - ref).abs().max() <= 1e-3
