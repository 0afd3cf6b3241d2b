"""Tiny reference components (transformers T5, a sentencepiece model trained in memory,
diffusers IF UNets) with random weights: nothing is downloaded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

SENTENCES = ["a red circle on a blue background", "a green square on a white background",
             "a yellow triangle on a black background", "two small purple stars"] * 10


def write_spiece(folder: Path) -> Path:
    """Train a tiny T5-convention sentencepiece model (pad 0, eos 1, unk 2) into ``folder``."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf, model_type="unigram",
                                   vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return folder


def tiny_t5(d_model: int = 32):
    """A random 2-layer T5 v1.1-style encoder (gated-gelu)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=160, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5EncoderModel(config).eval()


@pytest.fixture(scope="session")
def t5_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(text_encoder_dir, tokenizer_dir)`` saved by transformers / trained by sentencepiece."""
    root = tmp_path_factory.mktemp("t5")
    tiny_t5().save_pretrained(root / "text_encoder")
    write_spiece(root / "tokenizer")
    return root / "text_encoder", root / "tokenizer"
