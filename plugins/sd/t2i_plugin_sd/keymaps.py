"""Key maps between our parameter layout and the layouts checkpoints use.

Ours: UNet and autoencoder in the diffusers layout, text tower in open_clip's. The maps below
rename to and from the CompVis/A1111 single-file layout (``model.diffusion_model.*``,
``first_stage_model.*``) and Hugging Face ``CLIPTextModel`` (``text_model.*``). Every map is a
bijection on the keys it knows, so a round trip gives identical tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from t2i_engine.nn import UNetConfig

StateDict = dict[str, Tensor]

_UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_CONV_ATTN = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")

Table = list[tuple[str, str, dict[str, str] | None]]
"""(our prefix, their prefix, inner renames or None for identical inner names)."""


def unet_table(cfg: UNetConfig) -> Table:
    """Prefix pairs between our UNet and the CompVis ``openaimodel`` UNet."""
    n, L = len(cfg.channels), cfg.layers_per_block
    t: Table = [("time_embedding.linear_1.", "time_embed.0.", None), ("time_embedding.linear_2.", "time_embed.2.", None),
                ("conv_in.", "input_blocks.0.0.", None), ("conv_norm_out.", "out.0.", None), ("conv_out.", "out.2.", None),
                ("mid_block.resnets.0.", "middle_block.0.", _UNET_RES), ("mid_block.attentions.0.", "middle_block.1.", None),
                ("mid_block.resnets.1.", "middle_block.2.", _UNET_RES)]
    idx = 1
    for i in range(n):
        for j in range(L):
            t.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", _UNET_RES))
            if cfg.attention[i]:
                t.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", None))
            idx += 1
        if i < n - 1:
            t.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.", None))
            idx += 1
    idx = 0
    for u in range(n):
        level = n - 1 - u
        for j in range(L + 1):
            t.append((f"up_blocks.{u}.resnets.{j}.", f"output_blocks.{idx}.0.", _UNET_RES))
            if cfg.attention[level]:
                t.append((f"up_blocks.{u}.attentions.{j}.", f"output_blocks.{idx}.1.", None))
            if j == L and u < n - 1:
                t.append((f"up_blocks.{u}.upsamplers.0.conv.", f"output_blocks.{idx}.{2 if cfg.attention[level] else 1}.conv.", None))
            idx += 1
    return t


def vae_table(levels: int, layers_per_block: int) -> Table:
    """Prefix pairs between our autoencoder and the CompVis ``AutoencoderKL``."""
    t: Table = []
    for side in ("encoder", "decoder"):
        t += [(f"{side}.conv_in.", f"{side}.conv_in.", None), (f"{side}.conv_out.", f"{side}.conv_out.", None),
              (f"{side}.conv_norm_out.", f"{side}.norm_out.", None),
              (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", _VAE_RES),
              (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTN),
              (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", _VAE_RES)]
    for i in range(levels):
        for j in range(layers_per_block):
            t.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RES))
        if i < levels - 1:
            t.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", None))
        for j in range(layers_per_block + 1):
            t.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}.", _VAE_RES))
        if i < levels - 1:
            t.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{levels - 1 - i}.upsample.conv.", None))
    t += [("quant_conv.", "quant_conv.", None), ("post_quant_conv.", "post_quant_conv.", None)]
    return t


def _rename(key: str, table: Table, *, forward: bool) -> str | None:
    for ours, theirs, inner in table:
        src, dst = (ours, theirs) if forward else (theirs, ours)
        if key.startswith(src):
            rest = key[len(src):]
            if inner:
                pairs = inner.items() if forward else ((b, a) for a, b in inner.items())
                for a, b in pairs:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
            return dst + rest
    return None


def convert(sd: Mapping[str, Tensor], table: Table, *, forward: bool) -> tuple[StateDict, list[str]]:
    """Rename ``sd`` through ``table`` (``forward``: ours -> theirs). Returns the renamed dict and
    the keys no entry matched. 1x1-convolution attention weights (CompVis VAE) are reshaped to
    and from linear weights."""
    out: StateDict = {}
    unknown: list[str] = []
    for key, value in sd.items():
        new = _rename(key, table, forward=forward)
        if new is None:
            unknown.append(key)
            continue
        theirs = new if forward else key
        if _CONV_ATTN.search(theirs):  # CompVis VAE attention uses 1x1 convolutions
            value = value[:, :, None, None] if forward else value[:, :, 0, 0]
        out[new] = value
    return out, unknown


# --- Hugging Face CLIPTextModel <-> open_clip TextTransformer -------------------------------

_HF_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


def hf_clip_to_open_clip(sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str]]:
    """``CLIPTextModel`` keys (``text_model.*``) -> open_clip ``TextTransformer`` keys.

    q/k/v projections are concatenated into ``in_proj``; ``position_ids`` buffers are dropped.
    Returns the converted dict and the keys that were not understood.
    """
    out: StateDict = {}
    unknown: list[str] = []
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif k == "embeddings.position_ids":
            continue
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".")[-1]] = value
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            name, param = rest.rsplit(".", 1)
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"transformer.resblocks.{i}.attn.in_proj_{param}", {})[name[10]] = value
            elif name in _HF_LAYER:
                out[f"transformer.resblocks.{i}.{_HF_LAYER[name]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(key)
            continue
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out, unknown


def open_clip_to_hf_clip(sd: Mapping[str, Tensor]) -> StateDict:
    """open_clip ``TextTransformer`` keys -> ``CLIPTextModel`` keys (the inverse of the above;
    open_clip-only tensors such as ``text_projection`` are left out)."""
    inv = {v: k for k, v in _HF_LAYER.items()}
    out: StateDict = {}
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".")[-1]] = value
        elif key.startswith("transformer.resblocks."):
            _, _, i, rest = key.split(".", 3)
            name, param = rest.rsplit(".", 1)
            if name == "attn" and param.startswith("in_proj_"):
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"text_model.encoder.layers.{i}.self_attn.{part}_proj.{param[8:]}"] = chunk.clone()
            else:
                out[f"text_model.encoder.layers.{i}.{inv[name]}.{param}"] = value
    return out
