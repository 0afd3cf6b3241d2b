"""The Imagen base UNet and Efficient U-Net: shapes, NeMo's parameter layout (names written out
from NeMo's ``nets.py`` / ``blocks.py``), zero-initialised residual branches, the Efficient U-Net's
shortcut scaling and resampling order, attention pooling, the attention formulas written out."""

from __future__ import annotations

import math

import pytest
import torch

from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_plugin_imagen.imagen_blocks import EfficientResBlock, FusedCrossAttention, SelfAttentionPooling
from t2i_plugin_imagen.imagen_unet import EfficientUNet, ImagenUNet, build_unet

D = 16  # text width


def _cond(B: int, L: int = 5, *, lowres: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> Conditioning:
    g = torch.Generator().manual_seed(1)
    c = Conditioning(text=TextEmbedding(torch.randn(B, L, D, generator=g), mask))
    if lowres is not None:
        c = c.with_extras(lowres=lowres, lowres_t=torch.randn(B, generator=g))
    return c


def _randomize(net: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised layers would hide most of the network)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


def _base(**kw) -> ImagenUNet:
    opts = dict(embed_dim=8, image_size=16, text_embed_dim=D, channel_mult=[1, 2], num_res_blocks=[1, 2], cond_dim=8,
                attention_resolutions=[8], per_head_channels=4, norm_groups=4)
    return build_unet("base", {**opts, **kw})  # type: ignore[return-value]


def _sr(**kw) -> EfficientUNet:
    opts = dict(embed_dim=8, image_size=16, text_embed_dim=D, channel_mult=[1, 2, 2], num_resblocks=[1, 2, 1],
                atnn_enabled_at=[0, 0, 1], per_head_channels=4, norm_groups=4, noise_cond_aug=True)
    return build_unet("sr", {**opts, **kw})  # type: ignore[return-value]


@pytest.mark.parametrize("kw", [{}, {"attention_type": "stacked", "feature_pooling_type": "mean"},
                                {"resblock_updown": True, "use_null_token": True, "learned_sinu_pos_emb_dim": 0},
                                {"resample_with_conv": False, "scale_shift_norm": False, "init_conv_kernel_size": 7}])
def test_base_unet_shapes(kw):
    net = _randomize(_base(**kw))
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2), _cond(2))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_sr_unets_shapes_and_lowres_upsampled():
    net = _randomize(_sr())
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2), _cond(2, lowres=torch.randn(2, 3, 8, 8)))
    assert out.shape == (2, 3, 16, 16)
    base_sr = _randomize(_base(low_res_cond=True, noise_cond_aug=True))
    assert base_sr(torch.randn(2, 3, 16, 16), torch.randn(2), _cond(2, lowres=torch.randn(2, 3, 8, 8))).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="lowres"):
        net(torch.randn(2, 3, 16, 16), torch.randn(2), _cond(2))


def test_nemo_parameter_names():
    """Names from NeMo's UNetModel / EfficientUNetModel for these configs (input_blocks: conv, then
    per level its ResBlocks [+ attention], then a Downsample; output_blocks: blocks + 1 per level)."""
    base = set(_base(use_null_token=True).state_dict())
    for key in ("time_embed.0.weights", "time_embed.1.weight", "time_embed.3.weight", "attention_pooling.0.W.weight",
                "attention_pooling.1.weight", "attention_pooling.2.weight", "text_to_cond.weight",
                "to_text_non_attn_cond.0.weight", "to_text_non_attn_cond.3.weight", "null_text_embedding",
                "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
                "input_blocks.1.0.out_layers.3.weight", "input_blocks.2.0.op.weight", "input_blocks.3.0.skip_connection.weight",
                "input_blocks.3.1.kv_context.weight", "input_blocks.4.1.kv_self.weight", "input_blocks.4.1.norm_context.weight",
                "middle_block.0.in_layers.0.weight", "middle_block.1.q.weight", "middle_block.2.out_layers.0.weight",
                "output_blocks.0.1.proj_out.weight", "output_blocks.2.2.conv.weight", "output_blocks.4.0.skip_connection.weight",
                "out.0.weight", "out.2.weight"):
        assert key in base, key
    assert not any(k.startswith(("input_blocks.5", "output_blocks.5")) for k in base)
    sr = set(_sr().state_dict())
    for key in ("init_conv.weight", "lowres_time_embed.1.weight", "DBlocks.0.conv.weight", "DBlocks.0.blocks.0.shortcut.weight",
                "DBlocks.1.blocks.1.out_layers.2.weight", "DBlocks.2.attention_layer.kv_context.weight",
                "UBlocks.2.attention_layer.q.weight", "UBlocks.0.conv.weight", "out.weight"):
        assert key in sr, key
    assert "DBlocks.2.conv.weight" not in sr and "UBlocks.2.conv.weight" not in sr  # the deepest level keeps its size
    assert "DBlocks.1.attention_layer.q.weight" not in sr  # atnn_enabled_at = 0 there


def test_fresh_base_unet_outputs_zero_and_fresh_blocks_are_identity():
    """NeMo zero-initialises the output conv, each ResBlock's last conv and each attention's
    proj_out: a fresh base UNet outputs exactly 0."""
    net = _base()
    assert net(torch.randn(2, 3, 16, 16), torch.randn(2), _cond(2)).abs().max() == 0
    block = net.middle_block[1]  # fused attention, zero proj_out: the identity
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x, torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)), x)


def test_efficient_resblock_shortcut_scaled_by_inverse_sqrt2():
    block = EfficientResBlock(4, 8, 6, groups=2, skip_scaling=True)
    x, emb = torch.randn(2, 4, 5, 5), torch.randn(2, 8)
    expected = torch.nn.functional.conv2d(x, block.shortcut.weight, block.shortcut.bias) / math.sqrt(2)
    torch.testing.assert_close(block(x, emb), expected)  # the residual branch ends in a zero conv
    plain = EfficientResBlock(4, 8, 6, groups=2, skip_scaling=False)
    plain.load_state_dict(block.state_dict())
    torch.testing.assert_close(plain(x, emb), expected * math.sqrt(2))


def test_efficient_unet_resamples_before_down_blocks_and_after_up_blocks():
    net = _sr()
    sizes = {}
    for name, module in net.named_modules():
        if name.count(".") == 3 and ".blocks." in name:
            def record(m, i, o, name=name) -> None:
                sizes.setdefault(name, (i[0].shape[-1], o.shape[-1]))

            module.register_forward_hook(record)
    net(torch.randn(1, 3, 16, 16), torch.randn(1), _cond(1, lowres=torch.randn(1, 3, 8, 8)))
    assert sizes["DBlocks.0.blocks.0"] == (8, 8)  # the first level's blocks already run at half size
    assert sizes["DBlocks.2.blocks.0"] == (4, 4)  # the deepest level does not resample
    assert sizes["UBlocks.0.blocks.0"] == (8, 8)  # the up level's blocks run before its upsampling


def test_attention_pooling_is_a_softmax_weighted_sum():
    pool = SelfAttentionPooling(D)
    x = torch.randn(3, 7, D)
    w = torch.softmax(x @ pool.W.weight[0] + pool.W.bias, dim=1)  # (3, 7)
    torch.testing.assert_close(pool(x), torch.einsum("bl,bld->bd", w, x))
    torch.nn.init.zeros_(pool.W.weight)
    torch.testing.assert_close(pool(x), x.mean(dim=1))  # equal scores: the mean
    perm = torch.randperm(7)
    torch.testing.assert_close(pool(x[:, perm]), pool(x))


def test_pooled_text_enters_the_time_embedding():
    net = _randomize(_base(attention_resolutions=[1]))  # no attention at 16 or 8: text only through the pooling
    for block in (net.middle_block[1],):
        torch.nn.init.zeros_(block.proj_out.weight), torch.nn.init.zeros_(block.proj_out.bias)
    x, t = torch.randn(1, 3, 16, 16), torch.randn(1)
    a, b = _cond(1), _cond(1)
    b.text.tokens = b.text.tokens.flip(-1)
    assert (net(x, t, a) - net(x, t, b)).abs().max() > 1e-4


def test_fused_attention_is_nemo_formula_with_masked_text_keys():
    torch.manual_seed(0)
    att = _randomize(FusedCrossAttention(8, D, heads=2, groups=2))
    x, ctx = torch.randn(2, 8, 3, 3), torch.randn(2, 4, D)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = att(x, ctx, mask)
    # NeMo FusedCrossAttentionBlock written out: q from norm(x); k, v = [self | context]; heads on channels
    flat = x.reshape(2, 8, 9)
    q = att.q(att.norm(flat))
    ks, vs = att.kv_self(att.norm_self(flat)).chunk(2, 1)
    kc, vc = att.kv_context(att.norm_context(ctx.transpose(1, 2))).chunk(2, 1)
    k, v = torch.cat([ks, kc], 2), torch.cat([vs, vc], 2)
    q, k, v = (t.reshape(4, 4, -1) for t in (q, k, v))  # (B * heads, d, L)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(4))
    full = torch.cat([torch.ones(2, 9, dtype=torch.bool), mask], 1).repeat_interleave(2, 0)[:, None, :]
    w = w.masked_fill(~full, -math.inf).softmax(-1)
    h = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 8, 9)
    torch.testing.assert_close(out, (flat + att.proj_out(h)).reshape(2, 8, 3, 3), atol=1e-5, rtol=1e-5)
    # (padding tokens still enter norm_context's statistics, as in NeMo: GroupNorm over the sequence)


def test_noise_level_embedding_has_an_effect_and_is_required():
    net = _randomize(_sr())
    x, t = torch.randn(1, 3, 16, 16), torch.randn(1)
    c = _cond(1, lowres=torch.randn(1, 3, 8, 8))
    other = c.with_extras(lowres_t=c.extras["lowres_t"] + 1)
    assert (net(x, t, c) - net(x, t, other)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="lowres_t"):
        net(x, t, Conditioning(text=c.text, extras={"lowres": c.extras["lowres"]}))


def test_unknown_or_inconsistent_keys_are_errors():
    with pytest.raises(ValueError, match="unknown base UNet key.*num_resblocks"):
        build_unet("base", {"num_resblocks": [1, 2]})
    with pytest.raises(ValueError, match="num_res_blocks has 3 entries"):
        _base(num_res_blocks=[1, 1, 1])
    with pytest.raises(ValueError, match="atnn_enabled_at has 2 entries"):
        _sr(atnn_enabled_at=[0, 1])
    with pytest.raises(ValueError, match="unet_type"):
        build_unet("xl", {})


BASE_CHANGES = {"embed_dim": 4, "channel_mult": [1, 1], "num_res_blocks": [2, 1], "attention_resolutions": [16],
                "per_head_channels": 8, "cond_dim": 4, "attention_type": "stacked", "feature_pooling_type": "mean",
                "learned_sinu_pos_emb_dim": 0, "use_null_token": True, "init_conv_kernel_size": 5,
                "scale_shift_norm": False, "resblock_updown": True, "resample_with_conv": False, "norm_groups": 2}
SR_CHANGES = {"embed_dim": 4, "channel_mult": [1, 1, 2], "num_resblocks": [2, 1, 1], "atnn_enabled_at": [0, 1, 1],
              "per_head_channels": 8, "attention_type": "stacked", "feature_pooling_type": "mean",
              "learned_sinu_pos_emb_dim": 0, "use_null_token": True, "init_conv_kernel_size": 5,
              "scale_shift_norm": False, "skip_connection_scaling": True, "norm_groups": 2}


def _out(net, lowres: bool) -> torch.Tensor:
    _randomize(net)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, generator=g)
    return net(x, t, _cond(2, lowres=torch.randn(2, 3, 8, 8, generator=g) if lowres else None))


@pytest.mark.parametrize("key", sorted(BASE_CHANGES))
def test_every_base_key_changes_the_output(key):
    assert not torch.allclose(_out(_base(), False), _out(_base(**{key: BASE_CHANGES[key]}), False))


@pytest.mark.parametrize("key", sorted(SR_CHANGES))
def test_every_sr_key_changes_the_output(key):
    assert not torch.allclose(_out(_sr(), True), _out(_sr(**{key: SR_CHANGES[key]}), True))


def test_heads_dropout_and_lowres_keys():
    a, b = _out(_base(per_head_channels=0, num_attn_heads=1), False), _out(_base(per_head_channels=0, num_attn_heads=4), False)
    assert not torch.allclose(a, b)
    net = _randomize(_base(dropout=0.5)).train()
    x, t = torch.randn(1, 3, 16, 16), torch.randn(1)
    assert not torch.allclose(net(x, t, _cond(1)), net(x, t, _cond(1)))
    assert _out(_base(low_res_cond=True), True).shape == (2, 3, 16, 16)
    assert not torch.allclose(_out(_sr(), True), _out(_sr(stride=2, noise_cond_aug=False), True))


@pytest.mark.parametrize("attention_type", ["fused", "stacked"])
def test_caption_mask_reaches_every_text_attention_true_at_real_tokens(attention_type, monkeypatch):
    """End to end (word tokenizer -> T5 -> UNet): each text attention gets the mask True exactly
    where the caption has a token (ids other than <pad>), and the real attention gives the padding
    keys no weight: changing their values leaves its output as it was, changing a real token's
    value does not."""
    from t2i_plugin_imagen import imagen_blocks
    from t2i_plugin_imagen.word_t5 import WordT5Config, build_word_t5

    enc = build_word_t5(WordT5Config(words=["a", "red", "circle"], d_model=D, d_kv=4, d_ff=32, num_layers=1,
                                     num_heads=2, token_length=6))
    prompts = ["a red circle", "a circle"]
    ids, _ = enc.tokenize(prompts)
    truth = ids != 0  # [a red circle </s> pad pad], [a circle </s> pad pad pad]
    net = _randomize(_base(attention_type=attention_type, attention_resolutions=[16, 8]))
    seen, padding_moved, token_moved = [], [], []
    real_attend = imagen_blocks._attend

    def spy(q, k, v, heads, key_mask):
        out = real_attend(q, k, v, heads, key_mask)
        if key_mask is not None:
            text = key_mask.shape[1] - ids.shape[1]  # the text keys come last
            seen.append(key_mask[:, text:].clone())
            for keys, moved in ((~truth, padding_moved), (truth, token_moved)):
                shifted = v.clone()
                shifted[:, :, text:] += 10.0 * keys[:, None, :]
                moved.append((real_attend(q, k, shifted, heads, key_mask) - out).abs().max().item())
        return out

    monkeypatch.setattr(imagen_blocks, "_attend", spy)
    net(torch.randn(2, 3, 16, 16), torch.zeros(2), Conditioning(text=enc.encode(prompts)))
    assert len(seen) == 9  # attention in 3 down blocks, the middle block and 5 up blocks
    assert truth.sum(1).tolist() == [4, 3]
    assert all(torch.equal(mask, truth) for mask in seen)
    assert max(padding_moved) < 1e-6 < 1e-3 < min(token_moved)  # rounding only, against a visible change
