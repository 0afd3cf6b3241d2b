"""How Stable Diffusion's LoRA targets are spelled in LoRA files (the plugin half of LoRA).

The core (:mod:`t2i_engine.adapters`) finds the targets by our module names; this module says,
for each one, every name files use for it:

==============  ==========================================================================
UNet module     ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` (ours = diffusers')
kohya           ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``
                (SD 1.x files use diffusers paths) and ``lora_unet_input_blocks_1_1_...``
                (the CompVis/LDM path, as kohya writes SDXL and some converters write SD 1)
diffusers/PEFT  ``unet.<module>``; also ``<module>`` and ``base_model.model.<module>``
legacy          ``<attention>.processor.to_q`` / ``to_k`` / ``to_v`` / ``to_out`` (with ``_lora``
                suffixes: diffusers' attention-processor LoRA, ``unet.save_attn_procs``)
NeMo            ``model.model.diffusion_model.<LDM path>`` (and ``._orig_mod.`` when compiled)
text module     open_clip ``transformer.resblocks.N.attn.in_proj.q`` (a slice of the fused
                in_proj), ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``
kohya           ``lora_te_text_model_encoder_layers_N_self_attn_q_proj`` (Hugging Face CLIP names)
diffusers/PEFT  ``text_encoder.text_model.encoder.layers.N.self_attn.q_proj``; also without
                ``text_model.`` (transformers 5 builds CLIPTextModel without that level)
==============  ==========================================================================
"""

from __future__ import annotations

import torch

from t2i_engine.adapters import KeyMap, TargetNames, find_targets
from t2i_plugin_sd.keymaps import _HF_LAYER, convert, unet_table

__all__ = ["lora_key_map"]

_TEXT_TO_HF = {ours: hf for hf, ours in _HF_LAYER.items()} | {
    f"attn.in_proj.{p}": f"self_attn.{p}_proj" for p in "qkv"}
"""open_clip layer names -> Hugging Face CLIP names (inside ``resblocks.N``/``layers.N``)."""

_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
_NEMO = ("model.model.diffusion_model.", "model.model.diffusion_model._orig_mod.", "model.diffusion_model.")


def lora_key_map(model: torch.nn.Module) -> KeyMap:
    """The spellings of every LoRA target of a :class:`~t2i_plugin_sd.model.StableDiffusion`
    (UNet and text tower; keyed by target name from the model's root)."""
    arch = model.arch  # type: ignore[attr-defined]
    table = unet_table(arch.unet)
    targets: dict[str, TargetNames] = {}
    for name in find_targets(model.unet):  # type: ignore[arg-type]
        targets[f"unet.{name}"] = _unet_names(name, table)
    for name in find_targets(model.text_encoder.model):  # type: ignore[union-attr, arg-type]
        spelled = _text_names(name)
        if spelled is not None:
            targets[f"text_encoder.model.{name}"] = spelled
    v2 = arch.text.activation == "gelu"  # OpenCLIP ViT-H (SD 2) against OpenAI CLIP ViT-L (SD 1)
    return KeyMap(targets, base_model_version="sd_v2" if v2 else "sd_v1", v2=v2)


def _unet_names(name: str, table: list) -> TargetNames:
    renamed, _ = convert({f"{name}.weight": torch.empty(0)}, table, forward=True)
    ldm = next(iter(renamed)).removesuffix(".weight") if renamed else None
    aliases = [name, f"base_model.model.{name}"]
    parent, _, leaf = name.rpartition(".attn")
    attn, _, proj = leaf.partition(".")
    if parent and proj in _PROCESSOR:  # ...attn1.to_q -> ...attn1.processor.to_q (legacy processors)
        processor = f"{parent}.attn{attn}.processor.{_PROCESSOR[proj]}"
        aliases += [processor, f"unet.{processor}"]
    if ldm is not None:
        aliases += ["lora_unet_" + ldm.replace(".", "_"), *(p + ldm for p in _NEMO)]
    return TargetNames(kohya="lora_unet_" + name.replace(".", "_"), peft=f"unet.{name}", aliases=tuple(aliases))


def _text_names(name: str) -> TargetNames | None:
    head, _, rest = name.partition(".resblocks.")
    index, _, layer = rest.partition(".")
    if head != "transformer" or layer not in _TEXT_TO_HF:
        return None
    hf = f"encoder.layers.{index}.{_TEXT_TO_HF[layer]}"
    return TargetNames(kohya="lora_te_text_model_" + hf.replace(".", "_"), peft=f"text_encoder.text_model.{hf}",
                       aliases=(f"text_encoder.{hf}", f"text_model.{hf}", f"base_model.model.text_model.{hf}"))
