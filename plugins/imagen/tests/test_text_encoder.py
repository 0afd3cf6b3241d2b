"""T5 text encoder: transformers' T5EncoderModel and T5Tokenizer on the same files are the truth."""

from __future__ import annotations

import pytest
import torch

from t2i_engine.errors import CheckpointError
from t2i_engine.interfaces import TextEncoder, missing_members
from t2i_plugin_imagen.text_encoder import T5TextEncoder


def _reference(folders, prompts, max_length):
    from transformers import T5EncoderModel, T5Tokenizer

    tok = T5Tokenizer.from_pretrained(str(folders[1]))
    model = T5EncoderModel.from_pretrained(str(folders[0])).eval()
    batch = tok([p.lower().strip() for p in prompts], padding="max_length", max_length=max_length,
                truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state, batch.attention_mask


@pytest.mark.parametrize("max_length", [77, 12])
def test_encode_matches_transformers(t5_folders, max_length):
    enc = T5TextEncoder.from_folders(*t5_folders, max_length=max_length)
    assert missing_members(enc, TextEncoder) == [] and enc.dim == 32 and enc.max_length == max_length
    prompts = ["A Red Circle  ", "two small purple stars on a white background", ""]
    with torch.no_grad():
        emb = enc.encode(prompts)
    ref, ref_mask = _reference(t5_folders, prompts, max_length)
    assert emb.tokens.shape == (3, max_length, 32)
    torch.testing.assert_close(emb.tokens, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(emb.mask, ref_mask.bool())
    assert emb.mask[2].sum() == 1  # "" is just </s>
    assert not (emb.tokens[2, 1:] == 0).all()  # IF keeps T5's values at padding positions


def test_zero_padding(t5_folders):
    enc = T5TextEncoder.from_folders(*t5_folders, max_length=16, zero_padding=True)
    with torch.no_grad():
        emb = enc.encode(["a red circle"])
    ref, mask = _reference(t5_folders, ["a red circle"], 16)
    assert (emb.tokens[0, ~mask[0].bool()] == 0).all()
    torch.testing.assert_close(emb.tokens[0, mask[0].bool()], ref[0, mask[0].bool()], atol=1e-5, rtol=1e-5)


def test_lowercase_option(t5_folders):
    cased = T5TextEncoder.from_folders(*t5_folders, max_length=8, lowercase=False)
    lower = T5TextEncoder.from_folders(*t5_folders, max_length=8)
    assert not torch.equal(cased.tokenize(["A RED"])[0], lower.tokenize(["A RED"])[0])


def test_bad_input(t5_folders, tmp_path):
    enc = T5TextEncoder.from_folders(*t5_folders)
    with pytest.raises(TypeError, match="list of str"):
        enc.encode("a red circle")
    with pytest.raises(CheckpointError, match="does not exist"):
        T5TextEncoder.from_folders(tmp_path / "nope", t5_folders[1])
    with pytest.raises(ValueError, match="max_length"):
        T5TextEncoder(enc.model, enc.tokenizer, max_length=0)
