"""A T5-architecture text encoder with a word-level vocabulary, built from keys, no download.

For models trained from scratch on a closed caption language (the embedded shapes demo): the
tokenizer is a ``transformers.T5Tokenizer`` whose pieces are whole words (``"▁red"``), in T5's
conventions (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended), so the same
:class:`~t2i_plugin_imagen.text_encoder.T5TextEncoder` reads it as it reads a user's
``spiece.model``. The architecture (``T5Config`` keys) and the word list are stored in the
safetensors metadata of the stage file, so the file alone rebuilds the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from t2i_engine.config.fields import option
from t2i_plugin_imagen.text_encoder import T5TextEncoder

SPECIALS = ("<pad>", "</s>", "<unk>")


def _words(_inst: Any, attr: attrs.Attribute, value: list[str]) -> None:
    bad = [w for w in value if not w or any(c.isspace() for c in w) or w != w.lower()]
    if not value or bad or len(set(value)) != len(value):
        raise ValueError(f"'{attr.name}' must be distinct lower-case words without spaces, got {bad or value}")


@attrs.frozen(kw_only=True)
class WordT5Config:
    """``[model.text]``: a word-level T5 encoder trained with the model (or frozen random)."""

    words: list[str] = option(validator=_words, help="the vocabulary (any other word is <unk>)")
    d_model: int = option(default=64, help="T5 width (the UNet's text_embed_dim)")
    d_kv: int = option(default=16, help="width per attention head")
    d_ff: int = option(default=128, help="feed-forward width")
    num_layers: int = option(default=2, help="encoder layers")
    num_heads: int = option(default=4, help="attention heads")
    feed_forward_proj: str = option(default="gated-gelu", help="'gated-gelu' (T5 v1.1) or 'relu' (T5)")
    token_length: int = option(default=16, help="tokens per prompt, </s> included")
    zero_padding: bool = option(default=True, help="zero the states at padding positions (NeMo)")

    def t5_config(self) -> dict[str, Any]:
        """The ``transformers.T5Config`` keys of the encoder."""
        return dict(vocab_size=len(SPECIALS) + len(self.words), d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
                    num_layers=self.num_layers, num_heads=self.num_heads, feed_forward_proj=self.feed_forward_proj,
                    dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def word_tokenizer(words: Sequence[str]) -> Any:
    """A ``T5Tokenizer`` whose pieces are ``words`` (ids 3, 4, ... in order)."""
    from transformers import T5Tokenizer

    vocab = [(s, 0.0) for s in SPECIALS] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_word_t5(config: WordT5Config, *, seed: int = 0) -> T5TextEncoder:
    """A random T5 encoder (seeded) with the word tokenizer; lower-cased prompts."""
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(**config.t5_config()))
    return T5TextEncoder(model, word_tokenizer(config.words), max_length=config.token_length,
                         zero_padding=config.zero_padding, lowercase=True, zero_empty=True)
