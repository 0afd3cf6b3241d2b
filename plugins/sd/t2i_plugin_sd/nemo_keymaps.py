"""Key maps from NeMo's Stable Diffusion checkpoints to the layouts :mod:`t2i_plugin_sd.keymaps` reads.

NeMo (NVIDIA/NeMo ``nemo/collections/multimodal``, removed from NeMo in commit 6aed959726) saves
``MegatronLatentDiffusion.state_dict()``: everything under ``model.`` (its ``LatentDiffusion``),
then the CompVis top level (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*``, the schedule buffers ``betas``, ``alphas_cumprod`` ...). Inside, three
things differ from CompVis (see docs/stable-diffusion.md, "NeMo .nemo", for the sources):

* the UNet fuses GroupNorm and SiLU into one module (``GroupNormOpt(act="silu")``), so every
  layer after a norm moves down one index: ``in_layers.1`` is the convolution CompVis calls
  ``in_layers.2``, ``out_layers.2`` is ``out_layers.3``, ``out.1`` is ``out.2``;
* its transformer blocks keep each LayerNorm inside the module it feeds: ``attn1.norm``,
  ``attn2.norm`` and ``ff.net.0`` are CompVis' ``norm1``/``norm2``/``norm3``, so the
  feed-forward layers are ``ff.net.1.proj`` and ``ff.net.3`` (CompVis ``ff.net.0.proj``,
  ``ff.net.2``);
* the default text encoder is Megatron CLIP (``cond_stage_model.model.language_model.*``) with
  q, k and v fused in one ``query_key_value`` projection.

Older NeMo checkpoints use the CompVis names for some of these; every rename below applies to a
name only NeMo's layout has, so both load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from t2i_engine.checkpoint.nemo import strip_compile_names
from t2i_engine.errors import CheckpointError

StateDict = dict[str, Tensor]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
MEGATRON_TEXT = "cond_stage_model.model.language_model."

# NeMo name -> CompVis name, one rename per key; each left side exists only in NeMo's layout
# (CompVis has parameter-free SiLU/Dropout modules at those indices)
_UNET_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\.in_layers\.1\."), ".in_layers.2."),
    (re.compile(r"\.out_layers\.2\."), ".out_layers.3."),
    (re.compile(r"^out\.1\."), "out.2."),
    (re.compile(r"\.attn1\.norm\."), ".norm1."),
    (re.compile(r"\.attn2\.norm\."), ".norm2."),
    (re.compile(r"\.ff\.net\.0\.(weight|bias)$"), r".norm3.\1"),
    (re.compile(r"\.ff\.net\.1\.proj\."), ".ff.net.0.proj."),
    (re.compile(r"\.ff\.net\.3\."), ".ff.net.2."),
]
# use_te_fp8: TransformerEngine LayerNormLinear / LayerNormMLP replace the attention and MLP modules
_TE_NAMES = re.compile(r"norm_to_q|ff\.net\.(layer_norm_|fc1_|fc2_)|_extra_state$")
_VAE_CONV_ATTN = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def strip_wrappers(sd: Mapping[str, Tensor]) -> StateDict:
    """Drop the wrappers NeMo adds around ``LatentDiffusion``: the ``model.`` of
    ``MegatronLatentDiffusion``, the ``module.`` of ``Float16Module`` (megatron_amp_O2) and the
    ``_orig_mod`` of ``torch.compile`` (removed the way NeMo's ``init_from_ckpt`` does)."""
    out = strip_compile_names(sd)
    if any(k.startswith(("model.model.", "model.first_stage_model.", "model.module.")) for k in out):
        out = {k.removeprefix("model."): v for k, v in out.items()}
    if any(k.startswith("module.") for k in out):
        out = {k.removeprefix("module."): v for k, v in out.items()}
    return out


def unet_to_compvis(unet: Mapping[str, Tensor], *, source: str) -> StateDict:
    """NeMo ``openaimodel.UNetModel`` keys (without ``model.diffusion_model.``) -> CompVis keys."""
    te = [k for k in unet if _TE_NAMES.search(k)]
    if te:
        raise CheckpointError(
            f"{source}: the UNet was saved with use_te_fp8 (TransformerEngine layers, e.g. {te[0]!r}); their fused "
            "GEGLU weight order is not documented by NeMo's key mapping, so this layout is refused. Re-save the "
            "model with unet_config.use_te_fp8: false")
    out: StateDict = {}
    for key, value in unet.items():
        for pattern, repl in _UNET_RENAMES:
            new, n = pattern.subn(repl, key, count=1)
            if n:
                key = new
                break
        if key in out:
            raise CheckpointError(f"{source}: the UNet holds {key!r} in both NeMo's and CompVis' naming")
        out[key] = value
    return out


def vae_to_compvis(vae: Mapping[str, Tensor]) -> StateDict:
    """NeMo ``AutoencoderKL`` keys are CompVis'; its loader also accepts the mid-block attention
    as linear ``[C, C]`` weights (diffusers' shape), which become the 1x1 convolutions here."""
    return {k: v[:, :, None, None] if _VAE_CONV_ATTN.match(k) and v.ndim == 2 else v for k, v in vae.items()}


_MEGATRON_LAYER = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
                   "self_attention.dense": "attn.out_proj", "mlp.dense_h_to_4h": "mlp.c_fc",
                   "mlp.dense_4h_to_h": "mlp.c_proj"}


def megatron_qkv_to_in_proj(t: Tensor, *, heads: int, megatron_legacy: bool) -> Tensor:
    """Megatron's fused ``query_key_value`` weight or bias -> torch ``in_proj`` order (q | k | v).

    Megatron's ``ParallelAttention`` views the projection as ``[heads, 3, head_dim]`` (q, k, v of
    one head together); with ``megatron_legacy`` it stores ``[3, heads, head_dim]`` and transposes
    at run time (``_transpose_last_dim(mixed_x_layer, 3, True)``), which is already torch's order.
    """
    if megatron_legacy:
        return t
    if t.shape[0] % (3 * heads):
        raise CheckpointError(f"query_key_value has {t.shape[0]} rows, not a multiple of 3 x {heads} heads")
    head_dim = t.shape[0] // (3 * heads)
    return t.reshape(heads, 3, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def megatron_clip_to_open_clip(sd: Mapping[str, Tensor], *, heads: int,
                               megatron_legacy: bool) -> tuple[StateDict, list[str]]:
    """Megatron CLIP text keys (``language_model.*`` of ``CLIPTextTransformer``) -> open_clip
    ``TextTransformer`` keys. Returns the converted dict and the keys not understood."""
    out: StateDict = {}
    unknown: list[str] = []
    for key, value in sd.items():
        k = key.removeprefix("language_model.")
        if k == "embedding.word_embeddings.weight":
            out["token_embedding.weight"] = value
        elif k in ("embedding.position_embeddings", "embedding.position_embeddings.weight"):
            out["positional_embedding"] = value  # learned_parameters / learned_absolute
        elif k.startswith("encoder.final_layernorm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = value
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            name, param = rest.rsplit(".", 1)
            if name == "self_attention.query_key_value":
                out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = megatron_qkv_to_in_proj(
                    value, heads=heads, megatron_legacy=megatron_legacy)
            elif name in _MEGATRON_LAYER:
                out[f"transformer.resblocks.{i}.{_MEGATRON_LAYER[name]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    return out, unknown
