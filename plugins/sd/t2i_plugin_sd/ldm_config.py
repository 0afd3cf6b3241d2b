"""The latent-diffusion ``.yaml`` beside a single-file checkpoint, read and written.

The layout is CompVis' ``v1-inference.yaml`` / Stability's ``v2-inference-v.yaml``
(``model.params.{unet_config, first_stage_config, cond_stage_config}``), the file A1111, ComfyUI
and diffusers' ``from_single_file(original_config=...)`` take. Reading honours every field that
changes the computation or refuses it by name. The format cannot express everything the engine
builds (GroupNorm groups other than 32, eps, per-level head dims with 1x1 projections): the
engine's own export records those in the safetensors metadata as well
(:data:`ARCH_METADATA_KEY`), so a round trip through the engine is lossless.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from t2i_engine.errors import CheckpointError
from t2i_plugin_sd.presets import Architecture, ScheduleConfig

ARCH_METADATA_KEY = "t2i_engine.architecture"
"""safetensors metadata key of the architecture record the engine's single-file export writes."""

# LDM's make_beta_schedule names -> diffusers' (LDM "linear" is linear in sqrt(beta))
_LDM_BETAS = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
_DIFFUSERS_BETAS = {v: k for k, v in _LDM_BETAS.items()}

# UNetModel params the engine builds only with this value; params absent here and from the
# readers below are refused by name
_UNET_FIXED: dict[str, Any] = {"use_spatial_transformer": True, "resblock_updown": False, "conv_resample": True,
                               "dims": 2, "use_scale_shift_norm": False, "num_classes": None, "n_embed": None,
                               "disable_self_attentions": None, "num_attention_blocks": None,
                               "adm_in_channels": None, "use_bf16": None}
_UNET_INERT = {"image_size", "use_checkpoint", "use_fp16", "legacy", "use_new_attention_order",
               "spatial_transformer_attn_type", "num_heads_upsample"}
_UNET_READ = {"in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
              "channel_mult", "num_heads", "num_head_channels", "transformer_depth", "context_dim",
              "use_linear_in_transformer", "dropout"}


def _fail(where: str, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {field} = {value!r}: {why}")


def _params(section: Any) -> Mapping[str, Any]:
    if not isinstance(section, Mapping):
        return {}
    params = section.get("params", {})
    return params if isinstance(params, Mapping) else {}


# --- reading ---------------------------------------------------------------------------------


def read_yaml_config(data: bytes, *, source: str) -> Mapping[str, Any]:
    """A latent-diffusion / NeMo config: malformed or tagged YAML (``!!python/...``, refused by
    ``safe_load``) and a document that is not a mapping are a CheckpointError naming ``source``."""
    try:
        cfg = yaml.safe_load(data)
    except yaml.YAMLError as e:
        where = f" at line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise CheckpointError(f"{source}: not a readable YAML config{where}: {problem}") from e
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{source}: expected a YAML mapping (model: params: ...), got {type(cfg).__name__}")
    return cfg


def _unet_hints(p: Mapping[str, Any], where: str) -> dict[str, Any]:
    for key, value in p.items():
        if key in _UNET_READ or key in _UNET_INERT:
            continue
        if key not in _UNET_FIXED:
            raise _fail(where, f"unet_config.params.{key}", value, "a field this engine does not know")
        if value not in (None, False, _UNET_FIXED[key]):
            raise _fail(where, f"unet_config.params.{key}", value, f"the engine builds only {_UNET_FIXED[key]!r}")
    hints: dict[str, Any] = {}
    if "model_channels" not in p or "channel_mult" not in p:
        return hints
    channels = tuple(int(p["model_channels"]) * int(m) for m in p["channel_mult"])
    n = len(channels)
    heads, head_dim = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
    if head_dim != -1:
        hints["unet_heads"] = tuple(max(1, c // head_dim) for c in channels)
    elif heads != -1:
        hints["unet_heads"] = (heads,) * n
    declared: dict[str, tuple[str, Any]] = {"channels": ("unet_config.params.model_channels/channel_mult", channels)}
    if "attention_resolutions" in p:
        declared["attention"] = ("unet_config.params.attention_resolutions",
                                 tuple(2**i in set(p["attention_resolutions"]) for i in range(n)))
    if "num_res_blocks" in p:
        declared["layers_per_block"] = ("unet_config.params.num_res_blocks", int(p["num_res_blocks"]))
    if p.get("context_dim") is not None:
        declared["context_dim"] = ("unet_config.params.context_dim", int(p["context_dim"]))
    if "use_linear_in_transformer" in p:
        declared["linear_projection"] = ("unet_config.params.use_linear_in_transformer",
                                         bool(p["use_linear_in_transformer"]))
    if p.get("transformer_depth") is not None:
        d = p["transformer_depth"]
        declared["depth"] = ("unet_config.params.transformer_depth", (int(d),) * n if isinstance(d, int)
                             else tuple(int(x) for x in d))
    for key in ("in_channels", "out_channels"):
        if key in p:
            declared[key] = (f"unet_config.params.{key}", int(p[key]))
    hints["unet_declared"] = declared
    if p.get("dropout"):
        hints["unet_dropout"] = float(p["dropout"])
    return hints


def _vae_hints(section: Any, where: str) -> dict[str, Any]:
    p = _params(section)
    dd = p.get("ddconfig", {})
    if not isinstance(dd, Mapping) or not dd:
        return {}
    if dd.get("attn_resolutions"):
        raise _fail(where, "first_stage_config.params.ddconfig.attn_resolutions", dd["attn_resolutions"],
                    "the engine's KL autoencoder has attention in its mid block only")
    if dd.get("double_z", True) is not True:
        raise _fail(where, "first_stage_config.params.ddconfig.double_z", dd["double_z"], "a KL autoencoder needs it")
    if "embed_dim" in p and "z_channels" in dd and int(p["embed_dim"]) != int(dd["z_channels"]):
        raise _fail(where, "first_stage_config.params.embed_dim", p["embed_dim"],
                    f"the engine builds embed_dim == z_channels ({dd['z_channels']})")
    declared: dict[str, tuple[str, Any]] = {}
    if "ch" in dd and "ch_mult" in dd:
        declared["channels"] = ("first_stage_config ch/ch_mult", tuple(int(dd["ch"]) * int(m) for m in dd["ch_mult"]))
    for field, key in (("in_channels", "in_channels"), ("out_channels", "out_ch"), ("latent_channels", "z_channels"),
                       ("layers_per_block", "num_res_blocks")):
        if key in dd:
            declared[field] = (f"first_stage_config.params.ddconfig.{key}", int(dd[key]))
    return {"vae_declared": declared}


def _text_hints(section: Any, where: str) -> dict[str, Any]:
    if not isinstance(section, Mapping) or "target" not in section:
        return {}
    target, p = str(section["target"]), _params(section)
    layer = p.get("layer", "last")
    name = target.rsplit(".", 1)[-1]
    if name == "FrozenCLIPEmbedder":
        if layer != "last":
            raise _fail(where, "cond_stage_config.params.layer", layer,
                        "the engine reads CLIP's last layer after its final LayerNorm (layer: last)")
        return {"text_skip": 0}
    if name == "FrozenOpenCLIPEmbedder":
        if layer not in ("last", "penultimate"):
            raise _fail(where, "cond_stage_config.params.layer", layer, "the engine reads 'last' or 'penultimate'")
        return {"text_skip": 1 if layer == "penultimate" else 0}
    raise _fail(where, "cond_stage_config.target", target,
                "the engine's Stable Diffusion reads FrozenCLIPEmbedder or FrozenOpenCLIPEmbedder text encoders")


def _schedule(p: Mapping[str, Any], where: str) -> ScheduleConfig | None:
    if "linear_start" not in p and "linear_end" not in p and "beta_schedule" not in p:
        return None
    kind = p.get("beta_schedule", "linear")
    if kind not in _LDM_BETAS:
        raise _fail(where, "model.params.beta_schedule", kind, f"the engine builds {', '.join(_LDM_BETAS)}")
    default = ScheduleConfig()
    return attrs.evolve(default, beta_schedule=_LDM_BETAS[kind],
                        beta_start=float(p.get("linear_start", default.beta_start)),
                        beta_end=float(p.get("linear_end", default.beta_end)),
                        num_train_timesteps=int(p.get("timesteps", default.num_train_timesteps)))


def conditioning_problem(key: str | None, width: int | None, latent: int) -> str | None:
    """What is wrong with ``conditioning_key`` ``key`` for a UNet of ``width`` input channels
    (None: not declared) over a ``latent``-channel latent, or None. ``crossattn`` (the default)
    feeds the UNet the noisy latent alone; ``hybrid`` also concatenates a latent of the same width,
    which is an InstructPix2Pix editor (timbrooks' ``ddpm_edit.LatentDiffusion``, NeMo's
    ``megatron_instruct_pix2pix``: twice the latent channels) and only that: SD inpainting's
    ``2 * latent + 1`` channels (latent, mask, masked latent) are not built here. The one rule of
    the latent-diffusion yaml reader and the NeMo archive reader."""
    key = key or "crossattn"
    if key == "crossattn":
        if width is None or width == latent:
            return None
        return (f"crossattn needs {latent} input channels (the latent alone), but the UNet's in_channels is {width} "
                f"(an InstructPix2Pix editor is conditioning_key: hybrid with {2 * latent})")
    if key == "hybrid" and width == 2 * latent:
        return None
    if key == "hybrid" and width == 2 * latent + 1:
        return (f"a {width}-channel UNet with hybrid conditioning is Stable Diffusion inpainting (noisy latent, mask, "
                "masked image), which the engine does not model")
    return (f"the engine builds text-to-image models (crossattn, {latent} input channels) and InstructPix2Pix "
            f"editors (hybrid, {2 * latent}); got {key} with in_channels {width}")


def conditioning_key_of(width: int, latent: int) -> str:
    """The ``conditioning_key`` the yaml writer gives a UNet of ``width`` input channels over a
    ``latent``-channel latent: ``hybrid`` where :func:`conditioning_problem` accepts it (an
    InstructPix2Pix editor), else ``crossattn``."""
    return "hybrid" if conditioning_problem("hybrid", width, latent) is None else "crossattn"


def _check_conditioning(p: Mapping[str, Any], where: str) -> None:
    """``conditioning_key`` against ``unet_config.params.in_channels`` (:func:`conditioning_problem`)."""
    key = p.get("conditioning_key")
    unet_in = _params(p.get("unet_config")).get("in_channels")
    problem = conditioning_problem(key, None if unet_in is None else int(unet_in), int(p.get("channels", 4)))
    if problem is not None:
        raise _fail(where, "model.params.conditioning_key", key, problem)


def ldm_yaml_hints(cfg: Any, *, where: str = "latent-diffusion yaml") -> dict[str, Any]:
    """Hints from a latent-diffusion yaml (``model.params``); a CheckpointError naming any field
    that changes the computation and that the engine cannot build."""
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{where}: expected a mapping at the top, got {type(cfg).__name__}")
    model = cfg.get("model")
    p = _params(model) if isinstance(model, Mapping) and "params" in model else cfg
    hints: dict[str, Any] = {}
    param = p.get("parameterization", "eps")
    if param not in ("eps", "v"):
        raise _fail(where, "model.params.parameterization", param, "the engine's Stable Diffusion predicts eps or v")
    if "parameterization" in p:
        hints["prediction"] = param
    _check_conditioning(p, where)
    if "scale_factor" in p:
        hints["scaling_factor"] = float(p["scale_factor"])
    schedule = _schedule(p, where)
    if schedule is not None:
        hints["schedule"] = schedule
    hints |= _unet_hints(_params(p.get("unet_config")), where)
    hints |= _vae_hints(p.get("first_stage_config"), where)
    hints |= _text_hints(p.get("cond_stage_config"), where)
    return hints


# --- writing ---------------------------------------------------------------------------------


def _mult(channels: tuple[int, ...]) -> list[int]:
    return [c // channels[0] for c in channels]


def _heads_params(arch: Architecture) -> dict[str, int]:
    u = arch.unet
    used = [i for i, a in enumerate(u.attention) if a] + [len(u.channels) - 1]  # + the mid block
    heads = {u.heads[i] for i in used}
    if len(heads) == 1:
        return {"num_heads": heads.pop(), "num_head_channels": -1}
    dims = {u.channels[i] // u.heads[i] for i in used}
    return {"num_head_channels": dims.pop()} if len(dims) == 1 else {"num_heads": u.heads[0]}


def inexpressible(arch: Architecture) -> list[str]:
    """Fields of ``arch`` the latent-diffusion yaml cannot carry (other tools would build a
    different model from it; the engine reads them from the safetensors metadata)."""
    u, v, t = arch.unet, arch.vae, arch.text
    out = [f"unet groups {u.groups}"] * (u.groups != 32) + [f"vae groups {v.groups}"] * (v.groups != 32)
    out += [f"unet norm_eps {u.norm_eps}"] * (u.norm_eps != 1e-5)
    out += ["unet channels not multiples of the first"] * any(c % u.channels[0] for c in u.channels)
    out += ["vae channels not multiples of the first"] * any(c % v.channels[0] for c in v.channels)
    out += [f"text heads {t.heads}"] * (t.heads != {768: 12, 1024: 16, 1280: 20}.get(t.width, -1))
    out += [f"text mlp width {t.mlp_width}"] * (t.mlp_width is not None)
    out += [f"text embeddings zero-padded to a multiple of {t.pad_to_multiple}"] * (t.pad_to_multiple != 1)
    p = _heads_params(arch)
    got = (p["num_heads"],) * len(u.channels) if p.get("num_heads", -1) != -1 else \
        tuple(max(1, c // p["num_head_channels"]) for c in u.channels)
    if any(got[i] != u.heads[i] for i, a in enumerate(u.attention) if a):
        out.append(f"unet heads {list(u.heads)}")
    if p.get("num_head_channels", -1) != -1 and not u.linear_projection:
        out.append("per-level head counts with 1x1 projections (diffusers' converter reads only num_heads then)")
    if u.upcast_attention or u.flip_sin_to_cos is not True or u.freq_shift != 0:
        out.append("unet attention upcast / timestep embedding layout")
    return out


def ldm_yaml(arch: Architecture) -> dict[str, Any]:
    """The latent-diffusion inference config of ``arch`` (v1-inference.yaml / v2-inference-v.yaml)."""
    u, v, t, s = arch.unet, arch.vae, arch.text, arch.schedule
    depth = u.transformer_depth
    unet = {"image_size": 32, "in_channels": u.in_channels, "out_channels": u.out_channels,
            "model_channels": u.channels[0],
            "attention_resolutions": [2**i for i, a in enumerate(u.attention) if a],
            "num_res_blocks": u.layers_per_block, "channel_mult": _mult(u.channels), **_heads_params(arch),
            "use_spatial_transformer": True, "use_linear_in_transformer": u.linear_projection,
            "transformer_depth": depth[0] if len(set(depth)) == 1 else list(depth), "context_dim": u.context_dim,
            "use_checkpoint": False, "legacy": False}
    vae = {"embed_dim": v.latent_channels, "monitor": "val/rec_loss",
           "ddconfig": {"double_z": True, "z_channels": v.latent_channels, "resolution": 256,
                        "in_channels": v.in_channels, "out_ch": v.out_channels, "ch": v.channels[0],
                        "ch_mult": _mult(v.channels), "num_res_blocks": v.layers_per_block, "attn_resolutions": [],
                        "dropout": 0.0},
           "lossconfig": {"target": "torch.nn.Identity"}}
    if t.activation == "quick_gelu":
        text: dict[str, Any] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    else:
        text = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": "penultimate" if t.skip_last_layers else "last"}}
    if s.beta_schedule not in _DIFFUSERS_BETAS:
        raise CheckpointError(f"schedule {s.beta_schedule!r} has no latent-diffusion name")
    key = conditioning_key_of(u.in_channels, v.latent_channels)
    params: dict[str, Any] = {
        "linear_start": s.beta_start, "linear_end": s.beta_end, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": s.num_train_timesteps, "beta_schedule": _DIFFUSERS_BETAS[s.beta_schedule],
        "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": v.latent_channels,
        "cond_stage_trainable": False, "conditioning_key": key, "monitor": "val/loss_simple_ema",
        "scale_factor": float(v.scaling_factor), "use_ema": False, "parameterization": arch.prediction,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae},
        "cond_stage_config": text,
    }
    target = "ldm.models.diffusion.ddpm.LatentDiffusion"
    if key == "hybrid":  # an InstructPix2Pix editor, as timbrooks' generate.yaml
        target = "ldm.models.diffusion.ddpm_edit.LatentDiffusion"
        params |= {"first_stage_key": "edited", "cond_stage_key": "edit"}
    return {"model": {"base_learning_rate": 1.0e-4, "target": target, "params": params}}


# --- the engine's own architecture record ----------------------------------------------------


def architecture_metadata(hints: Mapping[str, Any]) -> str:
    """``hints`` (from :func:`t2i_plugin_sd.model.architecture_hints`, plus ``schedule``) as the
    JSON string stored under :data:`ARCH_METADATA_KEY`."""
    out = {k: (attrs.asdict(v) if attrs.has(type(v)) else list(v) if isinstance(v, tuple) else v)
           for k, v in hints.items()}
    return json.dumps(out, sort_keys=True)


def hints_from_metadata(text: str, *, where: str) -> dict[str, Any]:
    """The hints an :func:`architecture_metadata` record holds."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: metadata {ARCH_METADATA_KEY!r} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: metadata {ARCH_METADATA_KEY!r} is not a JSON object")
    hints = dict(raw)
    if isinstance(hints.get("schedule"), dict):
        try:
            hints["schedule"] = ScheduleConfig(**hints["schedule"])
        except TypeError as e:
            raise CheckpointError(f"{where}: metadata {ARCH_METADATA_KEY!r} has a schedule this engine cannot "
                                  f"read: {e}") from e
    if "unet_heads" in hints:
        hints["unet_heads"] = tuple(hints["unet_heads"])
    return hints


__all__ = ["ARCH_METADATA_KEY", "architecture_metadata", "conditioning_key_of", "conditioning_problem",
           "hints_from_metadata", "inexpressible", "ldm_yaml", "ldm_yaml_hints", "read_yaml_config"]
