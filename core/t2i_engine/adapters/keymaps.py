"""How a model's LoRA targets are spelled in files: a forward map from our names.

A model plugin lists, for each target of its model (named as
:func:`t2i_engine.adapters.attach.find_targets` names it, from the model bundle's root), the
spellings LoRA files use for it: the kohya name (``lora_unet_down_blocks_0_..._to_q``), the
diffusers/PEFT name (``unet.down_blocks.0....to_q``) and any aliases (legacy attention-processor
names, NeMo's, other prefixes). Loading inverts this finite table; a file's key is never parsed
back into a module path (kohya's underscores are ambiguous: ``to_out_0`` or ``to.out.0``?).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

__all__ = ["KeyMap", "TargetNames"]


@attrs.frozen
class TargetNames:
    """The spellings of one target in LoRA files (without the ``.lora_down.weight`` etc. suffix)."""

    kohya: str  # kohya-ss / A1111: "lora_unet_..." or "lora_te_..." (exported and read)
    peft: str  # diffusers / PEFT: "unet.<module>" or "text_encoder.<module>" (exported and read)
    aliases: tuple[str, ...] = ()  # other spellings read (legacy diffusers, NeMo, other prefixes)

    def all(self) -> tuple[str, ...]:
        """Every spelling, the exported ones first."""
        return (self.kohya, self.peft, *self.aliases)


@attrs.frozen
class KeyMap:
    """A model's LoRA spellings: what a model plugin provides (``model.lora_key_map()``)."""

    targets: Mapping[str, TargetNames]  # our target name -> its spellings
    base_model_version: str = ""  # kohya's ``ss_base_model_version`` ("sd_v1", "sd_v2", ...)
    v2: bool = False  # kohya's ``ss_v2``

    def lookup(self) -> dict[str, str]:
        """``spelling -> our target name``. Two targets spelled the same way are a ``ValueError``
        naming both (a plugin bug: the file could not say which one it means)."""
        table: dict[str, str] = {}
        for name, spelled in self.targets.items():
            for s in spelled.all():
                other = table.setdefault(s, name)
                if other != name:
                    raise ValueError(f"LoRA key map: {s!r} spells both {other} and {name}")
        return table
