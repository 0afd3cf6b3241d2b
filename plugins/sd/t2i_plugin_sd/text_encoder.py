"""CLIP text encoders built with open_clip (Radford et al. 2021; Cherti et al. 2023).

SD 1.x reads the last layer of OpenAI's CLIP ViT-L/14 text tower (QuickGELU); SD 2.x reads the
penultimate layer of OpenCLIP ViT-H/14 (GELU). Both are open_clip ``TextTransformer`` modules
built with no pretrained download; weights come from the checkpoint. Tokens come from the CLIP
BPE tokenizer open_clip ships, padded with the id the checkpoint's own tokenizer uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property, partial
from typing import Any, Literal

import attrs
import torch
from torch import Tensor, nn

from t2i_engine.interfaces import TextEmbedding
from t2i_engine.nn.checkpointing import checkpoint_call, wants_checkpoint
from t2i_engine.pipeline import check_prompts

def _mlp_ratio(mlp_width: int, width: int) -> float:
    """The ``mlp_ratio`` for which open_clip's ``int(width * mlp_ratio)`` is exactly ``mlp_width``."""
    ratio = mlp_width / width
    return ratio if int(width * ratio) == mlp_width else (mlp_width + 0.5) / width


EOT_ID = 49407
"""``<|endoftext|>`` in the CLIP BPE vocabulary (SD 1.x pads with it)."""


@attrs.frozen
class TextEncoderConfig:
    """Architecture and read-out of a CLIP text tower."""

    width: int = 768  # hidden size (the UNet's context_dim)
    layers: int = 12  # transformer layers held in the weights
    heads: int = 12  # attention heads
    mlp_width: int | None = None  # hidden width of each MLP (None: 4 x width, as every CLIP release)
    layer_norm_eps: float = 1e-5  # eps of every LayerNorm
    vocab_size: int = 49408
    context_length: int = 77  # tokens per prompt (padded or truncated)
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"  # OpenAI CLIP uses QuickGELU
    skip_last_layers: int = 0  # 1 reads the penultimate layer (SD 2), then the final LayerNorm
    pad: Literal["eos", "zero"] = "eos"  # padding id: <|endoftext|> (SD 1) or 0 "!" (SD 2)
    pad_to_multiple: int = 1  # zero token embeddings appended up to a multiple (NeMo: 8, 77 -> 80)


class CLIPTextEncoder(nn.Module):
    """A CLIP text tower; fulfils :class:`t2i_engine.interfaces.TextEncoder`.

    ``model`` is an ``open_clip.transformer.TextTransformer``; its state-dict keys are open_clip's.
    """

    gradient_checkpointing = False  # recompute each layer in backward (t2i_engine.nn.checkpointing)

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

        self.config = config
        self.max_length = config.context_length
        self.dim = config.width

        act = QuickGELU if config.activation == "quick_gelu" else nn.GELU
        mlp_width = config.mlp_width or 4 * config.width
        self.model = TextTransformer(context_length=config.context_length, vocab_size=config.vocab_size,
                                     width=config.width, heads=config.heads, layers=config.layers,
                                     mlp_ratio=_mlp_ratio(mlp_width, config.width), output_dim=None, act_layer=act,
                                     norm_layer=partial(LayerNorm, eps=config.layer_norm_eps))
        for block in self.model.transformer.resblocks:  # forward() runs them sequence-first
            block.attn.batch_first = False

    @cached_property
    def _tokenizer(self) -> Any:
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=self.config.context_length)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> token ids ``(B, context_length)`` padded as the checkpoint expects."""
        ids = self._tokenizer(check_prompts(prompts))  # (B, L), zero padded after <|endoftext|>
        if self.config.pad == "eos":
            after_eot = (ids == EOT_ID).int().cumsum(dim=1) > 0
            ids = torch.where(after_eot & (ids == 0), torch.full_like(ids, EOT_ID), ids)
        return ids

    def word_token_ids(self, word: str) -> list[int]:
        """The BPE ids of ``word`` alone (no start/end token): where token embeddings go
        (:class:`t2i_engine.adapters.EmbeddingHost`)."""
        return list(self._tokenizer.encode(word))

    def token_embedding_layer(self) -> nn.Embedding:
        """The token embedding layer (:class:`t2i_engine.adapters.EmbeddingHost`)."""
        return self.model.token_embedding

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids ``(B, L)`` -> hidden states ``(B, L, width)`` of the configured layer."""
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding[: ids.shape[1]]  # (B, L, D)
        mask = m.attn_mask[: ids.shape[1], : ids.shape[1]].to(x.dtype)  # causal, additive
        blocks = m.transformer.resblocks
        # sequence-first and contiguous through the blocks: a batch-first nn.MultiheadAttention
        # transposes its input and feeds that view to its projections, and a bf16 linear on such a
        # view takes a path 270x slower than on contiguous rows (measured on a Xeon with AMX)
        x = x.transpose(0, 1).contiguous()  # (L, B, D)
        for block in blocks[: len(blocks) - self.config.skip_last_layers]:
            x = checkpoint_call(self, block, x, attn_mask=mask) if wants_checkpoint(self) else block(x, attn_mask=mask)
        return m.ln_final(x.transpose(0, 1))  # (B, L, D)

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Encode prompts; ``[""]`` gives the unconditional embedding guidance and dropout use."""
        device = self.model.token_embedding.weight.device
        ids = self.tokenize(prompts).to(device)
        tokens = self(ids)
        eot = (ids == EOT_ID).int().argmax(dim=1)  # first <|endoftext|>
        pooled = tokens[torch.arange(ids.shape[0], device=device), eot]
        extra = -tokens.shape[1] % self.config.pad_to_multiple
        if extra:  # NeMo's embedders: zero embeddings that cross-attention still attends to
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, extra))  # (B, L + extra, D)
        mask = torch.arange(tokens.shape[1], device=device)[None] <= eot[:, None]
        return TextEmbedding(tokens, mask, pooled)
