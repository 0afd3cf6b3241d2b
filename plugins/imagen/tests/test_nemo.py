"""NeMo Imagen ``.nemo`` archives: a round trip (write, read back, same images) for EDM and
continuous-DDPM stages, the tensor prefix NeMo's module tree gives, and refused fields; NeMo's
``sr-unet`` (a base UNet with low-res concatenation and noise-level conditioning) against the
plain base UNet built directly; NeMo's EMA checkpoints (``<name>-EMA.ckpt``)."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml

from t2i_engine.errors import CheckpointError, ConfigError
from t2i_engine.interfaces import Conditioning
from t2i_plugin_imagen.nemo import load_nemo_stage, read_nemo, save_nemo
from t2i_plugin_imagen.text_encoder import T5TextEncoder
from tests.helpers import count_draws


def _rewrite(src, dst, edit):
    cfg, state = read_nemo(str(src))
    edit(cfg, state)
    buf = io.BytesIO()
    torch.save(state, buf)
    with tarfile.open(dst, "w") as tar:
        for name, data in (("model_config.yaml", yaml.safe_dump(cfg).encode()), ("model_weights.ckpt", buf.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_nemo_round_trip(tmp_path, make_stage, t5_folders, kind, monkeypatch):
    stage = make_stage(kind, d_model=32)
    save_nemo(stage, str(tmp_path / "m.nemo"))
    cfg, state = read_nemo(str(tmp_path / "m.nemo"))
    assert "model.model.unet.time_embed.1.weight" in state  # MegatronImagen.model(Imagen).model(precond).unet
    assert cfg["unet_type"] == kind and cfg["preconditioning_type"] == "EDM"
    draws = count_draws(monkeypatch)
    T5TextEncoder.from_folders(*t5_folders)
    t5_draws = len(draws)  # transformers' own T5 build
    back = load_nemo_stage(str(tmp_path / "m.nemo"), t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]),
                           lowres_size=stage.lowres_size)
    assert len(draws) == 2 * t5_draws  # the UNet is built undrawn: the strict load replaces every parameter
    for (k, a), (_, b) in zip(stage.unet.state_dict().items(), back.unet.state_dict().items()):
        assert torch.equal(a, b), k
    assert back.precond == stage.precond and back.image_size == stage.image_size
    text = back.text_encoder.encode(["a red circle", ""])
    assert text.tokens[1].abs().max() == 0  # NeMo's null text: zeros
    x, t = torch.randn(2, 3, stage.image_size, stage.image_size), torch.randn(2)
    cond = Conditioning(text=text)
    if kind == "sr":
        cond = cond.with_extras(lowres=torch.randn(2, 3, 8, 8), lowres_t=torch.randn(2))
    torch.testing.assert_close(back.unet(x, t, cond), stage.unet(x, t, cond))


def test_continuous_ddpm_and_refused_fields(tmp_path, make_stage, t5_folders):
    from t2i_plugin_imagen.precond import Preconditioning

    stage = make_stage("base", d_model=32)
    stage.precond = Preconditioning(kind="continuous-ddpm", objective="x0", log_snr="linear")
    save_nemo(stage, str(tmp_path / "d.nemo"))
    assert read_nemo(str(tmp_path / "d.nemo"))[0]["preconditioning"]["pred_objective"] == "x_start"
    folders = dict(t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]))
    assert load_nemo_stage(str(tmp_path / "d.nemo"), **folders).precond == stage.precond
    cases = {"loss_type": lambda c, s: c["preconditioning"].update(loss_type="huber"),
             "unet_type": lambda c, s: c.update(unet_type="sr-x"),
             "bogus": lambda c, s: c["unet"].update(bogus=1),
             "outside": lambda c, s: s.update({"model_ema.x": torch.zeros(1)}),
             "missing keys": lambda c, s: s.pop("model.model.unet.out.2.weight")}
    for match, edit in cases.items():
        _rewrite(tmp_path / "d.nemo", tmp_path / "bad.nemo", edit)
        with pytest.raises(CheckpointError, match=match):
            load_nemo_stage(str(tmp_path / "bad.nemo"), **folders)
    _rewrite(tmp_path / "d.nemo", tmp_path / "neutral.nemo", lambda c, s: c["unet"].update(stable_attention=True))
    load_nemo_stage(str(tmp_path / "neutral.nemo"), **folders)  # forward-neutral NeMo keys are accepted


def test_model_table_takes_a_nemo(tmp_path, make_stage, t5_folders):
    from t2i_plugin_imagen.plugin import ImagenStageConfig, build_imagen_stage

    save_nemo(make_stage("base", d_model=32), str(tmp_path / "m.nemo"))
    built = build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "m.nemo"), t5=str(t5_folders[0]),
                                                 tokenizer=str(t5_folders[1])))
    assert built.image_size == 8
    with pytest.raises(ConfigError, match="needs t5 and tokenizer"):
        build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "m.nemo")))
    with pytest.raises(ConfigError, match="only for a NeMo"):
        build_imagen_stage(ImagenStageConfig(t5=str(t5_folders[0])))
    with pytest.raises(ConfigError, match="only for a NeMo"):
        build_imagen_stage(ImagenStageConfig(ema_checkpoint=str(tmp_path / "m.nemo")))


P = "model.model.unet."


def _sr_unet_stage():
    """A tiny NeMo ``sr-unet`` stage (8 -> 16 px): the base UNet with ``low_res_cond`` and
    ``noise_cond_aug``, every weight random."""
    from t2i_plugin_imagen.precond import Preconditioning
    from t2i_plugin_imagen.stage import NoiseAugConfig, build_stage
    from t2i_plugin_imagen.word_t5 import WordT5Config

    text = WordT5Config(words=["a", "red", "circle"], d_model=32, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                        token_length=8)
    unet = dict(embed_dim=8, image_size=16, text_embed_dim=32, channel_mult=[1, 2], num_res_blocks=[1, 1], cond_dim=8,
                attention_resolutions=[8], per_head_channels=4, norm_groups=4, low_res_cond=True, noise_cond_aug=True)
    stage = build_stage(unet_type="base", unet=unet, text=text, precond=Preconditioning(), image_size=16,
                        lowres_size=8, noise_aug=NoiseAugConfig(sample_sigma=0.1))
    torch.manual_seed(11)
    with torch.no_grad():
        for p in stage.unet.parameters():
            p.normal_(0, 0.1)
    return stage.eval()


def test_sr_unet_layout_and_forward_against_the_base_unet(tmp_path, t5_folders):
    """``sr-unet`` = NeMo's ``UNetModel(**cfg.unet, noise_cond_aug=cfg.noise_cond_aug)`` with
    ``low_res_cond``: written as unet_type sr-unet, read back into the base UNet; its output with
    a zero low-res image and a zeroed low-res-level embedding equals the plain base UNet (no
    low-res keys) given the x-half of the first conv: the low-res image is concatenated after x."""
    from t2i_plugin_imagen.imagen_unet import ImagenUNet, build_unet, unet_options

    stage = _sr_unet_stage()
    save_nemo(stage, str(tmp_path / "sr.nemo"))
    cfg, state = read_nemo(str(tmp_path / "sr.nemo"))
    assert cfg["unet_type"] == "sr-unet" and cfg["noise_cond_aug"] is True and "noise_cond_aug" not in cfg["unet"]
    assert cfg["unet"]["low_res_cond"] is True
    assert torch.equal(state[P + "init_conv.0.weight"], state[P + "input_blocks.0.0.weight"])  # NeMo's alias
    folders = dict(t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]))
    back = load_nemo_stage(str(tmp_path / "sr.nemo"), lowres_size=8, **folders)
    assert isinstance(back.unet, ImagenUNet) and back.unet.config.low_res_cond and back.unet.config.noise_cond_aug
    for (k, a), (_, b) in zip(stage.unet.state_dict().items(), back.unet.state_dict().items()):
        assert torch.equal(a, b), k
    text = back.text_encoder.encode(["a red circle", "a circle"])
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    low, low_t = torch.randn(2, 3, 8, 8), torch.randn(2)
    net = back.unet
    out = net(x, t, Conditioning(text=text).with_extras(lowres=low, lowres_t=low_t))
    # the 8 px input is bicubic-upsampled (NeMo's F.interpolate) before the concatenation
    up = torch.nn.functional.interpolate(low, size=(16, 16), mode="bicubic")
    torch.testing.assert_close(net(x, t, Conditioning(text=text).with_extras(lowres=up, lowres_t=low_t)), out)
    # both conditionings matter
    def run(lowres, lowres_t):
        return net(x, t, Conditioning(text=text).with_extras(lowres=lowres, lowres_t=lowres_t))

    assert (run(torch.zeros_like(low), low_t) - out).abs().max() > 1e-3
    assert (run(low, low_t + 1) - out).abs().max() > 1e-5
    # the independent truth: the plain base UNet (built directly, no low-res keys) with the same weights
    _, opts = unet_options(net)
    plain = build_unet("base", {**opts, "low_res_cond": False, "noise_cond_aug": False}).eval()
    weights = {k: v for k, v in net.state_dict().items() if not k.startswith("lowres_time_embed.")}
    weights["input_blocks.0.0.weight"] = weights["input_blocks.0.0.weight"][:, :3]  # the x half
    plain.load_state_dict(weights)
    with torch.no_grad():
        net.lowres_time_embed[-1].weight.zero_()
        net.lowres_time_embed[-1].bias.zero_()
    zero_low = Conditioning(text=text).with_extras(lowres=torch.zeros(2, 3, 8, 8), lowres_t=low_t)
    torch.testing.assert_close(net(x, t, zero_low), plain(x, t, Conditioning(text=text)))


def test_nemo_state_dict_names_inductor_and_sr_unet_refusals(tmp_path, t5_folders):
    """What NeMo writes beyond the module's own names: ``._orig_mod`` (TorchInductor) is removed;
    ``init_conv.0.*`` must equal ``input_blocks.0.0.*``; sr-unet needs ``low_res_cond`` and a base
    refuses it; ``unet.noise_cond_aug`` is not a NeMo sr key."""
    stage = _sr_unet_stage()
    save_nemo(stage, str(tmp_path / "sr.nemo"))
    folders = dict(t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]), lowres_size=8)

    def inductor(c, s):
        for k in list(s):
            s[k.replace(P, P + "_orig_mod.")] = s.pop(k)

    _rewrite(tmp_path / "sr.nemo", tmp_path / "ind.nemo", inductor)
    assert next(iter(read_nemo(str(tmp_path / "ind.nemo"))[1])).startswith(P + "_orig_mod.")
    back = load_nemo_stage(str(tmp_path / "ind.nemo"), **folders)
    torch.testing.assert_close(back.unet.state_dict(), stage.unet.state_dict())
    _rewrite(tmp_path / "sr.nemo", tmp_path / "one.nemo", lambda c, s: s.pop(P + "init_conv.0.weight"))
    load_nemo_stage(str(tmp_path / "one.nemo"), **folders)  # the alias alone is not required
    cases = {"differ": lambda c, s: s.update({P + "init_conv.0.weight": s[P + "init_conv.0.weight"] + 1}),
             "needs unet.low_res_cond": lambda c, s: c["unet"].update(low_res_cond=False),
             "sr-unet": lambda c, s: c.update(unet_type="base"),
             "unet.noise_cond_aug": lambda c, s: c["unet"].update(noise_cond_aug=True)}
    for match, edit in cases.items():
        _rewrite(tmp_path / "sr.nemo", tmp_path / "bad.nemo", edit)
        with pytest.raises(CheckpointError, match=match):
            load_nemo_stage(str(tmp_path / "bad.nemo"), **folders)


def _optimizer(groups):
    """A torch optimizer's ``state_dict`` (Adam before its first step) over ``groups`` parameter counts."""
    start = [sum(groups[:i]) for i in range(len(groups))]
    return {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                           "params": list(range(a, a + n))} for a, n in zip(start, groups)]}


def _lightning_ckpt(path, state, *, optimizer_states=None, **extra):
    """A Lightning checkpoint as NeMo's trainer writes it (the parts that are plain data); by default
    the regular ``<name>.ckpt`` of an EMA run: ``EMA.save_original_optimizer_state`` makes
    ``EMAOptimizer.state_dict()`` the wrapped optimizer's own."""
    if optimizer_states is None:
        optimizer_states = [_optimizer([len(state)])]
    torch.save({"epoch": 0, "global_step": 10, "state_dict": state, "optimizer_states": optimizer_states, **extra}, path)


def _ema_optimizer_state(ema):
    """``EMAOptimizer.state_dict()``: the wrapped optimizer's, its ``ema`` list and counters."""
    return {"opt": _optimizer([len(ema)]), "ema": list(ema), "current_step": 10, "decay": 0.999, "every_n_steps": 1}


def _ema_copy(path, ema_state, **extra):
    """``<name>-EMA.ckpt`` as ``NeMoModelCheckpoint._save_checkpoint`` writes it inside
    ``EMA.save_ema_model``: the EMA values swapped into the module's parameters, so the
    ``state_dict`` holds them and ``EMAOptimizer``'s ``ema`` is ``list(all_parameters())``: the same
    parameters (saved together: shared storage), each once (NeMo's ``init_conv`` alias is one
    parameter), in the optimizer's order (Megatron's groups: weights, then biases and norms)."""
    params = {id(v): torch.nn.Parameter(v) for v in ema_state.values()}
    state = {k: params[id(v)].detach() for k, v in ema_state.items()}
    groups = [[p for p in params.values() if p.ndim > 1], [p for p in params.values() if p.ndim <= 1]]
    opt = _ema_optimizer_state(groups[0] + groups[1])
    opt["opt"] = _optimizer([len(g) for g in groups])
    _lightning_ckpt(path, state, optimizer_states=[opt], **extra)


def test_ema_checkpoint_weights_replace_the_archives(tmp_path, make_stage, t5_folders):
    """NeMo's EMA callback writes the EMA copy as ``<name>-EMA.ckpt`` (same names); NeMo's first EMA
    callback kept ``ema_weights`` in the checkpoint's callback state, in state-dict order. The
    ``ema_checkpoint`` key loads them; without it the archive's trained weights are used (NeMo's
    inference); a checkpoint without EMA weights is refused."""
    from t2i_plugin_imagen.nemo import read_ema_weights
    from t2i_plugin_imagen.plugin import ImagenStageConfig, build_imagen_stage

    stage = make_stage("base", d_model=32)
    save_nemo(stage, str(tmp_path / "m.nemo"))
    _, state = read_nemo(str(tmp_path / "m.nemo"))
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    for end in ("weight", "bias"):  # one parameter under both names: one EMA value
        ema[P + "init_conv.0." + end] = ema[P + "input_blocks.0.0." + end]
    _ema_copy(tmp_path / "imagen--step=10-EMA.ckpt", ema)
    _lightning_ckpt(tmp_path / "imagen--step=10.ckpt", state,  # NeMo's first EMA callback
                    callbacks={"EMA": {"ema_weights": list(ema.values()), "cur_step": 10}})
    _lightning_ckpt(tmp_path / "plain.ckpt", state)
    folders = dict(t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]))
    want = {k[len(P):]: v for k, v in ema.items() if not k.startswith(P + "init_conv.")}
    for name in ("imagen--step=10-EMA.ckpt", "imagen--step=10.ckpt"):
        built = build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "m.nemo"),
                                                     ema_checkpoint=str(tmp_path / name), **folders))
        torch.testing.assert_close(built.unet.state_dict(), want)
        assert read_ema_weights(str(tmp_path / name)).keys() == state.keys()
    default = build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "m.nemo"), **folders))
    torch.testing.assert_close(default.unet.state_dict(), stage.unet.state_dict())
    text = default.text_encoder.encode(["a red circle"])
    x, t = torch.randn(1, 3, 8, 8), torch.randn(1)
    assert (built.unet(x, t, Conditioning(text=text)) - default.unet(x, t, Conditioning(text=text))).abs().max() > 1e-4
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        load_nemo_stage(str(tmp_path / "m.nemo"), ema_checkpoint=str(tmp_path / "plain.ckpt"), **folders)
    short = {"EMA": {"ema_weights": list(ema.values())[:-1]}}
    _lightning_ckpt(tmp_path / "short.ckpt", state, callbacks=short)
    with pytest.raises(CheckpointError, match="cannot be matched"):
        read_ema_weights(str(tmp_path / "short.ckpt"))
    torch.save(state, tmp_path / "flat-EMA.ckpt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        read_ema_weights(str(tmp_path / "flat-EMA.ckpt"))


def test_ema_checkpoint_is_told_by_its_contents_not_its_name(tmp_path, make_stage, t5_folders):
    """The EMA copy is recognised by what NeMo writes into it, the name only where the contents
    cannot tell: a renamed ``-EMA.ckpt`` loads; a first-callback checkpoint named ``-EMA.ckpt``
    gives its callback state (not its trained state_dict); a regular checkpoint (a plain
    optimizer's state) named ``-EMA.ckpt`` is refused, and so is a checkpoint whose ``EMAOptimizer``
    state is not its state_dict's (saved outside ``save_ema_model``: trained weights, unnamed
    ``ema``); a weights-only checkpoint is taken as EMA only when named ``-EMA.ckpt``."""
    from t2i_plugin_imagen.nemo import read_ema_weights

    stage = make_stage("base", d_model=32)
    save_nemo(stage, str(tmp_path / "m.nemo"))
    _, state = read_nemo(str(tmp_path / "m.nemo"))
    torch.manual_seed(3)
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    for end in ("weight", "bias"):
        ema[P + "init_conv.0." + end] = ema[P + "input_blocks.0.0." + end]

    def same(got, want):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    _ema_copy(tmp_path / "averaged.ckpt", ema)  # NeMo's -EMA.ckpt, renamed
    same(read_ema_weights(str(tmp_path / "averaged.ckpt")), ema)
    folders = dict(t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]))
    built = load_nemo_stage(str(tmp_path / "m.nemo"), ema_checkpoint=str(tmp_path / "averaged.ckpt"), **folders)
    torch.testing.assert_close(built.unet.state_dict(), {k[len(P):]: v for k, v in ema.items()
                                                         if not k.startswith(P + "init_conv.")})
    _lightning_ckpt(tmp_path / "first-EMA.ckpt", state, callbacks={"EMA": {"ema_weights": list(ema.values()),
                                                                           "cur_step": 10}})
    same(read_ema_weights(str(tmp_path / "first-EMA.ckpt")), ema)
    _lightning_ckpt(tmp_path / "regular-EMA.ckpt", state)  # NeMo's <name>.ckpt, renamed
    with pytest.raises(CheckpointError, match=r"plain optimizer's.*name -EMA.ckpt alone is not trusted"):
        read_ema_weights(str(tmp_path / "regular-EMA.ckpt"))
    params = [v for k, v in ema.items() if not k.startswith(P + "init_conv.")]
    _lightning_ckpt(tmp_path / "outside-EMA.ckpt", state, optimizer_states=[_ema_optimizer_state(params)])
    with pytest.raises(CheckpointError, match="ema tensors are not its state_dict's"):
        read_ema_weights(str(tmp_path / "outside-EMA.ckpt"))
    torch.save({"epoch": 0, "global_step": 10, "state_dict": ema}, tmp_path / "weights-EMA.ckpt")
    same(read_ema_weights(str(tmp_path / "weights-EMA.ckpt")), ema)
    torch.save({"epoch": 0, "global_step": 10, "state_dict": ema}, tmp_path / "weights.ckpt")
    with pytest.raises(CheckpointError, match="weights-only checkpoint.*does not end in -EMA.ckpt"):
        read_ema_weights(str(tmp_path / "weights.ckpt"))


def _archive(dst, members):
    """A tar of ``{name: bytes}``, as ``.nemo`` archives are laid out."""
    with tarfile.open(dst, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_ema_checkpoint_means_the_archives_weights_are_not_read(tmp_path, make_stage, t5_folders):
    """With ``ema_checkpoint`` only the archive's ``model_config.yaml`` is read: an archive whose
    ``model_weights.ckpt`` is corrupt (not a pickle) or absent still loads, with the EMA weights;
    without ``ema_checkpoint`` the same archives are refused, naming the member."""
    stage = make_stage("base", d_model=32)
    save_nemo(stage, str(tmp_path / "m.nemo"))
    cfg, state = read_nemo(str(tmp_path / "m.nemo"))
    ema = {k: v + 0.01 for k, v in state.items()}
    _ema_copy(tmp_path / "m-EMA.ckpt", ema)
    config = yaml.safe_dump({"model": cfg}).encode()
    _archive(tmp_path / "corrupt.nemo", {"model_config.yaml": config, "model_weights.ckpt": b"not a pickle"})
    _archive(tmp_path / "absent.nemo", {"model_config.yaml": config})
    folders = dict(t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]))
    want = {k[len(P):]: v for k, v in ema.items() if not k.startswith(P + "init_conv.")}
    for name, error in (("corrupt.nemo", "cannot be read"), ("absent.nemo", "no model_weights.ckpt")):
        built = load_nemo_stage(str(tmp_path / name), ema_checkpoint=str(tmp_path / "m-EMA.ckpt"), **folders)
        torch.testing.assert_close(built.unet.state_dict(), want)
        with pytest.raises(CheckpointError, match=error):
            load_nemo_stage(str(tmp_path / name), **folders)


def test_ema_checkpoint_with_omegaconf_hyper_parameters_runs_none_of_their_code(tmp_path, make_stage, monkeypatch):
    """NeMo's Lightning checkpoints pickle ``hyper_parameters`` as OmegaConf objects (and their type):
    such globals are read as inert placeholders, so a checkpoint whose classes are not even
    importable loads and none of their code runs; ``os``/``posix`` globals stay refused."""
    import os
    import sys
    import types
    import typing

    from t2i_plugin_imagen.nemo import read_ema_weights

    calls = []
    fake = {name: types.ModuleType(name) for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.base")}

    class ContainerMetadata:
        def __init__(self):
            self.ref_type, self.object_type = typing.Any, dict

    class DictConfig:
        def __init__(self, content):
            self._content, self._metadata = content, ContainerMetadata()

        def __setstate__(self, state):
            calls.append("DictConfig.__setstate__")

    def create(*args):
        calls.append("create")

    class Reduced:
        def __reduce__(self):
            return create, (1,)

    placed = ((DictConfig, "omegaconf.dictconfig"), (ContainerMetadata, "omegaconf.base"), (create, "omegaconf.base"))
    for cls, mod in placed:
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(fake[mod], cls.__name__, cls)
    for name, mod in fake.items():
        monkeypatch.setitem(sys.modules, name, mod)
    stage = make_stage("base", d_model=32)
    save_nemo(stage, str(tmp_path / "m.nemo"))
    _, state = read_nemo(str(tmp_path / "m.nemo"))
    _ema_copy(tmp_path / "n-EMA.ckpt", state, hyper_parameters=DictConfig({"cfg": {"unet_type": "base"}}),
              hparams_type=DictConfig, extra=Reduced())
    monkeypatch.undo()  # the classes are gone: the loader must not need them
    assert "omegaconf.dictconfig" not in sys.modules
    got = read_ema_weights(str(tmp_path / "n-EMA.ckpt"))
    assert calls == [] and got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)

    class System:
        def __reduce__(self):
            return os.system, ("true",)

    _ema_copy(tmp_path / "evil-EMA.ckpt", state, extra=System())
    with pytest.raises(CheckpointError, match="refusing"):
        read_ema_weights(str(tmp_path / "evil-EMA.ckpt"))


def _omegaconf_pickler(monkeypatch):
    """``(create, save)``: ``create(plain)`` builds a config laid out as OmegaConf 2 pickles one
    (``DictConfig`` / ``ListConfig`` state ``{_metadata, _parent, _content}``, ``AnyNode`` state
    ``{_metadata, _parent, _val}``: ``BaseContainer.__getstate__`` / ``Node.__getstate__``, the
    ``_flags_cache`` dropped; ``ContainerMetadata`` a dataclass), with stand-in classes under
    OmegaConf's module names; ``save(obj, path)`` ``torch.save``s with them importable, after which
    they are gone (the loader must not need OmegaConf, and runs none of its code)."""
    import collections
    import sys
    import types
    import typing

    modules = {name: types.ModuleType(name) for name in
               ("omegaconf", "omegaconf.base", "omegaconf.nodes", "omegaconf.dictconfig", "omegaconf.listconfig")}

    class Metadata:
        def __init__(self, key, object_type=None, **more):
            self.__dict__.update(ref_type=typing.Any, object_type=object_type, optional=True, key=key, flags={},
                                 flags_root=False, resolver_cache=collections.defaultdict(dict), **more)

    class ContainerMetadata(Metadata):
        pass

    class Node:
        def __getstate__(self):
            state = dict(self.__dict__)
            del state["_flags_cache"]
            return state

        def __setstate__(self, state):
            raise AssertionError("OmegaConf code ran at load time")

    class AnyNode(Node):
        pass

    class DictConfig(Node):
        pass

    class ListConfig(Node):
        pass

    for cls, mod in ((Metadata, "omegaconf.base"), (ContainerMetadata, "omegaconf.base"), (AnyNode, "omegaconf.nodes"),
                     (DictConfig, "omegaconf.dictconfig"), (ListConfig, "omegaconf.listconfig")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(modules[mod], cls.__name__, cls)

    def create(plain, parent=None, key=None):
        if isinstance(plain, (dict, list)):
            node = (DictConfig if isinstance(plain, dict) else ListConfig)()
            meta = ContainerMetadata(key, type(plain), key_type=typing.Any, element_type=typing.Any)
            node.__dict__.update(_metadata=meta, _parent=parent, _flags_cache=None)
            items = plain.items() if isinstance(plain, dict) else enumerate(plain)
            content = {k: create(v, node, k) for k, v in items}
            node.__dict__["_content"] = content if isinstance(plain, dict) else list(content.values())
            return node
        node = AnyNode()
        node.__dict__.update(_metadata=Metadata(key), _parent=parent, _val=plain, _flags_cache=None)
        return node

    def save(obj, path):
        with monkeypatch.context() as m:
            for name, module in modules.items():
                m.setitem(sys.modules, name, module)
            torch.save(obj, path)
        assert "omegaconf.dictconfig" not in sys.modules

    return create, save


def _trained_ckpt(state, hyper_parameters=None):
    """A NeMo Lightning checkpoint (``trainer.save_checkpoint`` of ``MegatronImagen``): ``state_dict``
    under NeMo's names and, from ``ModelPT.save_hyperparameters("cfg")``, ``hyper_parameters``
    ``{"cfg": DictConfig}`` (Lightning's ``dict(model.hparams)``) with ``hparams_name`` ``kwargs``."""
    ckpt = {"epoch": 3, "global_step": 900, "pytorch-lightning_version": "2.0.7", "state_dict": state,
            "loops": {}, "callbacks": {}, "optimizer_states": [_optimizer([len(state)])], "lr_schedulers": []}
    if hyper_parameters is not None:
        ckpt.update(hparams_name="kwargs", hyper_parameters=hyper_parameters)
    return ckpt


def _nemo_run_config(cfg):
    """``cfg`` (a stage's model config) with the other keys of NeMo's Imagen training configs
    (``sr256-400m.yaml``), resolved as ``ModelPT`` keeps them; ``???`` is OmegaConf's missing value."""
    return {**cfg, "precision": 16, "micro_batch_size": 4, "global_batch_size": 4, "inductor": True,
            "channels_last": True, "fused_opt": True, "data": {"train": {"dataset_path": "???"}},
            "optim": {"name": "fused_adam", "lr": 1e-4, "betas": [0.9, 0.999]}}


def test_lightning_ckpt_with_its_hyper_parameters_cfg(tmp_path, make_stage, t5_folders, monkeypatch):
    """``[model] checkpoint = "x.ckpt"``: the architecture from ``hyper_parameters.cfg`` (an
    OmegaConf ``DictConfig`` pickle read with inert globals), the weights from ``state_dict``: the
    same network and images as the stage it was made from; EMA weights from a ``-EMA.ckpt``."""
    from t2i_plugin_imagen.plugin import ImagenStageConfig, build_imagen_stage

    create, save = _omegaconf_pickler(monkeypatch)
    stage = make_stage("sr", d_model=32)
    save_nemo(stage, str(tmp_path / "m.nemo"))
    cfg, state = read_nemo(str(tmp_path / "m.nemo"))
    save(_trained_ckpt(state, {"cfg": create(_nemo_run_config(cfg))}), tmp_path / "imagen--step=900.ckpt")
    folders = dict(t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]), lowres_size=8)
    built = build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "imagen--step=900.ckpt"), **folders))
    assert built.unet.config == stage.unet.config and built.precond == stage.precond and built.image_size == 16
    torch.testing.assert_close(built.unet.state_dict(), stage.unet.state_dict())
    text = built.text_encoder.encode(["a red circle", ""])
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    cond = Conditioning(text=text).with_extras(lowres=torch.randn(2, 3, 8, 8), lowres_t=torch.randn(2))
    torch.testing.assert_close(built.unet(x, t, cond), stage.unet(x, t, cond))
    ema = {k: v + 0.01 for k, v in state.items()}
    _ema_copy(tmp_path / "imagen--step=900-EMA.ckpt", ema)
    averaged = build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "imagen--step=900.ckpt"),
                                                    ema_checkpoint=str(tmp_path / "imagen--step=900-EMA.ckpt"),
                                                    **folders))
    torch.testing.assert_close(averaged.unet.state_dict(), {k[len(P):]: v for k, v in ema.items()})


def test_lightning_ckpt_config_from_nemo_config_yaml(tmp_path, make_stage, t5_folders, monkeypatch):
    """``[model] nemo_config``: the run's ``hparams.yaml`` (``cfg:``, as Lightning's logger writes
    it) or its NeMo config (``model:``). A checkpoint without ``hyper_parameters.cfg`` needs it
    (refused, naming both, without); given, it wins over ``hyper_parameters.cfg`` (here a
    different preconditioning); with ``ema_checkpoint`` the ``.ckpt`` itself is then not read."""
    from t2i_plugin_imagen.plugin import ImagenStageConfig, build_imagen_stage

    create, save = _omegaconf_pickler(monkeypatch)
    stage = make_stage("base", d_model=32)
    save_nemo(stage, str(tmp_path / "m.nemo"))
    cfg, state = read_nemo(str(tmp_path / "m.nemo"))
    torch.save(_trained_ckpt(state), tmp_path / "bare.ckpt")  # e.g. converted by a script: no hyper_parameters
    (tmp_path / "hparams.yaml").write_text(yaml.safe_dump({"cfg": _nemo_run_config(cfg)}))
    (tmp_path / "imagen.yaml").write_text(yaml.safe_dump({"trainer": {"devices": 8}, "model": cfg}))
    folders = dict(t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]))
    with pytest.raises(CheckpointError, match=r"hyper_parameters.cfg, and this one has no hyper_parameters.*"
                                              r"nemo_config"):
        build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "bare.ckpt"), **folders))
    for yml in ("hparams.yaml", "imagen.yaml"):
        built = build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "bare.ckpt"),
                                                     nemo_config=str(tmp_path / yml), **folders))
        torch.testing.assert_close(built.unet.state_dict(), stage.unet.state_dict())
        assert built.precond == stage.precond and built.precond.kind == "edm"
    ddpm = {**cfg, "preconditioning_type": "DDPM",
            "preconditioning": {"loss_type": "l2", "pred_objective": "x_start", "noise_schedule": "linear"}}
    save(_trained_ckpt(state, {"cfg": create(ddpm)}), tmp_path / "ddpm.ckpt")
    own = build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "ddpm.ckpt"), **folders))
    assert own.precond.kind == "continuous-ddpm" and own.precond.objective == "x0"
    given = build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "ddpm.ckpt"),
                                                 nemo_config=str(tmp_path / "hparams.yaml"), **folders))
    assert given.precond == stage.precond
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a pickle")
    _ema_copy(tmp_path / "m-EMA.ckpt", state)
    build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "corrupt.ckpt"),
                                         nemo_config=str(tmp_path / "hparams.yaml"),
                                         ema_checkpoint=str(tmp_path / "m-EMA.ckpt"), **folders))
    with pytest.raises(CheckpointError, match="refusing"):
        build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "corrupt.ckpt"),
                                             nemo_config=str(tmp_path / "hparams.yaml"), **folders))
    with pytest.raises(ConfigError, match="nemo_config: only for a NeMo .ckpt"):
        build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "m.nemo"),
                                             nemo_config=str(tmp_path / "hparams.yaml"), **folders))
    with pytest.raises(ConfigError, match="only for a NeMo"):
        build_imagen_stage(ImagenStageConfig(nemo_config=str(tmp_path / "hparams.yaml")))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(CheckpointError, match="list.yaml: the model config is not a mapping"):
        build_imagen_stage(ImagenStageConfig(checkpoint=str(tmp_path / "bare.ckpt"),
                                             nemo_config=str(tmp_path / "list.yaml"), **folders))


def test_plain_config_of_a_real_omegaconf_pickle(tmp_path):
    """A real ``DictConfig`` pickle (OmegaConf is a test dependency only, never a runtime one), read with
    inert globals, gives back the plain config."""
    omegaconf = pytest.importorskip("omegaconf")
    from t2i_engine.checkpoint.io import safe_torch_load
    from t2i_plugin_imagen.nemo import plain_config

    plain = {"unet_type": "sr", "unet": {"channel_mult": [1, 2], "flash_attention": False, "dropout": 0.1},
             "conditioning": {"embed_dim": 32}, "preconditioning": None, "data": {"path": "???"}}
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": omegaconf.OmegaConf.create(plain)}}, tmp_path / "c.ckpt")
    assert plain_config(safe_torch_load(str(tmp_path / "c.ckpt"), inert_globals=True)["hyper_parameters"]) == \
        {"cfg": plain}
