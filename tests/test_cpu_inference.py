"""pack_conv_weights() / pack_linear_weights(): a UNet with its convolutions and linears packed into
oneDNN's layout computes what the plain one does (float32 to rounding; bf16 autocast within bf16
rounding of float32), and still gives its plain state dict."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_engine.nn import UNet, UNetConfig, ops
from t2i_engine.nn.cpu_inference import pack_conv_weights, pack_linear_weights
from t2i_engine.nn.precision import cast_autocast_weights

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _unet_and_inputs():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=(32, 64), attention=(True, False), heads=(2, 2), layers_per_block=1,
                           context_dim=16, groups=8)).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    cond = Conditioning(text=TextEmbedding(torch.randn(2, 5, 16, generator=g)))
    return unet, (x, t, cond)


def test_float32_packed_equals_plain():
    unet, args = _unet_and_inputs()
    with torch.inference_mode():
        want = unet(*args)
        n = pack_conv_weights(unet, min_in_channels=1)
        got = unet(*args)
    convs = [m for m in unet.modules() if isinstance(m, ops.Conv2d)]
    assert n == len(convs) and any(m.kernel_size == (1, 1) for m in convs)  # 1x1 ones too
    assert all(m.weight.is_mkldnn for m in convs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float32_packed_linears_equal_plain_and_keep_a_plain_state_dict():
    unet, args = _unet_and_inputs()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.inference_mode():
        want = unet(*args)
        n = pack_linear_weights(unet)
        pack_conv_weights(unet, min_in_channels=1)
        got = unet(*args)
    linears = [m for m in unet.modules() if isinstance(m, ops.Linear)]
    assert n == len(linears) > 0 and all(m.weight.is_mkldnn for m in linears)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    packed_state = unet.state_dict()  # what a ControlNet difference file adds to
    assert packed_state.keys() == state.keys() and not any(v.is_mkldnn for v in packed_state.values())
    assert all(torch.equal(packed_state[k], v) for k, v in state.items())


def test_t2i_kernels_torch_packs_nothing(monkeypatch: pytest.MonkeyPatch):
    """T2I_KERNELS=torch means PyTorch's own ops: no weight is packed (a packed weight cannot run them)."""
    unet, _ = _unet_and_inputs()
    monkeypatch.setenv("T2I_KERNELS", "torch")
    assert pack_linear_weights(unet) == pack_conv_weights(unet, min_in_channels=1) == 0
    monkeypatch.delenv("T2I_KERNELS")
    assert pack_linear_weights(unet) > 0


@pytest.mark.parametrize("shape", [(3, 24), (2, 5, 24)])
def test_packed_linear_takes_any_rows_strides_and_autocast(shape):
    from t2i_engine.kernels.dense.dispatch import pack_linear_weight
    from t2i_engine.kernels.cpu_paths import unsupported_reason

    torch.manual_seed(0)
    layer = ops.Linear(24, 40)
    x = torch.randn(*shape[:-1], 48)[..., ::2]  # a strided view: packed_linear makes it contiguous
    with torch.inference_mode():
        want = torch.nn.functional.linear(x, layer.weight, layer.bias)
        packed = ops.Linear(24, 40)
        packed.load_state_dict(layer.state_dict())
        packed.weight = torch.nn.Parameter(pack_linear_weight(layer.weight), requires_grad=False)
        torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-5)
        if unsupported_reason("linear_pack_bf16") is None:  # bf16 weights under autocast, as the tasks cast them
            cast = ops.Linear(24, 40).bfloat16()
            cast.load_state_dict(layer.state_dict())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                plain = cast(x)
                cast.weight = torch.nn.Parameter(pack_linear_weight(cast.weight), requires_grad=False)
                got = cast(x)
            assert got.dtype == plain.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), plain.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="packed for inference"):
        packed(x.clone().requires_grad_())


def test_bf16_packed_stays_within_bf16_rounding():
    unet, args = _unet_and_inputs()
    with torch.inference_mode():
        exact = unet(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast_autocast_weights(unet, torch.bfloat16)
            plain = unet(*args).float()
            pack_conv_weights(unet, min_in_channels=1)
            packed = unet(*args).float()
    plain_err, packed_err = (plain - exact).abs().mean(), (packed - exact).abs().mean()
    assert packed_err <= 1.5 * plain_err + 1e-4


def test_min_in_channels_and_training_guard():
    unet, args = _unet_and_inputs()
    assert pack_conv_weights(unet, min_in_channels=10_000) == 0
    pack_conv_weights(unet, min_in_channels=64)
    assert unet.up_blocks[0].resnets[0].conv1.weight.is_mkldnn  # 64 + 64 skip channels in
    assert not unet.conv_in.weight.is_mkldnn  # 4 channels in
    with pytest.raises(RuntimeError, match="packed for inference"):
        unet(*[a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])


def test_prepare_for_inference_casts_then_packs_the_deep_levels():
    """What the sample task does to the model it owns under bf16-mixed on the CPU."""
    from types import SimpleNamespace

    from t2i_engine.tasks.common import prepare_for_inference

    torch.manual_seed(0)
    deep = torch.nn.Sequential(ops.Conv2d(640, 8, 3, padding=1), torch.nn.GroupNorm(8, 8), ops.Conv2d(8, 8, 3, padding=1))
    model = SimpleNamespace(text_encoder=torch.nn.Linear(4, 4), autoencoder=ops.Conv2d(4, 4, 3, padding=1), denoiser=deep)
    x = torch.randn(1, 640, 6, 6)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = deep(x).float()
        prepare_for_inference(model, autocast_dtype=torch.bfloat16)
        got = deep(x).float()
    from t2i_engine.kernels import cpu_paths

    packs = cpu_paths.unsupported_reason("conv_pack_bf16") is None  # an AVX2-only CPU cannot pack bf16
    assert deep[0].weight.is_mkldnn == packs and deep[0].weight.dtype == torch.bfloat16  # deep: cast, then packed
    assert not deep[2].weight.is_mkldnn and deep[2].weight.dtype == torch.bfloat16  # 8 channels in: cast only
    assert deep[1].weight.dtype == torch.float32  # norms keep float32
    assert model.text_encoder.weight.dtype == model.autoencoder.weight.dtype == torch.bfloat16
    assert not model.autoencoder.weight.is_mkldnn  # only the denoiser is packed
    channels_last = cpu_paths.unsupported_reason("channels_last_bf16") is None  # a bf16 autoencoder: NHWC
    assert model.autoencoder.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert deep[2].weight.is_contiguous()  # the denoiser keeps NCHW
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def _conv_net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(ops.Conv2d(3, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU(),
                               ops.Conv2d(32, 16, 3, padding=1), torch.nn.Upsample(scale_factor=2),
                               ops.Conv2d(16, 3, 1)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_bf16_converts_bf16_conv_nets_only(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype):
    from t2i_engine.kernels import cpu_paths
    from t2i_engine.nn.cpu_inference import channels_last_bf16

    if dtype == torch.bfloat16 and cpu_paths.unsupported_reason("channels_last_bf16") is not None:
        pytest.skip("no oneDNN bf16 convolution on this CPU")
    net, x = _conv_net(dtype), torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.inference_mode():
        want = net(x).float()
        converted = channels_last_bf16(net)
        got = net(x)
    assert converted == (dtype == torch.bfloat16)
    assert got.is_contiguous(memory_format=torch.channels_last) == converted
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.02)  # bf16: the same ops, another layout
    monkeypatch.setattr(cpu_paths, "enabled", lambda path: path != "channels_last_bf16")
    assert not channels_last_bf16(_conv_net(torch.bfloat16))  # this machine's timing turned it off


def test_training_gradients_through_onednn_equal_pytorchs(monkeypatch: pytest.MonkeyPatch):
    """A UNet's loss gradients with its linears on the oneDNN training path (OneDNNLinear) equal
    those of PyTorch's own ops (T2I_KERNELS=torch) to float32 rounding."""
    from t2i_engine.kernels.dense import dispatch

    unet, (x, t, cond) = _unet_and_inputs()
    unet.train()
    calls: list[int] = []
    original = dispatch.OneDNNLinear.apply
    monkeypatch.setattr(dispatch.OneDNNLinear, "apply", lambda *a: calls.append(1) or original(*a))

    def grads() -> list[torch.Tensor]:
        unet.zero_grad()
        unet(x, t, cond).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    ours = grads()
    assert len(calls) > 0
    monkeypatch.setenv("T2I_KERNELS", "torch")
    n = len(calls)
    theirs = grads()
    assert len(calls) == n
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_layer_repacks_for_each_new_input_shape(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype):
    """oneDNN's weight layout can depend on the input shape (AVX2: 2x2 and 4x4 differ), and a
    weight packed for another shape is reordered again on every call (20x slower on a Zen 3). A
    packed layer repacks once per new shape, keeps one copy, and stays equal to F.conv2d."""
    from t2i_engine.kernels import cpu_paths
    from t2i_engine.kernels.dense import dispatch

    if not dispatch.onednn_available() or cpu_paths.unsupported_reason(
            "conv_pack_bf16" if dtype == torch.bfloat16 else "conv_pack_fp32"):
        pytest.skip(f"this CPU / PyTorch cannot pack {dtype}")
    torch.manual_seed(0)
    layer = ops.Conv2d(24, 16, 3, padding=1).to(dtype)
    plain_weight = layer.weight.detach().clone()
    with torch.inference_mode():
        assert pack_conv_weights(layer, min_in_channels=1) == 1
    packs: list[tuple[int, ...]] = []
    real = dispatch.pack_conv_weight
    monkeypatch.setattr(dispatch, "pack_conv_weight",
                        lambda w, **kw: packs.append(kw["input_size"]) or real(w, **kw))
    trims: list[int] = []  # the old copy's pages go back (generation keeps freed blocks otherwise)
    monkeypatch.setattr(ops, "release_free_memory", lambda: trims.append(len(packs)) or 0)
    shapes = [(2, 24, 16, 16), (2, 24, 2, 2), (2, 24, 2, 2), (3, 24, 5, 7), (2, 24, 16, 16)]

    def no_plain_copy(*_: object, **__: object) -> None:  # a repack through plain copies tripled the
        raise AssertionError("a repack made a plain copy of the weight")  # deep layers' weight memory in flight

    monkeypatch.setattr(torch.Tensor, "to_dense", no_plain_copy)
    with torch.inference_mode():
        for shape in shapes:
            x = torch.randn(shape).to(dtype)
            want = torch.nn.functional.conv2d(x.float(), plain_weight.float(), layer.bias.float(), padding=1)
            monkeypatch.setattr(torch.Tensor, "to_mkldnn", no_plain_copy)  # the weight is packed from here on
            got = layer(x).float()
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            assert layer.weight.is_mkldnn and layer.packed_for == shape
    # packed for (2, 24, 16, 16) at first: no repack for it; one per change of shape
    assert packs == [(2, 24, 2, 2), (3, 24, 5, 7), (2, 24, 16, 16)]
    assert trims == [1, 2, 3]  # once after each repack
    assert [p for p in layer.parameters() if p.is_mkldnn] == [layer.weight]  # one copy


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-true", "fp32"])
def test_bf16_on_a_cpu_without_onednn_bf16_warns(monkeypatch: pytest.MonkeyPatch, precision: str):
    """Without AVX-512 BW/VL/DQ oneDNN has no bf16 convolution; the fallback ran the SD UNet about
    20x slower than float32 on an AVX2 EPYC. The tasks say so instead of silently crawling."""
    import warnings
    from types import SimpleNamespace

    from t2i_engine.kernels import cpu_paths
    from t2i_engine.tasks.common import prepare_for_inference

    monkeypatch.setattr(cpu_paths, "unsupported_reason", lambda path: "bf16 path needs avx512bw")
    monkeypatch.setattr(cpu_paths, "select", lambda: {})
    deep = torch.nn.Sequential(ops.Conv2d(8, 8, 3, padding=1))
    if precision == "bf16-true":
        deep = deep.to(torch.bfloat16)
    model = SimpleNamespace(text_encoder=None, autoencoder=None, denoiser=deep)
    autocast = torch.bfloat16 if precision == "bf16-autocast" else None
    if precision == "fp32":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prepare_for_inference(model, autocast_dtype=autocast)
    else:
        with pytest.warns(UserWarning, match=r"precision = \"32-true\".*|avx512bw"):
            prepare_for_inference(model, autocast_dtype=autocast)
