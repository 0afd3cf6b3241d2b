"""NeMo ``.nemo`` archives of Stable Diffusion (``MegatronLatentDiffusion``).

A ``.nemo`` is a tar holding ``model_weights.ckpt`` (a pickled state dict, read only with
``torch.load(weights_only=True)``) and ``model_config.yaml`` (read with ``yaml.safe_load``). The
weights use NeMo's own key layout (:mod:`t2i_plugin_sd.nemo_keymaps`); the yaml's fields that
change the computation are read into :class:`~t2i_plugin_sd.model.Weights` hints or refused with
a :class:`CheckpointError` naming the field. docs/stable-diffusion.md ("NeMo .nemo") lists them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from t2i_plugin_sd.ldm_config import conditioning_problem, read_yaml_config
from torch import Tensor

from t2i_engine.checkpoint.nemo import CONFIG_MEMBER, archive_member, is_nemo_archive, read_archive_weights
from t2i_engine.errors import CheckpointError
from t2i_plugin_sd import keymaps
from t2i_plugin_sd import nemo_keymaps as nk
from t2i_plugin_sd.model import Weights
from t2i_plugin_sd.presets import ScheduleConfig

HF_TEXT = "cond_stage_model.transformer."
TEXT_PAD_MULTIPLE = 8
"""NeMo's text embedders zero-pad the embedding sequence to a multiple of 8 tokens (77 -> 80)."""

# CLIPTextModel configs NeMo's FrozenCLIPEmbedder names by hub id (its default ``version``)
_HF_CLIP_VERSIONS = {"openai/clip-vit-large-patch14": {"hidden_act": "quick_gelu", "num_attention_heads": 12,
                                                       "intermediate_size": 3072, "layer_norm_eps": 1e-5}}
# LDM beta schedule names (make_beta_schedule) -> diffusers names
_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
# text tensors NeMo keeps that the conditioning does not use (CLIP projection heads)
_TEXT_UNUSED = ("cond_stage_model.model.head.weight", "cond_stage_model.model.text_projection",
                "cond_stage_model.model.logit_scale")


class NemoArchive:
    """A NeMo ``.nemo`` archive of its Stable Diffusion model (read only)."""

    name = "nemo"

    def detect(self, path: str) -> bool:
        return is_nemo_archive(path)

    def load(self, path: str) -> Weights:
        """Read the archive into our layout; the yaml's fields become hints or errors."""
        cfg = read_config(path)
        sd = read_archive_weights(path)
        return nemo_to_weights(sd, cfg, source=path, base_dir=Path(path).parent)


# --- reading the archive ----------------------------------------------------------------------


def read_config(path: str) -> dict[str, Any]:
    """The archive's ``model_config.yaml`` (``{}`` when absent), its ``model:`` level unwrapped."""
    raw = archive_member(path, CONFIG_MEMBER)
    if raw is None:
        return {}
    cfg = read_yaml_config(raw, source=f"{path}:{CONFIG_MEMBER}")
    if "unet_config" not in cfg and isinstance(cfg.get("model"), Mapping):
        cfg = cfg["model"]
    return dict(cfg)


# --- NeMo layout -> Weights -------------------------------------------------------------------


def nemo_to_weights(sd: Mapping[str, Tensor], cfg: Mapping[str, Any], *, source: str,
                    base_dir: Path | None = None) -> Weights:
    """A NeMo ``LatentDiffusion`` state dict and its config -> our layout and hints."""
    from t2i_plugin_sd.formats import split_single_file

    sd = nk.strip_wrappers(sd)
    text_cfg = _section(cfg, "cond_stage_config", source)
    kind = _text_kind(sd, text_cfg, source)
    mt = _megatron_text_config(text_cfg, source, base_dir) if kind == "megatron" else {}
    unet = {k[len(nk.UNET):]: v for k, v in sd.items() if k.startswith(nk.UNET)}
    vae = {k[len(nk.VAE):]: v for k, v in sd.items() if k.startswith(nk.VAE)}
    compvis = {nk.UNET + k: v for k, v in nk.unet_to_compvis(unet, source=source).items()}
    compvis |= {nk.VAE + k: v for k, v in nk.vae_to_compvis(vae).items()}
    compvis |= _text_to_compvis(sd, kind, mt, source)
    compvis |= {k: v for k, v in sd.items() if not k.startswith((nk.UNET, nk.VAE, "cond_stage_model."))}
    weights = split_single_file(compvis, source=source)
    _refuse_unknown(weights.extras, source)
    if text_cfg is not None or kind == "megatron":  # else shapes and preset decide, as for a single file
        weights.hints.update(_text_hints(kind, weights.text, text_cfg, mt, source))
    weights.hints.update(unet_hints(_section(cfg, "unet_config", source), weights.unet, source))
    weights.hints.update(vae_hints(_section(cfg, "first_stage_config", source), source))
    weights.hints.update(diffusion_hints(cfg, sd, source))
    check_conditioning(cfg, weights.unet, source)
    return weights


def _text_to_compvis(sd: Mapping[str, Tensor], kind: str, mt: Mapping[str, Any], source: str) -> dict[str, Tensor]:
    """The text tower under the single-file prefixes (Megatron CLIP converted to open_clip's layout)."""
    text = {k: v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    if kind == "hf":
        hf = {k[len(HF_TEXT):]: v for k, v in text.items() if k.startswith(HF_TEXT)}
        _, unknown = keymaps.hf_clip_to_open_clip(hf)
        if unknown:  # split_single_file would drop them
            raise CheckpointError(f"{source}: CLIPTextModel tensors not understood: {unknown[:5]}")
    if kind != "megatron":
        return text
    tower = {k[len(nk.MEGATRON_TEXT):]: v for k, v in text.items() if k.startswith(nk.MEGATRON_TEXT)}
    converted, unknown = nk.megatron_clip_to_open_clip(tower, heads=int(mt["num_attention_heads"]),
                                                       megatron_legacy=bool(mt.get("megatron_legacy", False)))
    if unknown:
        raise CheckpointError(f"{source}: Megatron CLIP tensors not understood: {unknown[:5]}")
    rest = {k: v for k, v in text.items() if not k.startswith(nk.MEGATRON_TEXT)}
    return rest | {"cond_stage_model.model." + k: v for k, v in converted.items()}


def _section(cfg: Mapping[str, Any], name: str, source: str) -> dict[str, Any] | None:
    value = cfg.get(name)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{source}: model_config.yaml {name} is {value!r}, not a mapping; only text-conditioned "
                              "latent diffusion with a UNet, a KL autoencoder and a CLIP text encoder is read")
    return dict(value)


def _refuse(source: str, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: model_config.yaml {field}={value!r}: {why}")


def _refuse_unknown(extras: Mapping[str, Tensor], source: str) -> None:
    """Tensors of the three networks that no map placed: a different model, not extras."""
    stray = [k for k in extras if k.startswith((nk.UNET, nk.VAE, "cond_stage_model.")) and k not in _TEXT_UNUSED]
    if stray:
        raise CheckpointError(f"{source}: tensors this Stable Diffusion layout does not have: {stray[:5]}"
                              f"{' ...' if len(stray) > 5 else ''}")


# --- text encoder -----------------------------------------------------------------------------


def _text_kind(sd: Mapping[str, Tensor], text_cfg: Mapping[str, Any] | None, source: str) -> str:
    if any(k.startswith(nk.MEGATRON_TEXT) for k in sd):
        kind = "megatron"
    elif any(k.startswith(HF_TEXT) for k in sd):
        kind = "hf"
    elif any(k.startswith("cond_stage_model.model.decoder.layers.") for k in sd):
        raise CheckpointError(f"{source}: the text encoder is Megatron-core CLIP (decoder.layers.*), which NeMo's "
                              "FrozenMegatronCLIPEmbedder does not load; only its language_model.* layout is read")
    else:
        kind = "open_clip"
    target = str((text_cfg or {}).get("_target_", ""))
    expected = {"megatron": "FrozenMegatronCLIPEmbedder", "hf": "FrozenCLIPEmbedder",
                "open_clip": "FrozenOpenCLIPEmbedder"}[kind]
    if target and target.rsplit(".", 1)[-1] != expected:
        raise _refuse(source, "cond_stage_config._target_", target, f"the weights hold a {expected} text encoder")
    return kind


def _megatron_text_config(text_cfg: Mapping[str, Any] | None, source: str, base_dir: Path | None) -> dict[str, Any]:
    """The Megatron CLIP ``text`` config, where FrozenMegatronCLIPEmbedder takes it from: the CLIP
    ``.nemo`` at ``cond_stage_config.restore_from_path`` when set, else ``cond_stage_config.cfg``."""
    text_cfg = text_cfg or {}
    restore = text_cfg.get("restore_from_path")
    clip_path = _local_path(restore, base_dir)
    if clip_path is not None and clip_path.is_file():
        clip_cfg, where = read_config(str(clip_path)), f"{clip_path.name}:{CONFIG_MEMBER}"
    elif restore is None and isinstance(text_cfg.get("cfg"), Mapping):
        clip_cfg, where = text_cfg["cfg"], "cond_stage_config.cfg"
    else:
        raise _refuse(source, "cond_stage_config.restore_from_path", restore,
                      "the Megatron CLIP text encoder's architecture (heads, qkv layout, activation) lives in that "
                      "CLIP .nemo's model_config.yaml, which is not here; put the CLIP .nemo there (or next to this "
                      "archive), or embed its config as cond_stage_config.cfg with restore_from_path: null")
    text = clip_cfg.get("text") if isinstance(clip_cfg.get("text"), Mapping) else None
    if text is None or not isinstance(text.get("num_attention_heads"), int):
        raise CheckpointError(f"{source}: {where} has no integer text.num_attention_heads (Megatron CLIP text config)")
    return {**text, "_tokenizer": clip_cfg.get("tokenizer") or {}, "_where": where}


def _local_path(value: Any, base_dir: Path | None) -> Path | None:
    if not isinstance(value, str) or not value:
        return None
    p = Path(value)
    if p.exists() or base_dir is None:
        return p
    return base_dir / p.name if (base_dir / p.name).exists() else p


def _text_layer(text_cfg: Mapping[str, Any], allowed: Mapping[str, int], source: str, why: str) -> int:
    layer = text_cfg.get("layer", "last")
    if layer not in allowed:
        raise _refuse(source, "cond_stage_config.layer", layer, why)
    return allowed[layer]


def _text_hints(kind: str, text: Mapping[str, Tensor], text_cfg: Mapping[str, Any] | None, mt: Mapping[str, Any],
                source: str) -> dict[str, Any]:
    text_cfg = text_cfg or {}
    width = int(text["token_embedding.weight"].shape[1])
    fc = text.get("transformer.resblocks.0.mlp.c_fc.weight")
    mlp = int(fc.shape[0]) if fc is not None else None
    if kind == "megatron":
        hints = _megatron_hints(mt, width, mlp, source)
        hints["text_skip"] = _text_layer(text_cfg, {"last": 0, "penultimate": 1}, source,
                                         "FrozenMegatronCLIPEmbedder reads 'last' or 'penultimate'")
    elif kind == "hf":
        hints = _hf_hints(text_cfg, width, mlp, int(text["positional_embedding"].shape[0]), source)
        hints["text_skip"] = _text_layer(
            text_cfg, {"last": 0}, source, "'hidden' reads a hidden state without the final LayerNorm and 'pooled' "
            "one pooled token; the engine reads the last layer after its LayerNorm")
    else:  # FrozenOpenCLIPEmbedder: open_clip text towers use 64-wide heads; 'openai' weights use QuickGELU
        hints = {"text_heads": max(1, width // 64), "text_pad": "zero",
                 "text_activation": "quick_gelu" if text_cfg.get("version") == "openai" else "gelu",
                 "text_skip": _text_layer(text_cfg, {"last": 0, "penultimate": 1}, source,
                                          "FrozenOpenCLIPEmbedder reads 'last' or 'penultimate'")}
    # the embedders pad their output with zero tokens up to a multiple of 8 (77 -> 80)
    hints["text_pad_to_multiple"] = TEXT_PAD_MULTIPLE
    return hints


def _megatron_hints(mt: Mapping[str, Any], width: int, mlp: int | None, source: str) -> dict[str, Any]:
    where = mt["_where"]
    heads = int(mt["num_attention_heads"])

    def need(field: str, ok: bool, value: Any, why: str) -> None:
        if not ok:
            raise CheckpointError(f"{source}: {where} text.{field}={value!r}: {why}")

    need("hidden_size", mt.get("hidden_size", width) == width, mt.get("hidden_size"), f"the weights are {width} wide")
    need("num_attention_heads", heads > 0 and width % heads == 0, heads, f"does not divide the width {width}")
    kv = mt.get("kv_channels")
    need("kv_channels", kv in (None, width // heads), kv, "head width other than hidden_size / heads")
    need("ffn_hidden_size", mt.get("ffn_hidden_size", mlp) == mlp, mt.get("ffn_hidden_size"), f"the weights have {mlp}")
    need("openai_gelu", not mt.get("openai_gelu", False), mt.get("openai_gelu"),
         "tanh-approximate GELU is not modelled")
    act = mt.get("activation", "gelu")
    # approx-gelu is x * sigmoid(1.702 x): NeMo's OpenAI ViT-L/14 CLIP config (QuickGELU weights) uses
    # it, the OpenCLIP ViT-H/14 config (GELU weights) uses gelu
    need("activation", act in ("gelu", "approx-gelu", "quick-gelu", "quick_gelu"), act, "not gelu or approx-gelu")
    need("normalization", mt.get("normalization", "layernorm") == "layernorm", mt.get("normalization"),
         "only LayerNorm (not layernorm1p / rmsnorm) is modelled")
    eps = float(mt.get("layernorm_epsilon", 1e-5))
    need("layernorm_epsilon", abs(eps - 1e-5) < 1e-12, eps, "open_clip's LayerNorm uses 1e-5")
    need("transformer_block_type", mt.get("transformer_block_type", "pre_ln") == "pre_ln",
         mt.get("transformer_block_type"), "only pre-LN blocks are modelled")
    need("headscale", not mt.get("headscale", False), mt.get("headscale"), "per-head scaling is not modelled")
    need("normalize_attention_scores", mt.get("normalize_attention_scores", True), mt.get("normalize_attention_scores"),
         "unscaled attention scores are not modelled")
    need("position_embedding_type", mt.get("position_embedding_type", "learned_absolute") in
         ("learned_absolute", "learned_parameters"), mt.get("position_embedding_type"), "only learned positions")
    tok = mt.get("_tokenizer") or {}
    tok_type = str(tok.get("type") or "")
    need("tokenizer.type", not tok_type or "clip" in tok_type.lower(), tok_type, "the engine tokenizes with CLIP's BPE")
    return {"text_heads": heads, "text_activation": "gelu" if act == "gelu" else "quick_gelu",
            "text_pad": "zero"}  # NeMo's clip_dataset.tokenize fills with 0 after <|endoftext|>


def _hf_hints(text_cfg: Mapping[str, Any], width: int, mlp: int | None, positions: int,
              source: str) -> dict[str, Any]:
    """FrozenCLIPEmbedder: the CLIPTextModel config from ``version`` (a hub id or a local folder)."""
    from t2i_plugin_sd.tokenizer_files import read_pad

    version = text_cfg.get("version", "openai/clip-vit-large-patch14")
    folder = _local_path(version, None)  # a hub id or a folder (relative to the working directory, as for NeMo)
    pad: str | None = "eos"  # the openai/clip-vit-large-patch14 tokenizer pads with <|endoftext|>
    if folder is not None and (folder / "config.json").is_file():
        conf = json.loads((folder / "config.json").read_text())
        conf = conf.get("text_config", conf)
        pad = read_pad(folder) or pad
    elif version in _HF_CLIP_VERSIONS:
        conf = _HF_CLIP_VERSIONS[version]
    else:
        raise _refuse(source, "cond_stage_config.version", version,
                      f"not a local CLIPTextModel folder nor one of {sorted(_HF_CLIP_VERSIONS)}; its heads and "
                      "activation are not in the weights")
    act = conf.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise _refuse(source, "cond_stage_config.version", version, f"hidden_act {act!r} is not modelled")
    if abs(float(conf.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        raise _refuse(source, "cond_stage_config.version", version, "layer_norm_eps other than 1e-5")
    if conf.get("intermediate_size", mlp) != mlp:
        raise _refuse(source, "cond_stage_config.version", version,
                      f"intermediate_size differs from the weights ({mlp})")
    if int(text_cfg.get("max_length", 77)) != positions:
        raise _refuse(source, "cond_stage_config.max_length", text_cfg.get("max_length"),
                      f"the text tower has {positions} positions")
    return {"text_heads": int(conf["num_attention_heads"]), "text_activation": act, "text_pad": pad}


# --- UNet, autoencoder, diffusion -------------------------------------------------------------

# UNetModel options the engine's UNet does not have: field -> (NeMo default, accepted values)
_UNET_FIXED: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "use_spatial_transformer": (False, (True,)), "use_scale_shift_norm": (False, (False,)),
    "resblock_updown": (False, (False,)), "num_classes": (None, (None,)), "conv_resample": (True, (True,)),
    "dims": (2, (2,)), "n_embed": (None, (None,)), "disable_middle_self_attn": (False, (False,)),
    "use_te_fp8": (False, (False,)), "adm_in_channels": (None, (None,)), "resblock_gn_groups": (32, (32,)),
}


def unet_hints(u: Mapping[str, Any] | None, unet: Mapping[str, Tensor], source: str) -> dict[str, Any]:
    """Hints from ``unet_config``: heads per level (not in the shapes), checked against the weights."""
    if u is None:
        return {}
    for field, (default, ok) in _UNET_FIXED.items():
        if u.get(field, default) not in ok:
            why = ("NeMo keeps the transformer GroupNorms at 32 groups while the ResBlocks use this count"
                   if field == "resblock_gn_groups" else "the engine's UNet does not have this option")
            raise _refuse(source, f"unet_config.{field}", u.get(field), why)
    if any(u.get("disable_self_attentions") or []):
        raise _refuse(source, "unet_config.disable_self_attentions", u["disable_self_attentions"], "not modelled")
    mult = list(u.get("channel_mult", (1, 2, 4, 8)))
    n = len(mult)
    levels = len({k.split(".")[1] for k in unet if k.startswith("down_blocks.")})
    if levels != n:
        raise _refuse(source, "unet_config.channel_mult", mult, f"the weights have {levels} levels")
    channels = [int(u.get("model_channels", 0)) * int(m) for m in mult]
    found = [int(unet[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(n)]
    if channels != found:
        raise _refuse(source, "unet_config.model_channels", u.get("model_channels"),
                      f"the weights have channels {found}")
    res = u.get("num_res_blocks")
    blocks = res if isinstance(res, (list, tuple)) else [res] * n
    if len(set(blocks)) != 1:
        raise _refuse(source, "unet_config.num_res_blocks", res, "per-level counts are not modelled")
    if u.get("num_attention_blocks") is not None and any(int(b) < blocks[0] for b in u["num_attention_blocks"]):
        raise _refuse(source, "unet_config.num_attention_blocks", u["num_attention_blocks"], "not modelled")
    attention = [2**i in list(u.get("attention_resolutions", ())) for i in range(n)]
    if attention != [f"down_blocks.{i}.attentions.0.proj_in.weight" in unet for i in range(n)]:
        raise _refuse(source, "unet_config.attention_resolutions", u.get("attention_resolutions"),
                      "the weights have attention at other levels")
    depth = _transformer_depth(u, attention, source)  # checked against the weights (architecture_from)
    return {"unet_heads": _heads(u, channels, source), "unet_groups": 32,
            "unet_declared": {"depth": ("unet_config.transformer_depth", (depth,) * n)}}


def _heads(u: Mapping[str, Any], channels: list[int], source: str) -> tuple[int, ...]:
    """Heads per level as NeMo's UNetModel computes them (num_head_channels wins over num_heads)."""
    nhc, nh = int(u.get("num_head_channels", -1)), int(u.get("num_heads", -1))
    heads = []
    for ch in channels:
        h = ch // nhc if nhc != -1 else nh
        if h <= 0 or ch % h or (nhc != -1 and ch % nhc):
            raise _refuse(source, "unet_config.num_head_channels" if nhc != -1 else "unet_config.num_heads",
                          nhc if nhc != -1 else nh, f"does not divide {ch} channels")
        heads.append(h)
    return tuple(heads)


def _transformer_depth(u: Mapping[str, Any], attention: list[bool], source: str) -> int:
    depth = u.get("transformer_depth", 1)
    per_level = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(attention)
    middle = int(u.get("transformer_depth_middle") or per_level[-1])  # NeMo's default: the last level's
    used = {int(d) for d, a in zip(per_level, attention) if a} | {middle}
    if len(used) != 1:
        raise _refuse(source, "unet_config.transformer_depth", depth, "different depths per level are not modelled")
    return used.pop()


def vae_hints(f: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """``first_stage_config``: only the KL autoencoder the engine models is accepted."""
    if f is None:
        return {}
    target = str(f.get("_target_", "AutoencoderKL"))
    if target.rsplit(".", 1)[-1] != "AutoencoderKL":
        raise _refuse(source, "first_stage_config._target_", target, "only AutoencoderKL is modelled")
    dd = f.get("ddconfig") or {}
    checks = {"double_z": (dd.get("double_z", True), (True,)),
              "attn_resolutions": (list(dd.get("attn_resolutions") or []), ([],)),
              "attn_type": (dd.get("attn_type", "vanilla"), ("vanilla",)),
              "use_linear_attn": (dd.get("use_linear_attn", False), (False,)),
              "resamp_with_conv": (dd.get("resamp_with_conv", True), (True,))}
    for field, (value, ok) in checks.items():
        if value not in ok:
            raise _refuse(source, f"first_stage_config.ddconfig.{field}", value, "not modelled")
    if "embed_dim" in f and "z_channels" in dd and f["embed_dim"] != dd["z_channels"]:
        raise _refuse(source, "first_stage_config.embed_dim", f["embed_dim"], "differs from ddconfig.z_channels")
    if dd.get("out_ch", dd.get("in_channels", 3)) != dd.get("in_channels", 3):
        raise _refuse(source, "first_stage_config.ddconfig.out_ch", dd.get("out_ch"), "differs from in_channels")
    return {"vae_groups": 32}  # NeMo's Normalize: GroupNorm(32)


def diffusion_hints(cfg: Mapping[str, Any], sd: Mapping[str, Tensor], source: str) -> dict[str, Any]:
    """Prediction type, latent scale and training schedule from the top level of the config."""
    hints: dict[str, Any] = {}
    if "parameterization" in cfg:
        p = cfg["parameterization"]
        if p not in ("eps", "v"):
            raise _refuse(source, "parameterization", p, "the engine samples eps and v models")
        hints["prediction"] = p
    for field in ("use_positional_encodings", "cond_stage_forward", "given_betas"):
        if cfg.get(field):
            raise _refuse(source, field, cfg[field], "not modelled")
    if cfg.get("scale_by_std") and isinstance(sd.get("scale_factor"), Tensor):
        hints["scaling_factor"] = float(sd["scale_factor"])  # the buffer set from the data's std
    elif "scale_factor" in cfg:
        hints["scaling_factor"] = float(cfg["scale_factor"])
    if "linear_start" in cfg or "beta_schedule" in cfg:
        hints["schedule"] = _schedule(cfg, source)
    return hints


def check_conditioning(cfg: Mapping[str, Any], unet: Mapping[str, Tensor], source: str) -> None:
    """``conditioning_key`` (``concat_mode``) and ``unet_config.in_channels`` against the UNet's
    input width: ``crossattn`` (text by cross-attention) takes the latent alone; ``hybrid`` with
    twice the latent's channels is InstructPix2Pix (NeMo's ``megatron_instruct_pix2pix``,
    ``MegatronLatentDiffusionEdit``: the source image's latent concatenated after the noisy one,
    text by cross-attention), which the instructpix2pix plugin edits with. Anything else is a
    :class:`CheckpointError` (SD inpainting's 9 channels named)."""
    if "conv_in.weight" not in unet or "conv_out.weight" not in unet:
        raise CheckpointError(f"{source}: no UNet input/output convolution in the weights")
    width, latent = int(unet["conv_in.weight"].shape[1]), int(unet["conv_out.weight"].shape[0])
    u = cfg.get("unet_config")
    declared = u.get("in_channels") if isinstance(u, Mapping) else None
    if declared is not None and int(declared) != width:
        raise _refuse(source, "unet_config.in_channels", declared, f"the weights' UNet takes {width} input channels")
    key = cfg.get("conditioning_key")
    if key is None and cfg.get("concat_mode") is True:
        key = "concat"  # LatentDiffusion's rule for a missing conditioning_key
    problem = conditioning_problem(key, width, latent)
    if problem is not None:
        raise _refuse(source, "conditioning_key", key, problem)


def _schedule(cfg: Mapping[str, Any], source: str) -> ScheduleConfig:
    name = cfg.get("beta_schedule", "linear")
    if name not in _BETA_SCHEDULES:
        raise _refuse(source, "beta_schedule", name, f"known: {', '.join(_BETA_SCHEDULES)}")
    if name == "cosine" and abs(float(cfg.get("cosine_s", 8e-3)) - 8e-3) > 1e-12:
        raise _refuse(source, "cosine_s", cfg.get("cosine_s"), "only the 0.008 offset of squaredcos_cap_v2")
    return ScheduleConfig(beta_schedule=_BETA_SCHEDULES[name],  # type: ignore[arg-type]
                          beta_start=float(cfg.get("linear_start", 1e-4)), beta_end=float(cfg.get("linear_end", 2e-2)),
                          num_train_timesteps=int(cfg.get("timesteps", 1000)))


__all__ = ["NemoArchive", "nemo_to_weights", "read_config"]
