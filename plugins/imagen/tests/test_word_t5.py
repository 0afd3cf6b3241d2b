"""The word-level T5 encoder of the embedded demo: T5's id conventions, unknown words, and every
``[model.text]`` key has an effect."""

from __future__ import annotations

import attrs
import pytest
import torch

from t2i_plugin_imagen.word_t5 import WordT5Config, build_word_t5, word_tokenizer

WORDS = ["a", "red", "circle", "on", "blue", "background"]


def test_tokenizer_ids_follow_t5():
    tok = word_tokenizer(WORDS)
    out = tok(["a red circle", "a pink circle"], padding="max_length", max_length=6)
    assert out["input_ids"][0] == [3, 4, 5, 1, 0, 0]  # words from 3, </s> = 1 appended, <pad> = 0
    assert out["input_ids"][1][:3] == [3, 2, 5]  # an unknown word is <unk> = 2
    assert out["attention_mask"][0] == [1, 1, 1, 1, 0, 0]


def test_encoder_shapes_and_null_text():
    enc = build_word_t5(WordT5Config(words=WORDS, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, token_length=7))
    emb = enc.encode(["A red circle", ""])
    assert emb.tokens.shape == (2, 7, 16) and emb.mask[0].tolist() == [True] * 4 + [False] * 3
    assert emb.tokens[0, 4:].abs().max() == 0  # zero_padding
    assert emb.tokens[1].abs().max() == 0  # "" is the zero null text
    torch.testing.assert_close(enc.encode(["a red circle"]).tokens, emb.tokens[:1])  # lower-cased


CHANGES = {"d_model": 8, "d_kv": 8, "d_ff": 16, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "relu",
           "token_length": 5, "zero_padding": False, "words": WORDS[::-1]}


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_every_text_key_has_an_effect(key):
    base = WordT5Config(words=WORDS, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, token_length=7)
    a = build_word_t5(base).encode(["a red circle"]).tokens
    b = build_word_t5(attrs.evolve(base, **{key: CHANGES[key]})).encode(["a red circle"]).tokens
    assert a.shape != b.shape or not torch.allclose(a, b)


def test_bad_words_are_refused():
    for words in ([], ["Red"], ["a", "a"], ["two words"]):
        with pytest.raises(ValueError, match="words"):
            WordT5Config(words=words)
