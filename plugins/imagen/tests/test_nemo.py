"""NeMo Imagen ``.nemo`` archives: a round trip (write, read back, same images) for EDM and
continuous-DDPM stages, the tensor prefix NeMo's module tree gives, and refused fields."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml

from t2i_engine.errors import CheckpointError, ConfigError
from t2i_engine.interfaces import Conditioning
from t2i_plugin_imagen.nemo import load_nemo_stage, read_nemo, save_nemo


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
def test_nemo_round_trip(tmp_path, make_stage, t5_folders, kind):
    stage = make_stage(kind, d_model=32)
    save_nemo(stage, str(tmp_path / "m.nemo"))
    cfg, state = read_nemo(str(tmp_path / "m.nemo"))
    assert "model.model.unet.time_embed.1.weight" in state  # MegatronImagen.model(Imagen).model(precond).unet
    assert cfg["unet_type"] == kind and cfg["preconditioning_type"] == "EDM"
    back = load_nemo_stage(str(tmp_path / "m.nemo"), t5=str(t5_folders[0]), tokenizer=str(t5_folders[1]),
                           lowres_size=stage.lowres_size)
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
             "unet_type": lambda c, s: c.update(unet_type="sr-unet"),
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
