"""The T5 text encoder of Imagen and DeepFloyd IF (Raffel et al. 2020; Saharia et al. 2022).

A frozen ``transformers.T5EncoderModel`` reads prompts tokenized by the sentencepiece model the
user holds (``spiece.model``). Two read-outs exist in the wild and both are options here:

* DeepFloyd IF (diffusers' ``IFPipeline``): prompts lower-cased and stripped, 77 tokens, the
  attention mask passed to T5, padding positions left as T5 computes them.
* NeMo Imagen / imagen-pytorch: 128 (or 256) tokens, padding positions zeroed.

Nothing is downloaded: :meth:`T5TextEncoder.from_folders` reads local folders only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2i_engine.errors import CheckpointError
from t2i_engine.interfaces import TextEmbedding
from t2i_engine.pipeline import check_prompts


class T5TextEncoder(nn.Module):
    """A T5 encoder and its tokenizer; fulfils :class:`t2i_engine.interfaces.TextEncoder`.

    Args:
        model: a ``transformers.T5EncoderModel``.
        tokenizer: its tokenizer (``transformers.T5Tokenizer`` or any callable with the same API).
        max_length: tokens per prompt, padded or truncated (IF: 77, NeMo: 128).
        zero_padding: multiply the hidden states by the mask, so padding positions are 0 (NeMo,
            imagen-pytorch); IF keeps T5's own values there.
        lowercase: ``prompt.lower().strip()`` before tokenizing (IF's preprocessing without
            ``clean_caption``).
        zero_empty: the prompt ``""`` encodes as all-zero states (NeMo Imagen's null text: caption
            dropout in training and the unconditional branch of guidance both use it).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int = 77, zero_padding: bool = False,
                 lowercase: bool = True, zero_empty: bool = False) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"T5 text encoder: max_length must be >= 1, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.zero_padding = zero_padding
        self.lowercase = lowercase
        self.zero_empty = zero_empty

    @property
    def dim(self) -> int:
        """Width of the hidden states (``d_model``)."""
        return int(self.model.config.d_model)

    @classmethod
    def from_folders(cls, text_encoder_dir: str | Path, tokenizer_dir: str | Path, **options: Any) -> T5TextEncoder:
        """Load a ``T5EncoderModel`` folder (``config.json`` + safetensors, sharded or not) and a
        tokenizer folder holding ``spiece.model`` (or ``tokenizer.json``), from disk only."""
        from transformers import T5EncoderModel, T5Tokenizer

        for what, folder in (("text encoder", text_encoder_dir), ("tokenizer", tokenizer_dir)):
            if not Path(folder).is_dir():
                raise CheckpointError(f"{folder}: the T5 {what} folder does not exist")
        try:
            model = T5EncoderModel.from_pretrained(str(text_encoder_dir), local_files_only=True)
            tokenizer = T5Tokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the T5 text encoder from {text_encoder_dir} / {tokenizer_dir}: {e}") from e
        return cls(model.eval().requires_grad_(False), tokenizer, **options)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, mask)`` ``(B, max_length)``: ids (with ``</s>``) and True at real tokens."""
        texts = [p.lower().strip() if self.lowercase else p for p in check_prompts(prompts)]
        out = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"].bool()

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """T5 hidden states ``(B, max_length, d_model)`` and the token mask for ``prompts``."""
        ids, mask = self.tokenize(prompts)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        if self.zero_padding:
            hidden = hidden * mask[..., None].to(hidden.dtype)
        if self.zero_empty:
            real = torch.tensor([p.strip() != "" for p in prompts], device=device)
            hidden = hidden * real[:, None, None].to(hidden.dtype)
        return TextEmbedding(hidden, mask)
