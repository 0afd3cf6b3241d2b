"""The MiDaS DPT-Hybrid depth annotator on timm 1.x: the original file's key layout loads back
strictly, the encoder's features are what forward hooks on timm's own forward see (the original
code's mechanism), and the depth hint is a per-image [0, 1] map."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.errors import CheckpointError
from t2i_plugin_controlnet.midas import MIDAS_FILE, DPTHybrid, load_midas, midas_depth_hint


@pytest.fixture(scope="module")
def net() -> DPTHybrid:
    torch.manual_seed(0)
    return DPTHybrid().eval()


# keys of the original file (isl-org/MiDaS dpt_depth.py + blocks.py + vit.py on timm 0.4's vit_base_resnet50_384)
ORIGINAL_KEYS = [
    "pretrained.model.cls_token", "pretrained.model.pos_embed", "pretrained.model.patch_embed.backbone.stem.conv.weight",
    "pretrained.model.patch_embed.backbone.stem.norm.weight",
    "pretrained.model.patch_embed.backbone.stages.0.blocks.0.downsample.conv.weight",
    "pretrained.model.patch_embed.backbone.stages.2.blocks.8.conv3.weight",
    "pretrained.model.patch_embed.backbone.stages.2.blocks.8.norm3.bias", "pretrained.model.patch_embed.proj.weight",
    "pretrained.model.blocks.11.attn.qkv.weight", "pretrained.model.blocks.11.mlp.fc2.bias", "pretrained.model.norm.weight",
    "pretrained.act_postprocess3.0.project.0.weight", "pretrained.act_postprocess3.3.weight",
    "pretrained.act_postprocess4.0.project.0.bias", "pretrained.act_postprocess4.3.weight",
    "pretrained.act_postprocess4.4.weight", "scratch.layer1_rn.weight", "scratch.layer4_rn.weight",
    "scratch.refinenet1.out_conv.weight", "scratch.refinenet4.resConfUnit1.conv1.weight",
    "scratch.refinenet2.resConfUnit2.conv2.bias", "scratch.output_conv.0.weight", "scratch.output_conv.2.weight",
    "scratch.output_conv.4.weight", "scratch.output_conv.4.bias",
]


def test_the_original_layout_loads_back(net, tmp_path):
    state = net.state_dict()
    assert set(ORIGINAL_KEYS) <= set(state)
    assert not any(k.startswith("scratch.layer1_rn.bias") for k in state)  # the original's bias-free convs
    path = tmp_path / MIDAS_FILE
    torch.save({**state, "pretrained.model.head.weight": torch.zeros(1000, 768),
                "pretrained.model.head.bias": torch.zeros(1000)}, path)  # the file carries timm's classifier
    loaded = load_midas(str(path))
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    from t2i_plugin_controlnet.annotators import build_annotator
    from t2i_plugin_controlnet.conditioner import ControlNetConditionerConfig

    image = torch.rand(1, 3, 64, 64)
    annotator = build_annotator(ControlNetConditionerConfig(checkpoint="-", annotator="depth_midas",
                                                            midas_weights=str(path)))  # the entry's keys
    assert torch.equal(annotator(image, inputs={}), midas_depth_hint(net, image))
    torch.save({**state, "scratch.extra.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="scratch.extra.weight"):
        load_midas(str(path))
    with pytest.raises(CheckpointError, match=MIDAS_FILE):
        load_midas(str(tmp_path / "missing.pt"))


def test_the_encoder_sees_what_hooks_on_timms_forward_see(net):
    """The original reads ResNet stages 0 and 1 and ViT blocks 8 and 11 by forward hooks on timm's
    model; at 384 pixels (no position-embedding resize) timm's own forward is the reference."""
    vit = net.pretrained.model
    seen = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out))
             for k, m in (("1", vit.patch_embed.backbone.stages[0]), ("2", vit.patch_embed.backbone.stages[1]),
                          ("3", vit.blocks[8]), ("4", vit.blocks[11]))]
    x = torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(1)) * 2 - 1
    try:
        with torch.no_grad():
            vit.forward_features(x)
            ours = net.encode(x)
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(ours[0], seen["1"], atol=1e-5) and torch.allclose(ours[1], seen["2"], atol=1e-5)
    with torch.no_grad():
        for post, k, got in ((net.pretrained.act_postprocess3, "3", ours[2]), (net.pretrained.act_postprocess4, "4", ours[3])):
            ref = post[3:](post[0](seen[k]).transpose(1, 2).unflatten(2, (24, 24)))
            assert torch.allclose(got, ref, atol=1e-4)


def test_the_depth_hint_is_scaled_per_image(net):
    image = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    head = net.scratch.output_conv[4].weight
    saved = head.detach().clone()
    with torch.no_grad():
        head.abs_()  # random weights end in a ReLU that is mostly 0: make the depth vary
    try:
        hint = midas_depth_hint(net, image, resolution=64)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert hint.shape == (2, 3, 40, 56) and torch.equal(hint[:, 0], hint[:, 2])
    for h in hint:
        assert h.min() >= 0 and h.max() <= 1 and h.max() - h.min() > 0.5
