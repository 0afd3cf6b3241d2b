""".nemo archives in NeMo's own Stable Diffusion layout, built here from diffusers weights.

The archives are written the way NeMo writes them, independently of the engine's key maps:

* UNet and VAE keys follow NVIDIA/NeMo ``scripts/checkpoint_converters/convert_stablediffusion_hf_to_nemo.py``
  (``map_resnet_block``: conv1 -> ``in_layers.1``, conv2 -> ``out_layers.2``; ``map_attention_block``:
  norm1/2/3 -> ``attn1.norm``/``attn2.norm``/``ff.net.0``, ``ff.net.0`` -> ``ff.net.1``, ``ff.net.2`` ->
  ``ff.net.3``; ``convert_finalout_keys``: conv_out -> ``out.1``), with the VAE's mid attention as
  the 1x1 convolutions NeMo's ``AttnBlock`` holds;
* the Megatron CLIP text tower follows NeMo's CLIP converters (``convert_external_clip_to_nemo.py``
  names) with ``query_key_value`` fused per head ``[heads, 3, head_dim]`` as Megatron's
  ``ParallelAttention`` reads it, or ``[3, heads, head_dim]`` under ``megatron_legacy``;
* everything sits under ``model.`` (``MegatronLatentDiffusion``), then ``model.diffusion_model``,
  ``first_stage_model``, ``cond_stage_model`` as in NeMo's ``LatentDiffusion``.

Loaded by the engine, the UNet, autoencoder and text encoders are compared with the diffusers /
transformers modules they came from.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from t2i_engine.errors import CheckpointError
from t2i_engine.interfaces import Conditioning, TextEmbedding
from t2i_plugin_sd.formats import NemoArchive, detect_format, load_checkpoint
from t2i_plugin_sd.model import build_model
from t2i_plugin_sd.presets import PRESETS

NEMO_SD = "nemo.collections.multimodal."

# --- NeMo's HF -> NeMo renames, as its converter applies them ----------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.1", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.2", "conv_shortcut": "skip_connection"}
_TBLOCK = {"norm1": "attn1.norm", "norm2": "attn2.norm", "norm3": "ff.net.0", "ff.net.0": "ff.net.1",
           "ff.net.2": "ff.net.3"}


def _sub(rest: str, table: dict[str, str]) -> str:
    for a in sorted(table, key=len, reverse=True):
        if rest.startswith(a + "."):
            return table[a] + rest[len(a):]
    return rest


def _attention(rest: str) -> str:
    if rest.startswith("transformer_blocks."):
        _, i, inner = rest.split(".", 2)
        return f"transformer_blocks.{i}." + _sub(inner, _TBLOCK)
    return rest  # norm, proj_in, proj_out keep their names


def nemo_unet(sd: dict[str, torch.Tensor], *, levels: int, layers: int) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> NeMo openaimodel keys (input/middle/output blocks)."""
    out: dict[str, torch.Tensor] = {}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.1"}
    for key, v in sd.items():
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            lvl, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if parts[0] == "down_blocks":
                blk = 1 + lvl * (layers + 1) + j
                name = {"resnets": f"input_blocks.{blk}.0." + _sub(rest, _RESNET),
                        "attentions": f"input_blocks.{blk}.1." + _attention(rest),
                        "downsamplers": f"input_blocks.{blk + layers}.0.op." + rest.removeprefix("conv.")}
            else:
                blk = lvl * (layers + 1) + j
                last = lvl * (layers + 1) + layers
                has_attn = any(k.startswith(f"up_blocks.{lvl}.attentions.") for k in sd)
                name = {"resnets": f"output_blocks.{blk}.0." + _sub(rest, _RESNET),
                        "attentions": f"output_blocks.{blk}.1." + _attention(rest),
                        "upsamplers": f"output_blocks.{last}.{2 if has_attn else 1}.conv." + rest.removeprefix("conv.")}
            out[name[kind]] = v
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            out[f"middle_block.{2 * j if kind == 'resnets' else 1}." +
                (_sub(rest, _RESNET) if kind == "resnets" else _attention(rest))] = v
        else:
            mod, param = key.rsplit(".", 1)
            out[f"{top[mod]}.{param}"] = v
    assert len(out) == len(sd)
    return out


def nemo_vae(sd: dict[str, torch.Tensor], *, levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> NeMo AutoencoderKL keys (convert_encoder / convert_decoder)."""
    out = {}
    for key, v in sd.items():
        k = key.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_norm_out", "norm_out")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
        k = k.replace("encoder.down_blocks.", "encoder.down.").replace("resnets.", "block.")
        k = k.replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
        k = k.replace("conv_shortcut", "nin_shortcut")
        if k.startswith("decoder.up_blocks."):
            _, _, i, rest = k.split(".", 3)
            k = f"decoder.up.{levels - 1 - int(i)}.{rest}"
        if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 and not k.endswith("norm.weight"):
            v = v[:, :, None, None]  # NeMo's AttnBlock: 1x1 convolutions
        out[k] = v
    return out


def hf_text(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights with the ``text_model.`` prefix NeMo-era checkpoints carry."""
    return {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in text_encoder.state_dict().items()}


def megatron_text(hf: dict[str, torch.Tensor], *, heads: int, legacy: bool) -> dict[str, torch.Tensor]:
    """HF CLIP text weights -> Megatron CLIPTextTransformer (``language_model.*``, ``head``)."""
    t = {k.removeprefix("text_model."): v for k, v in hf.items()}
    out = {"language_model.embedding.word_embeddings.weight": t["embeddings.token_embedding.weight"],
           "language_model.embedding.position_embeddings": t["embeddings.position_embedding.weight"],
           "language_model.encoder.final_layernorm.weight": t["final_layer_norm.weight"],
           "language_model.encoder.final_layernorm.bias": t["final_layer_norm.bias"],
           "head.weight": torch.randn(16, t["final_layer_norm.weight"].shape[0])}
    n = len({k.split(".")[2] for k in t if k.startswith("encoder.layers.")})
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"language_model.encoder.layers.{i}."
        for a, b in (("layer_norm1", "input_layernorm"), ("layer_norm2", "post_attention_layernorm"),
                     ("self_attn.out_proj", "self_attention.dense"), ("mlp.fc1", "mlp.dense_h_to_4h"),
                     ("mlp.fc2", "mlp.dense_4h_to_h")):
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = t[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = (t[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv")
            if legacy:
                fused = torch.cat([q, k, v])
            else:  # per head: q_h, k_h, v_h
                per_head = [x.reshape(heads, -1, *x.shape[1:]) for x in (q, k, v)]
                fused = torch.stack(per_head, dim=1).reshape(-1, *q.shape[1:])
            out[f"{dst}self_attention.query_key_value.{p}"] = fused
    return out


# --- archives ----------------------------------------------------------------------------------


def tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as f:
        for name, data in members.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            f.addfile(info, io.BytesIO(data))
    return path


def config(*, sd2: bool, text: dict) -> dict:
    """model_config.yaml in the layout of NeMo's sd_train.yaml / sd2_train.yaml, tiny sizes."""
    unet = {"_target_": NEMO_SD + "modules.stable_diffusion.diffusionmodules.openaimodel.UNetModel",
            "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "channel_mult": [1, 2], "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": 32, "legacy": False, "resblock_gn_groups": 32, "use_te_fp8": False}
    unet |= {"num_head_channels": 16, "use_linear_in_transformer": True} if sd2 else {"num_heads": 2}
    vae = {"_target_": NEMO_SD + "models.text_to_image.stable_diffusion.ldm.autoencoder.AutoencoderKL",
           "embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                        "out_ch": 3, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1,
                                        "attn_resolutions": [], "dropout": 0.0}}
    return {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "beta_schedule": "linear",
            "scale_factor": 0.18215, "scale_by_std": False, "parameterization": "v" if sd2 else "eps",
            "conditioning_key": "crossattn", "concat_mode": True, "unet_config": unet, "first_stage_config": vae,
            "cond_stage_config": text}


def megatron_cfg(*, heads: int, legacy: bool, activation: str, layer: str = "last") -> dict:
    return {"_target_": NEMO_SD + "modules.stable_diffusion.encoders.modules.FrozenMegatronCLIPEmbedder",
            "restore_from_path": None, "device": "cuda", "freeze": True, "layer": layer,
            "cfg": {"text": {"hidden_size": 32, "ffn_hidden_size": 128, "num_layers": 2, "num_attention_heads": heads,
                             "max_position_embeddings": 77, "position_embedding_type": "learned_parameters",
                             "normalization": "layernorm", "layernorm_epsilon": 1e-5, "megatron_legacy": legacy,
                             "activation": activation, "openai_gelu": False, "kv_channels": None},
                    "tokenizer": {"library": "huggingface", "type": "openai/clip-vit-large-patch14"}}}


def write_nemo(path: Path, pipe, cfg: dict, *, text: dict[str, torch.Tensor], text_prefix: str,
               extra: dict[str, torch.Tensor] | None = None) -> Path:
    sd = {"model.diffusion_model." + k: v for k, v in nemo_unet(pipe.unet.state_dict(), levels=2, layers=1).items()}
    sd |= {"first_stage_model." + k: v for k, v in nemo_vae(pipe.vae.state_dict(), levels=2).items()}
    sd |= {text_prefix + k: v for k, v in text.items()}
    sd |= {"betas": torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2} | (extra or {})
    buf = io.BytesIO()
    torch.save({"model." + k: v.clone() for k, v in sd.items()}, buf)
    return tar(path, {"model_weights.ckpt": buf.getvalue(), "model_config.yaml": yaml.safe_dump(cfg).encode()})


def hf_archive(tmp_path: Path, pipe, **cfg_changes) -> Path:
    text_cfg = {"_target_": NEMO_SD + "modules.stable_diffusion.encoders.modules.FrozenCLIPEmbedder",
                "version": str(tmp_path / "clip"), "device": "cuda", "max_length": 77}
    pipe.text_encoder.save_pretrained(tmp_path / "clip")
    cfg = config(sd2=False, text=text_cfg)
    for path, value in cfg_changes.items():
        *parents, last = path.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return write_nemo(tmp_path / "hf.nemo", pipe, cfg, text=hf_text(pipe.text_encoder),
                      text_prefix="cond_stage_model.transformer.")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def unet_rel(ours, pipe) -> float:
    """Relative difference of our UNet and diffusers' (``pipe.unet``, as many input channels:
    4, or an InstructPix2Pix editor's 8) on one random input."""
    x, t = torch.randn(2, pipe.unet.config.in_channels, 8, 8), torch.tensor([3.0, 700.0])
    ctx = torch.randn(2, 77, 32)
    with torch.no_grad():
        return rel(ours.unet(x, t, Conditioning(text=TextEmbedding(ctx))),
                   pipe.unet(x, t, encoder_hidden_states=ctx).sample)


def nemo_padded(pipe, prompts) -> torch.Tensor:
    """The text embeddings NeMo's FrozenCLIPEmbedder gives, from diffusers' own tokenizer and text
    encoder: 77 tokens zero-padded to a multiple of 8 (80)."""
    ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return torch.nn.functional.pad(pipe.text_encoder(ids).last_hidden_state, (0, 0, 0, 3))


def text_rel(ours, pipe) -> float:
    ids = ours.text_encoder.tokenize(["a red square", "a blue circle on green"])
    with torch.no_grad():
        return rel(ours.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state)


# --- tests -------------------------------------------------------------------------------------


def test_hf_clip_archive_matches_diffusers(sd1_folder, tmp_path):
    pipe, _ = sd1_folder
    path = hf_archive(tmp_path, pipe)
    assert isinstance(detect_format(str(path)), NemoArchive)
    weights = load_checkpoint(str(path))
    ours = build_model(weights, PRESETS["sd-1"])
    assert unet_rel(ours, pipe) <= 1e-5
    assert text_rel(ours, pipe) <= 1e-5
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel(ours.vae.decode(z), pipe.vae.decode(z / 0.18215).sample) <= 1e-5
    assert ours.arch.unet.heads == (2, 2) and ours.prediction == "eps"
    assert weights.hints["schedule"].beta_schedule == "scaled_linear"  # LDM "linear" is diffusers' scaled_linear
    assert weights.hints["text_pad_to_multiple"] == 8 and "betas" in weights.extras


@pytest.mark.parametrize("legacy", [False, True])
def test_megatron_clip_archive_matches_transformers(sd1_folder, tmp_path, legacy):
    pipe, _ = sd1_folder
    cfg = config(sd2=False, text=megatron_cfg(heads=4, legacy=legacy, activation="approx-gelu"))
    text = megatron_text(hf_text(pipe.text_encoder), heads=4, legacy=legacy)
    path = write_nemo(tmp_path / "m.nemo", pipe, cfg, text=text, text_prefix="cond_stage_model.model.")
    weights = load_checkpoint(str(path))
    ours = build_model(weights, PRESETS["sd-1"])
    assert text_rel(ours, pipe) <= 1e-5
    assert unet_rel(ours, pipe) <= 1e-5
    assert weights.hints["text_pad"] == "zero" and weights.hints["text_activation"] == "quick_gelu"
    assert "cond_stage_model.model.head.weight" in weights.extras


def test_megatron_qkv_layout_is_read_from_the_config(sd1_folder, tmp_path):
    """The same per-head fused weights read as megatron_legacy give another (wrong) tower."""
    pipe, _ = sd1_folder
    text = megatron_text(hf_text(pipe.text_encoder), heads=4, legacy=False)
    cfg = config(sd2=False, text=megatron_cfg(heads=4, legacy=True, activation="approx-gelu"))
    path = write_nemo(tmp_path / "m.nemo", pipe, cfg, text=text, text_prefix="cond_stage_model.model.")
    assert text_rel(build_model(load_checkpoint(str(path)), PRESETS["sd-1"]), pipe) > 1e-2


def test_sd2_v_archive_with_clip_nemo_beside_it(sd2v_folder, tmp_path):
    """num_head_channels, linear projections, v, GELU; the CLIP config read from the CLIP .nemo
    that restore_from_path names (found next to the archive)."""
    pipe, _ = sd2v_folder
    text_cfg = megatron_cfg(heads=4, legacy=True, activation="gelu")
    clip_cfg = text_cfg.pop("cfg")
    text_cfg["restore_from_path"] = "/ckpts/clip.nemo"  # as in sd2_train.yaml; absent here, found beside the archive
    tar(tmp_path / "clip.nemo", {"model_config.yaml": yaml.safe_dump(clip_cfg).encode()})
    text = megatron_text(hf_text(pipe.text_encoder), heads=4, legacy=True)
    path = write_nemo(tmp_path / "sd2.nemo", pipe, config(sd2=True, text=text_cfg), text=text,
                      text_prefix="cond_stage_model.model.")
    ours = build_model(load_checkpoint(str(path)), PRESETS["sd-2"])
    assert ours.arch.unet.heads == (2, 4) and ours.arch.unet.linear_projection and ours.prediction == "v"
    assert ours.arch.text.activation == "gelu"
    assert unet_rel(ours, pipe) <= 1e-5
    assert text_rel(ours, pipe) <= 1e-5
    (tmp_path / "clip.nemo").unlink()
    with pytest.raises(CheckpointError, match="restore_from_path"):
        load_checkpoint(str(path))


def test_images_match_nemo_padded_conditioning(sd1_folder, tmp_path):
    """NeMo's embedders zero-pad the text embedding to a multiple of 8 tokens; diffusers given
    those padded embeddings is the reference."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from t2i_engine.diffusion.guidance import GuidanceConfig
    from t2i_engine.diffusion.registry import SAMPLERS, DDIMConfig
    from t2i_engine.pipeline import generate

    pipe, folder = sd1_folder
    ref_pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_pretrained(
        str(folder), subfolder="scheduler", set_alpha_to_one=True)})
    ours = build_model(load_checkpoint(str(hf_archive(tmp_path, pipe))), PRESETS["sd-1"])
    emb = nemo_padded(pipe, ["a red square", ""])  # 77 -> 80
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = ref_pipe(prompt_embeds=emb[:1], negative_prompt_embeds=emb[1:], latents=noise.clone(), num_inference_steps=4,
                   guidance_scale=7.5, height=16, width=16, output_type="pt").images
    got = generate(ours, ["a red square"], noise, sampler=SAMPLERS["ddim"](DDIMConfig(steps=4)),
                   guidance=GuidanceConfig(guidance_scale=7.5), negative_prompts=[""]) / 2 + 0.5
    assert (got - ref).abs().max() <= 1e-3


@pytest.mark.parametrize(("change", "field"), [
    ({"unet_config__resblock_gn_groups": 16}, "resblock_gn_groups"),
    ({"unet_config__use_scale_shift_norm": True}, "use_scale_shift_norm"),
    ({"unet_config__num_heads": 3}, "num_heads"),
    ({"unet_config__attention_resolutions": [1, 2]}, "attention_resolutions"),
    ({"unet_config__transformer_depth": [1, 2]}, "transformer_depth"),
    ({"first_stage_config__ddconfig__attn_resolutions": [16]}, "attn_resolutions"),
    ({"parameterization": "x0"}, "parameterization"),
    ({"beta_schedule": "sqrt"}, "beta_schedule"),
    ({"conditioning_key": "hybrid"}, "conditioning_key"),
    ({"cond_stage_config__layer": "hidden"}, "layer"),
    ({"cond_stage_config__version": "someone/clip"}, "version"),
])
def test_unmodelled_fields_are_refused_by_name(sd1_folder, tmp_path, change, field):
    pipe, _ = sd1_folder
    with pytest.raises(CheckpointError, match=field):
        load_checkpoint(str(hf_archive(tmp_path, pipe, **change)))


def test_a_transformer_depth_the_weights_do_not_hold_is_refused(sd1_folder, tmp_path):
    """The yaml's depth is checked against the weights (it used to be read and then ignored)."""
    pipe, _ = sd1_folder
    weights = load_checkpoint(str(hf_archive(tmp_path, pipe, unet_config__transformer_depth=2)))
    with pytest.raises(CheckpointError, match=r"unet_config\.transformer_depth = \(2,"):
        build_model(weights, PRESETS["sd-1"])


def test_schedule_and_scale_fields_are_read(sd1_folder, tmp_path):
    pipe, _ = sd1_folder
    w = load_checkpoint(str(hf_archive(tmp_path, pipe, beta_schedule="sqrt_linear", linear_end=0.02, timesteps=500)))
    s = w.hints["schedule"]
    assert (s.beta_schedule, s.beta_end, s.num_train_timesteps) == ("linear", 0.02, 500)
    path = write_nemo(tmp_path / "std.nemo", pipe, config(sd2=False, text={**megatron_cfg(
        heads=4, legacy=False, activation="approx-gelu"), "layer": "penultimate"}) | {"scale_by_std": True},
        text=megatron_text(hf_text(pipe.text_encoder), heads=4, legacy=False), text_prefix="cond_stage_model.model.",
        extra={"scale_factor": torch.tensor(0.5)})
    w = load_checkpoint(str(path))
    assert w.hints["scaling_factor"] == 0.5 and w.hints["text_skip"] == 1


def test_te_fp8_unet_keys_are_refused(sd1_folder, tmp_path):
    pipe, _ = sd1_folder
    path = hf_archive(tmp_path, pipe)
    with tarfile.open(path) as f:
        sd = torch.load(io.BytesIO(f.extractfile("./model_weights.ckpt").read()), weights_only=True)
        cfg = f.extractfile("./model_config.yaml").read()
    sd = {k.replace("attn1.norm.weight", "attn1.norm_to_q.layer_norm_weight"): v for k, v in sd.items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    tar(tmp_path / "te.nemo", {"model_weights.ckpt": buf.getvalue(), "model_config.yaml": cfg})
    with pytest.raises(CheckpointError, match="use_te_fp8"):
        load_checkpoint(str(tmp_path / "te.nemo"))


def test_unsafe_yaml_and_pickles_are_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"model.model.diffusion_model.out.1.weight": torch.zeros(1)}, buf)
    bad_yaml = b"unet_config: !!python/object/apply:os.system ['echo pwned']\n"
    tar(tmp_path / "y.nemo", {"model_weights.ckpt": buf.getvalue(), "model_config.yaml": bad_yaml})
    with pytest.raises(CheckpointError, match="model_config.yaml"):
        load_checkpoint(str(tmp_path / "y.nemo"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = io.BytesIO()
    torch.save({"x": Evil()}, evil)
    tar(tmp_path / "p.nemo", {"model_weights.ckpt": evil.getvalue()})
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(str(tmp_path / "p.nemo"))


def test_open_clip_text_archive_matches_open_clip(sd1_folder, tmp_path):
    """FrozenOpenCLIPEmbedder ('penultimate', as SD 2): open_clip's own tower is the reference."""
    from open_clip.transformer import TextTransformer

    pipe, _ = sd1_folder
    torch.manual_seed(1)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=128, heads=2, layers=3, output_dim=64,
                            act_layer=torch.nn.GELU).eval()
    text = dict(tower.state_dict()) | {"logit_scale": torch.tensor(4.6)}
    text_cfg = {"_target_": NEMO_SD + "modules.stable_diffusion.encoders.modules.FrozenOpenCLIPEmbedder",
                "arch": "ViT-H-14", "version": "laion2b_s32b_b79k", "layer": "penultimate"}
    path = write_nemo(tmp_path / "oc.nemo", pipe, config(sd2=False, text=text_cfg), text=text,
                      text_prefix="cond_stage_model.model.")
    ours = build_model(load_checkpoint(str(path)), PRESETS["sd-1"])
    ids = ours.text_encoder.tokenize(["a red square", "a blue circle on green"])
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:  # FrozenOpenCLIPEmbedder's layer_idx = 1
            x = block(x, attn_mask=tower.attn_mask)
        assert rel(ours.text_encoder(ids), tower.ln_final(x)) <= 1e-5


# NeMo's UNetModel._legacy_unet_ckpt_mapping (old name -> current name) and its index shift for
# checkpoints saved before GroupNorm and SiLU were fused ("idx + 1" in _load_pretrained_model)
_LEGACY_TBLOCK = {"norm1": "attn1.norm", "norm2": "attn2.norm", "norm3": "ff.net.0", "ff.net.0.proj": "ff.net.1.proj",
                  "ff.net.2": "ff.net.3"}


def _to_legacy(key: str) -> str:
    for old, new in _LEGACY_TBLOCK.items():
        key = key.replace(f".transformer_blocks.0.{new}.", f".transformer_blocks.0.{old}.")
    for layer, idx in (("in_layers", 1), ("out_layers", 2)):
        key = key.replace(f".{layer}.{idx}.", f".{layer}.{idx + 1}.")
    return key.replace("diffusion_model.out.1.", "diffusion_model.out.2.")


def _rewrite(path: Path, out: Path, rename, extra: dict | None = None) -> Path:
    with tarfile.open(path) as f:
        sd = torch.load(io.BytesIO(f.extractfile("./model_weights.ckpt").read()), weights_only=True)
        cfg = f.extractfile("./model_config.yaml").read()
    buf = io.BytesIO()
    torch.save({rename(k): v for k, v in sd.items()} | (extra or {}), buf)
    return tar(out, {"model_weights.ckpt": buf.getvalue(), "model_config.yaml": cfg})


@pytest.mark.parametrize("variant", ["legacy-names", "float16-module", "compiled"])
def test_older_and_wrapped_nemo_layouts_load(sd1_folder, tmp_path, variant):
    pipe, _ = sd1_folder
    rename = {"legacy-names": _to_legacy,
              "float16-module": lambda k: "model.module." + k.removeprefix("model."),  # megatron_amp_O2
              "compiled": lambda k: k.replace("model.model.diffusion_model.", "model.model._orig_mod.diffusion_model.")}
    path = _rewrite(hf_archive(tmp_path, pipe), tmp_path / "v.nemo", rename[variant])
    with tarfile.open(path) as f:
        keys = torch.load(io.BytesIO(f.extractfile("./model_weights.ckpt").read()), weights_only=True).keys()
    assert {"legacy-names": any(".in_layers.2." in k for k in keys) and any(".norm3." in k for k in keys),
            "float16-module": any(k.startswith("model.module.model.diffusion_model.") for k in keys),
            "compiled": any("._orig_mod." in k for k in keys)}[variant]
    ours = build_model(load_checkpoint(str(path)), PRESETS["sd-1"])
    assert unet_rel(ours, pipe) <= 1e-5


def test_stray_unet_tensors_are_refused(sd1_folder, tmp_path):
    pipe, _ = sd1_folder
    path = _rewrite(hf_archive(tmp_path, pipe), tmp_path / "s.nemo", lambda k: k,
                    extra={"model.model.diffusion_model.label_emb.0.weight": torch.zeros(4, 128)})
    with pytest.raises(CheckpointError, match="label_emb"):
        load_checkpoint(str(path))


def ldm_betas(schedule: str, n: int, start: float, end: float, cosine_s: float = 8e-3) -> torch.Tensor:
    """NeMo's diffusionmodules/util.py make_beta_schedule, float64."""
    if schedule == "linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    t = torch.arange(n + 1, dtype=torch.float64) / n + cosine_s
    a = torch.cos(t / (1 + cosine_s) * torch.pi / 2).pow(2)
    a = a / a[0]
    return (1 - a[1:] / a[:-1]).clamp(0, 0.999)


@pytest.mark.parametrize("schedule", ["linear", "sqrt_linear", "cosine"])
def test_model_schedule_is_nemos(sd1_folder, tmp_path, schedule):
    pipe, _ = sd1_folder
    path = hf_archive(tmp_path, pipe, beta_schedule=schedule, linear_start=0.0015, linear_end=0.0195, timesteps=800)
    ours = build_model(load_checkpoint(str(path)), PRESETS["sd-1"])
    expected = torch.cumprod(1 - ldm_betas(schedule, 800, 0.0015, 0.0195), 0)
    assert torch.allclose(ours.schedule.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)
