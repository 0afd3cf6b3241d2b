"""The LoRA scaling law, merge/unmerge and training, against plain matrix algebra."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from t2i_engine.adapters import Adapter, ConvShape, LoRA, attach, create_adapter, find_targets, trainable_parameters


def _random(layer: LoRA, seed: int) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.down.weight.copy_(torch.randn(layer.down.weight.shape, generator=g))
        layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g))
    return layer


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.point = nn.Conv2d(4, 4, 1)

    def forward(self, x, img):
        return self.fc(x), self.point(self.conv(img))


@pytest.mark.parametrize("alpha, multiplier", [(None, 1.0), (2.0, 1.0), (2.0, 0.5), (0.0, -0.7), (8.0, 1.5)])
def test_linear_scaling_law(alpha, multiplier):
    """W x + b + up @ down @ x * multiplier * alpha / rank, alpha absent or 0 meaning rank."""
    torch.manual_seed(0)
    model = Toy()
    rank = 4
    layer = _random(LoRA(6, 5, rank, alpha=alpha, multiplier=multiplier), 1)
    attach(model, Adapter({"fc": layer}))
    x = torch.randn(3, 6)
    scale = multiplier * (alpha if alpha else rank) / rank
    expected = x @ model.fc.weight.T + model.fc.bias + (x @ layer.down.weight.T @ layer.up.weight.T) * scale
    got, _ = model(x, torch.randn(1, 3, 8, 8))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_3x3_and_1x1_scaling_law():
    """The LoCon layout (kxk down with the base geometry, 1x1 up) is one convolution by the
    weight up @ down, computed here with einsum."""
    torch.manual_seed(0)
    model = Toy()
    conv = _random(LoRA(3, 4, 2, alpha=1.0, multiplier=0.8, conv=ConvShape.of(model.conv)), 2)
    point = _random(LoRA(4, 4, 3, alpha=6.0, conv=ConvShape.of(model.point)), 3)
    attach(model, Adapter({"conv": conv, "point": point}))
    img = torch.randn(2, 3, 9, 9)
    w_conv = torch.einsum("or,rikl->oikl", conv.up.weight[:, :, 0, 0], conv.down.weight) * (0.8 * 1.0 / 2)
    w_point = torch.einsum("or,rikl->oikl", point.up.weight[:, :, 0, 0], point.down.weight) * (6.0 / 3)
    h = F.conv2d(img, model.conv.weight + w_conv, model.conv.bias, stride=2, padding=1)
    expected = F.conv2d(h, model.point.weight + w_point, model.point.bias)
    _, got = model(torch.randn(1, 6), img)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_several_adapters_with_their_own_multipliers():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(4, 6)
    base, _ = model(x, torch.randn(1, 3, 4, 4))
    a = attach(model, Adapter({"fc": _random(LoRA(6, 5, 2, alpha=1.0), 1)}, name="a"))
    b = attach(model, Adapter({"fc": _random(LoRA(6, 5, 3), 2)}, name="b"))
    a.multiplier, b.multiplier = 0.3, -1.2
    da = (x @ a["fc"].down.weight.T @ a["fc"].up.weight.T) * 0.3 * 1.0 / 2
    db = (x @ b["fc"].down.weight.T @ b["fc"].up.weight.T) * -1.2
    torch.testing.assert_close(model(x, torch.randn(1, 3, 4, 4))[0], base + da + db, rtol=1e-5, atol=1e-5)
    b.enabled = False
    torch.testing.assert_close(model(x, torch.randn(1, 3, 4, 4))[0], base + da, rtol=1e-5, atol=1e-5)
    a.detach()
    b.detach()
    torch.testing.assert_close(model(x, torch.randn(1, 3, 4, 4))[0], base)
    assert not model.fc._forward_hooks


def test_merge_equals_unmerged_and_unmerge_restores_weights():
    torch.manual_seed(0)
    model = Toy()
    before = copy.deepcopy(model.state_dict())
    adapters = [attach(model, Adapter({"fc": _random(LoRA(6, 5, 2, alpha=3.0, multiplier=m), s),
                                       "conv": _random(LoRA(3, 4, 2, conv=ConvShape.of(model.conv), multiplier=m), s + 1),
                                       "point": _random(LoRA(4, 4, 1, conv=ConvShape.of(model.point)), s + 2)},
                                      name=f"a{s}")) for s, m in ((1, 0.7), (5, -0.4))]
    x, img = torch.randn(3, 6), torch.randn(2, 3, 8, 8)
    unmerged = model(x, img)
    for a in adapters:
        a.merge()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    merged = model(x, img)
    for u, m in zip(unmerged, merged):
        torch.testing.assert_close(m, u, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        adapters[0].multiplier = 2.0
    for a in reversed(adapters):
        a.unmerge()
    for k, v in model.state_dict().items():
        assert (v - before[k]).abs().max() <= 1e-6, k
    assert set(model.state_dict()) == set(before)  # attaching never changes the model's keys


def test_fused_attention_slices_equal_separate_projections():
    """q/k/v LoRA on nn.MultiheadAttention's fused in_proj and on out_proj equals the same
    attention whose weights were edited by hand: rows [i*d:(i+1)*d] += scale * up @ down."""
    torch.manual_seed(0)
    d = 8
    mha = nn.MultiheadAttention(d, 2, batch_first=True).eval()
    targets = find_targets(mha)
    assert set(targets) == {"in_proj.q", "in_proj.k", "in_proj.v", "out_proj"}
    layers = {"in_proj.q": _random(LoRA(d, d, 2, alpha=1.0), 1), "in_proj.v": _random(LoRA(d, d, 3), 2),
              "out_proj": _random(LoRA(d, d, 2, multiplier=0.5), 3)}
    edited = copy.deepcopy(mha)
    with torch.no_grad():
        edited.in_proj_weight[:d] += layers["in_proj.q"].up.weight @ layers["in_proj.q"].down.weight * 0.5
        edited.in_proj_weight[2 * d:] += layers["in_proj.v"].up.weight @ layers["in_proj.v"].down.weight
        edited.out_proj.weight += layers["out_proj"].up.weight @ layers["out_proj"].down.weight * 0.5
    adapter = attach(mha, Adapter(layers))
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        ref = edited(x, x, x, need_weights=False)[0]
        got = mha(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        adapter.merge()
        torch.testing.assert_close(mha.in_proj_weight, edited.in_proj_weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], ref, rtol=1e-5, atol=1e-5)
    assert set(mha.state_dict()) == set(edited.state_dict())


def test_training_updates_only_adapter_parameters_and_dropout_follows_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2))
    adapter = create_adapter(model, ["0", "2"], rank=2, alpha=1.0, dropout=0.5)
    params = trainable_parameters(model, [adapter])
    assert {id(p) for p in params} == {id(p) for p in adapter.parameters()}
    x = torch.randn(16, 6)
    model.train()
    model(x).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in params)
    torch.optim.SGD(params, lr=0.1).step()  # up leaves zero: the adapter now changes the output
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))  # dropout on the adapter's input in training
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_fresh_adapter_is_identity_and_patterns_must_match():
    torch.manual_seed(0)
    model = Toy()
    x, img = torch.randn(2, 6), torch.randn(1, 3, 8, 8)
    base = model(x, img)
    adapter = create_adapter(model, ["fc", "point"], rank=2)
    assert set(adapter.names()) == {"fc", "point"}
    for b, g in zip(base, model(x, img)):
        torch.testing.assert_close(g, b)
    with pytest.raises(ValueError, match="'to_q'"):
        create_adapter(model, ["to_q"], rank=2, name="b")


def test_fused_slice_adapters_train():
    """Gradients reach the LoRA of a fused q/k/v slice and of out_proj through the weight they
    are added to, not the frozen attention weights; a step moves the output."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    adapter = create_adapter(mha, ["in_proj.q", "in_proj.v", "out_proj"], rank=2, dropout=0.3)
    assert all(layer.dropout == 0.0 for _, layer in adapter.items())  # weight-form: no input dropout
    params = trainable_parameters(mha, [adapter])
    x = torch.randn(2, 5, 8)
    before = mha(x, x, x, need_weights=False)[0].detach()
    mha(x, x, x, need_weights=False)[0].square().mean().backward()
    assert mha.in_proj_weight.grad is None and mha.out_proj.weight.grad is None
    assert all(p.grad is not None for p in params)
    assert adapter["in_proj.q"].up.weight.grad.abs().sum() > 0  # up starts at zero; its gradient does not
    torch.optim.SGD(params, lr=1.0).step()
    assert not torch.allclose(mha(x, x, x, need_weights=False)[0], before)
