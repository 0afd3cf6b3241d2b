"""Which modules a DreamBooth LoRA adapts, and writing it: the core's adapters, named from the
model bundle's own parts so that any model plugin fits.

Patterns are matched relative to the denoiser (``lora_targets``) and to the text encoder
(``lora_text_targets``) with :func:`t2i_engine.adapters.match_targets`'s rule, then turned into
target names from the bundle's root, which is how the model's LoRA key map
(``model.lora_key_map()``) names them for export.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from t2i_engine.adapters import Adapter, KeyMap, TokenEmbeddings, create_adapter, find_targets, match_targets
from t2i_engine.adapters.embeddings import find_host
from t2i_engine.adapters.formats import save_kohya, save_peft
from t2i_engine.errors import ConfigError

__all__ = ["DTYPES", "create_dreambooth_adapter", "key_map_of", "save_lora", "target_names"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def key_map_of(model: Any) -> KeyMap:
    """The model's LoRA key map; a ConfigError when its plugin gives none (nothing could be saved)."""
    fn = getattr(model, "lora_key_map", None)
    if fn is None or not isinstance(model, nn.Module):
        raise ConfigError(f"task.method: 'lora' needs a model whose plugin names its LoRA targets (an nn.Module with "
                          f"lora_key_map()); {type(model).__name__} has none. Use method = \"full\"")
    return fn()


def _path_of(root: nn.Module, part: Any, what: str) -> str:
    for name, module in root.named_modules():
        if module is part and name:
            return name
    raise ConfigError(f"task.method: the model's {what} is not a submodule of {type(root).__name__}; LoRA targets "
                      "cannot be named")


def _under(root: nn.Module, prefix: str, patterns: Sequence[str], key: str) -> list[str]:
    targets = {n[len(prefix) + 1:]: t for n, t in find_targets(root).items() if n.startswith(prefix + ".")}
    try:
        return [f"{prefix}.{n}" for n in match_targets(targets, patterns)]
    except ValueError as e:
        raise ConfigError(f"task.{key}: {e} (names are relative to the {prefix} module)") from e


def target_names(model: nn.Module, keymap: KeyMap, *, unet: Sequence[str], text: Sequence[str] | None,
                 train_text_encoder: bool) -> list[str]:
    """Target names (from the bundle's root) of the denoiser patterns ``unet`` and, with
    ``train_text_encoder``, the text-encoder patterns ``text`` (None: every text-encoder target the
    key map spells). A target the key map cannot spell is a ConfigError (it could not be saved)."""
    names = _under(model, _path_of(model, model.denoiser, "denoiser"), unet, "lora_targets")  # type: ignore[attr-defined]
    if train_text_encoder:
        prefix = _path_of(model, model.text_encoder, "text encoder")  # type: ignore[attr-defined]
        if text is None:
            spelled = sorted(n for n in keymap.targets if n.startswith(prefix + "."))
            if not spelled:
                raise ConfigError("task.train_text_encoder: the model's LoRA key map names no text-encoder module")
            names += spelled
        else:
            names += _under(model, prefix, text, "lora_text_targets")
    unknown = [n for n in names if n not in keymap.targets]
    if unknown:
        raise ConfigError(f"task.lora_targets: the model's LoRA files cannot name {', '.join(unknown[:5])}"
                          f"{' ...' if len(unknown) > 5 else ''}; choose modules its plugin maps")
    return names


def create_dreambooth_adapter(model: nn.Module, names: Sequence[str], *, rank: int, alpha: float | None,
                              dropout: float, token_embedding: str | None = None,
                              token_lr_scale: float = 1.0) -> Adapter:
    """A fresh adapter (update zero) on ``names``, named ``dreambooth``; with ``token_embedding``
    (pivotal tuning) it also holds an input embedding for that word, starting from the word's own
    token rows, on the model's text encoder, trained ``token_lr_scale`` times as fast as the LoRA
    (:class:`t2i_engine.adapters.TokenEmbeddings`' ``lr_scale``)."""
    embeddings = None
    if token_embedding is not None:
        try:
            host = find_host(model)
        except ValueError as e:
            raise ConfigError(f"task.token_embedding: {e}") from e
        embeddings = TokenEmbeddings.from_words(host, [token_embedding], lr_scale=token_lr_scale)
    return create_adapter(model, list(names), rank=rank, alpha=alpha, dropout=dropout, name="dreambooth",
                          embeddings=embeddings)


def save_lora(adapter: Adapter, url: str, keymap: KeyMap, *, format: str, dtype: str,
              metadata: Mapping[str, str]) -> str:
    """Write the adapter: kohya (``lora_unet_*`` with ``ss_*`` metadata, ``metadata`` added) or
    PEFT (diffusers' ``pytorch_lora_weights.safetensors`` layout, which has no place for the token
    embedding: the task writes it on its own). Returns the file written."""
    if format == "kohya":
        save_kohya(adapter, url, keymap, dtype=DTYPES[dtype], metadata=metadata)
        return url
    return save_peft(adapter, url, keymap, dtype=DTYPES[dtype], skip_embeddings=True)
