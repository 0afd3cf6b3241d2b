"""The ``controlnet`` conditioner: the SDK's conformance kit, its own keys (each checked against
diffusers' ControlNetModel where it has the same option), and the errors it gives."""

from __future__ import annotations

import shutil

import pytest
import torch

from t2i_engine.conditioning import ConditionerKeys, ConditionerChain, Entry
from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import ConditionInputs, Conditioning, TextEmbedding
from t2i_plugin_controlnet import plugin
from t2i_plugin_controlnet.conditioner import ControlNetConditioner, ControlNetConditionerConfig
from t2i_plugin_controlnet.network import guess_mode_scales
from t2i_plugin_sd.formats import DiffusersFolder
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

from .conftest import edit_config


@pytest.fixture(scope="module")
def model(sd_controlnets):
    sd, _ = sd_controlnets
    return build_model(DiffusersFolder().load(str(sd)), PRESETS["sd-1"])


def test_the_conformance_kit_passes(sd_controlnets, model):
    from t2i_sdk.testing import check_conditioner

    _, (folder, _) = sd_controlnets
    hint = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    check_conditioner(plugin, "controlnet", options={"checkpoint": str(folder)}, images={"image": hint}, model=model)


def _residuals(folder, model, **options):
    """The conditioner's residuals for fixed inputs (the hint given in [-1, 1], as the core loads it)."""
    conditioner = ControlNetConditioner(ControlNetConditionerConfig(checkpoint=str(folder), **options))
    conditioner.setup(model)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 321.0])
    context = torch.randn(2, 77, 32, generator=g)
    hint = torch.rand(2, 3, 16, 16, generator=g)
    inputs = ConditionInputs(branch="cond", prompts=["a", "b"], height=16, width=16, device=torch.device("cpu"),
                             dtype=torch.float32, images={"image": hint * 2 - 1})
    cond = conditioner.condition(Conditioning(text=TextEmbedding(tokens=context)), inputs)
    with torch.no_grad():
        res = conditioner.residuals(x, t, cond)
    return [*res.down, res.mid], (x, t, context, hint)


def _diffusers(folder, inputs, **kwargs):
    from diffusers import ControlNetModel

    x, t, context, hint = inputs
    with torch.no_grad():
        down, mid = ControlNetModel.from_pretrained(str(folder)).eval()(
            x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False, **kwargs)
    return [*down, mid]


def _close(a, b):
    return len(a) == len(b) and all(p.shape == q.shape and (p - q).abs().max() <= 1e-5 for p, q in zip(a, b))


def test_the_hint_is_the_image_in_0_1(sd_controlnets, model):
    _, (folder, _) = sd_controlnets
    ours, inputs = _residuals(folder, model)
    assert _close(ours, _diffusers(folder, inputs))


def test_guess_mode_is_diffusers_guess_mode_law(sd_controlnets, model):
    _, (folder, _) = sd_controlnets
    ours, inputs = _residuals(folder, model, guess_mode=True)
    assert _close(ours, _diffusers(folder, inputs, guess_mode=True))
    assert not _close(ours, _diffusers(folder, inputs))


def test_the_original_guess_mode_law(sd_controlnets, model):
    _, (folder, _) = sd_controlnets
    ours, inputs = _residuals(folder, model, guess_mode=True, guess_mode_law="original")
    plain = _diffusers(folder, inputs)
    scales = guess_mode_scales(len(plain), law="original")
    assert _close(ours, [r * float(s) for r, s in zip(plain, scales)])


@pytest.mark.parametrize(("key", "value", "field", "stored"), [
    ("channel_order", "bgr", "controlnet_conditioning_channel_order", "bgr"),
    ("global_average_pooling", True, "global_pool_conditions", True)])
def test_the_keys_override_the_checkpoint(sd_controlnets, model, tmp_path, key, value, field, stored):
    """The key on an rgb / unpooled checkpoint gives what diffusers gives with the field in the
    config; and the field in the config is what the conditioner uses by default."""
    _, (source, _) = sd_controlnets
    ours, inputs = _residuals(source, model, **{key: value})
    changed = tmp_path / "cn"
    shutil.copytree(source, changed)
    edit_config(changed, **{field: stored})
    reference = _diffusers(changed, inputs)
    assert _close(ours, reference)
    assert not _close(ours, _diffusers(source, inputs))
    default, _ = _residuals(changed, model)
    assert _close(default, reference)


def test_a_missing_hint_is_an_error_naming_the_input(sd_controlnets, model):
    _, (folder, _) = sd_controlnets
    conditioner = ControlNetConditioner(ControlNetConditionerConfig(checkpoint=str(folder)))
    conditioner.setup(model)
    inputs = ConditionInputs(branch="cond", prompts=["a"], height=16, width=16, device=torch.device("cpu"),
                             dtype=torch.float32, images={"hint": torch.zeros(1, 3, 16, 16)})
    with pytest.raises(ConfigError, match=r"inputs = \{ image = .*inputs given: hint"):
        conditioner.condition(Conditioning(text=TextEmbedding(tokens=torch.zeros(1, 77, 32))), inputs)


def test_a_controlnet_for_another_autoencoder_is_refused_at_setup(sd_controlnets, model, tmp_path):
    from .conftest import tiny_controlnet
    from diffusers import UNet2DConditionModel

    sd, _ = sd_controlnets
    unet = UNet2DConditionModel.from_pretrained(str(sd), subfolder="unet")
    tiny_controlnet(unet, seed=0, conditioning_embedding_out_channels=(16, 32, 96, 256)).save_pretrained(tmp_path / "f8")
    conditioner = ControlNetConditioner(ControlNetConditionerConfig(checkpoint=str(tmp_path / "f8")))
    with pytest.raises(ConfigError, match="shrinks images 8x but the model's autoencoder 2x"):
        conditioner.setup(model)


def test_two_entries_use_their_own_hints(sd_controlnets, model):
    """Two ControlNets in one chain (multi-ControlNet): each reads its own extras key."""
    _, (a, b) = sd_controlnets
    first, second = (ControlNetConditioner(ControlNetConditionerConfig(checkpoint=str(f))) for f in (a, b))
    assert first.key != second.key
    first.setup(model)
    second.setup(model)
    chain = ConditionerChain([Entry(first, keys=ConditionerKeys()), Entry(second, keys=ConditionerKeys())])
    assert len(list(chain.parameters())) > 0 and not list(chain.trainable_parameters())


def test_canny_marks_the_outline_of_a_square():
    """A property of edge detection: on a white square, edges lie on its outline and cover it."""
    from t2i_plugin_controlnet.annotators import annotate

    image = torch.zeros(1, 3, 32, 32)
    image[..., 8:24, 8:24] = 1
    edges = annotate(image, "canny", canny_low=0.1, canny_high=0.2)
    assert edges.shape == image.shape and set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(edges[:, 0], edges[:, 2])
    ys, xs = edges[0, 0].nonzero().unbind(1)
    on_outline = ((ys - 7.5).abs() <= 1) | ((ys - 23.5).abs() <= 1) | ((xs - 7.5).abs() <= 1) | ((xs - 23.5).abs() <= 1)
    assert bool(on_outline.all()) and len(ys) >= 4 * 15  # the whole outline, nothing inside or outside
    assert torch.equal(annotate(image, "none", canny_low=0.1, canny_high=0.2), image)


def test_the_annotator_key_makes_the_hint(sd_controlnets, model):
    _, (folder, _) = sd_controlnets
    plain, _ = _residuals(folder, model)
    canny, _ = _residuals(folder, model, annotator="canny")
    assert not _close(plain, canny)
    stricter, _ = _residuals(folder, model, annotator="canny", canny_low=0.3, canny_high=0.6)
    assert not _close(canny, stricter)


def test_canny_thresholds_are_validated():
    with pytest.raises(ValueError, match="canny_high"):
        ControlNetConditionerConfig(checkpoint="x", canny_low=0.5, canny_high=0.4)


def test_a_hint_of_the_wrong_size_is_an_error_saying_the_sizes(sd_controlnets, model):
    _, (folder, _) = sd_controlnets
    conditioner = ControlNetConditioner(ControlNetConditionerConfig(checkpoint=str(folder)))
    conditioner.setup(model)
    cond = Conditioning(text=TextEmbedding(tokens=torch.zeros(1, 77, 32)), extras={conditioner.key: torch.zeros(1, 3, 12, 12)})
    with pytest.raises(ConfigError, match=r"the hint is \(12, 12\) pixels but the latents \(8, 8\) need \(16, 16\)"):
        conditioner.residuals(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), cond)


def test_the_inpaint_annotator_sets_masked_pixels_to_minus_one():
    """diffusers' make_inpaint_condition: the image in [0, 1], -1 where the mask is white."""
    from t2i_plugin_controlnet.annotators import ANNOTATORS

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 8, 8, generator=g)
    mask = -torch.ones(2, 3, 8, 8)
    mask[:, :, 2:5, 3:7] = 1.0  # white: repaint
    cfg = type("Cfg", (), {"annotator": "inpaint"})()
    hint = ANNOTATORS["inpaint"](cfg)(image, inputs={"mask": mask})
    ref = image.clone()
    ref[:, :, 2:5, 3:7] = -1.0
    assert torch.equal(hint, ref)
    with pytest.raises(ConfigError, match="mask = "):
        ANNOTATORS["inpaint"](cfg)(image, inputs={})


def test_annotators_are_a_registry():
    from t2i_plugin_controlnet.annotators import ANNOTATORS, register_annotator

    assert {"none", "canny", "inpaint", "depth_midas"} <= set(ANNOTATORS)
    with pytest.raises(ValueError, match="twice"):
        register_annotator("canny")(lambda cfg: None)
    try:
        register_annotator("test-invert")(lambda cfg: (lambda image, *, inputs: 1 - image))
        from t2i_plugin_controlnet.conditioner import ControlNetConditionerConfig

        assert ControlNetConditionerConfig(checkpoint="-", annotator="test-invert").annotator == "test-invert"
    finally:
        ANNOTATORS.pop("test-invert", None)
    with pytest.raises(ValueError, match="one of none, canny"):
        ControlNetConditionerConfig(checkpoint="-", annotator="sobel")


def test_depth_midas_without_weights_names_the_file():
    from t2i_plugin_controlnet.annotators import build_annotator
    from t2i_plugin_controlnet.conditioner import ControlNetConditionerConfig

    with pytest.raises(ConfigError, match=r"midas_weights = \"path/to/dpt_hybrid-midas-501f0c75.pt\""):
        build_annotator(ControlNetConditionerConfig(checkpoint="-", annotator="depth_midas"))
