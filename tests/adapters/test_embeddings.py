"""Token embeddings (t2i_engine.adapters.embeddings) on a toy text encoder: where the vectors go
(one- and several-token words, against a hand-built expectation), bake == hooked, the kohya
bundle round trip through save_kohya / load_lora, and the errors.

The parity with diffusers' ``load_textual_inversion`` on a real CLIP tower is
plugins/sd/tests/test_lora.py::test_bundled_token_embedding_matches_diffusers_textual_inversion.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from t2i_engine.adapters import Adapter, KeyMap, TargetNames, TokenEmbeddings, attach, load_lora, save_kohya
from t2i_engine.adapters.embeddings import EmbeddingHost, split_bundle
from t2i_engine.errors import CheckpointError

WORDS = {"a": [1], "red": [2], "sks": [7], "two": [3, 4], "blue": [5]}


class ToyText(nn.Module):
    """A word-level 'tokenizer' over WORDS and an embedding layer followed by a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 6)

    def word_token_ids(self, word: str) -> list[int]:
        return list(WORDS[word])

    def token_embedding_layer(self) -> nn.Embedding:
        return self.emb

    def ids(self, prompt: str) -> torch.Tensor:
        return torch.tensor([[0] + [i for w in prompt.split() for i in WORDS[w]] + [9]])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(ids))


class Bundle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text = ToyText()


KEYMAP = KeyMap({"text.proj": TargetNames("lora_te_proj", "text_encoder.proj")})


def test_toy_is_a_host():
    assert isinstance(ToyText(), EmbeddingHost)


def test_vectors_replace_every_run_of_the_words_tokens():
    text = ToyText()
    one, two = torch.randn(1, 6), torch.randn(2, 6)
    emb = TokenEmbeddings({"sks": one, "two": two}).attach(text)
    ids = text.ids("a sks red two sks blue two")  # [0, 1, 7, 2, 3, 4, 7, 5, 3, 4, 9]
    plain = text.emb.weight[ids[0]].detach().clone()
    want = plain.clone()
    for pos in (2, 6):
        want[pos] = one[0]
    for pos in (4, 8):
        want[pos:pos + 2] = two
    assert torch.equal(text.emb(ids)[0], want)
    emb.enabled = False
    assert torch.equal(text.emb(ids)[0], plain)
    emb.enabled = True
    emb.detach()
    assert torch.equal(text.emb(ids)[0], plain)


def test_a_lone_token_of_a_multi_token_word_is_untouched():
    text = ToyText()
    TokenEmbeddings({"two": torch.randn(2, 6)}).attach(text)
    lone = torch.tensor([[0, 3, 9, 4, 2]])
    assert torch.equal(text.emb(lone), text.emb.weight[lone].detach())


def test_gradients_reach_the_vectors_not_the_replaced_row():
    text = ToyText()
    emb = TokenEmbeddings({"sks": torch.zeros(1, 6)}).attach(text)
    text(text.ids("a sks")).sum().backward()
    assert emb.params[0].grad is not None and emb.params[0].grad.abs().sum() > 0
    (sks,) = WORDS["sks"]
    assert torch.equal(text.emb.weight.grad[sks], torch.zeros(6))  # the row the vector replaces
    assert text.emb.weight.grad[WORDS["a"][0]].abs().sum() > 0  # the other rows still train


def test_from_words_starts_from_the_models_rows_and_bake_equals_hooked():
    text = ToyText()
    emb = TokenEmbeddings.from_words(text, ["sks"], init={"sks": "red"})
    assert torch.equal(emb.vectors[0].detach(), text.emb.weight[[2]].detach())
    with torch.no_grad():
        emb.params[0].add_(1.0)
    emb.attach(text)
    ids = text.ids("a sks red")
    hooked = text(ids).detach()
    emb.bake()
    assert not emb.attached
    assert torch.equal(text(ids), hooked)
    with pytest.raises(ValueError, match="2 tokens"):
        TokenEmbeddings.from_words(text, ["sks"], init={"sks": "two"})


def test_lr_scale_moves_the_vectors_that_much_faster_under_adamw():
    text = ToyText().requires_grad_(False)
    start = torch.randn(1, 6)
    moved = []
    for scale in (1.0, 10.0):
        emb = TokenEmbeddings({"sks": start}, lr_scale=scale).attach(text)
        assert torch.allclose(emb.vectors[0], start)
        opt = torch.optim.AdamW(emb.parameters(), lr=1e-3, weight_decay=0.0, eps=1e-12)
        for _ in range(3):
            opt.zero_grad()
            text(text.ids("a sks red")).sum().backward()  # linear: the same gradient at every step
            opt.step()
        moved.append(emb.vectors[0].detach() - start)
        emb.detach()
    torch.testing.assert_close(moved[1], 10 * moved[0], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="lr_scale"):
        TokenEmbeddings({"sks": start}, lr_scale=0)


def test_bake_refuses_a_multi_token_word():
    text = ToyText()
    emb = TokenEmbeddings({"two": torch.randn(2, 6)}).attach(text)
    with pytest.raises(ValueError, match="cannot bake.*'two'"):
        emb.bake()


def _adapted(words: dict[str, torch.Tensor]) -> tuple[Bundle, Adapter]:
    from t2i_engine.adapters.layers import LoRA

    model = Bundle()
    layer = LoRA(6, 6, 2)
    with torch.no_grad():
        layer.up.weight.normal_()
    return model, attach(model, Adapter({"text.proj": layer}, embeddings=TokenEmbeddings(words)))


def test_a_failed_adapter_bake_changes_nothing():
    model, adapter = _adapted({"two": torch.randn(2, 6)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot bake.*'two'"):
        adapter.bake()
    assert not adapter.merged and adapter.embeddings.attached
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_disabled_adapter_bakes_its_embeddings_as_it_merges_its_layers():
    model, adapter = _adapted({"sks": torch.randn(1, 6)})
    vec = adapter.embeddings.vectors[0].detach().clone()
    adapter.enabled = False
    adapter.bake()
    assert torch.equal(model.text.emb.weight[WORDS["sks"][0]].detach(), vec[0])


def test_the_peft_layout_refuses_embeddings_unless_skipped(tmp_path):
    from safetensors import safe_open

    from t2i_engine.adapters import save_peft

    _, adapter = _adapted({"sks": torch.randn(1, 6)})
    with pytest.raises(ValueError, match="cannot hold token embeddings"):
        save_peft(adapter, str(tmp_path / "a.safetensors"), KEYMAP)
    path = save_peft(adapter, str(tmp_path / "b.safetensors"), KEYMAP, skip_embeddings=True)
    with safe_open(path, "pt") as f:
        assert f.keys() and not any("sks" in k or "emb" in k for k in f.keys())


def test_an_embedding_only_adapter_round_trips_through_save_kohya(tmp_path):
    model = Bundle()
    vec = torch.randn(1, 6)
    adapter = attach(model, Adapter({}, embeddings=TokenEmbeddings({"sks": vec})))
    path = str(tmp_path / "e.safetensors")
    save_kohya(adapter, path, KEYMAP)
    _, report = load_lora(Bundle(), path, KEYMAP)
    assert report.embeddings == ("sks",) and report.targets == 0


def test_create_adapter_attaches_its_embeddings_in_the_one_attach():
    """``create_adapter(embeddings=...)``: the vectors stand at the word's tokens (against the
    embedding row itself) from the start, and the adapter's detach takes them off."""
    from t2i_engine.adapters import create_adapter

    model = Bundle()
    vec = torch.randn(1, 6)
    adapter = create_adapter(model, ["text.proj"], rank=2, embeddings=TokenEmbeddings({"sks": vec}))
    ids = model.text.ids("a sks")
    assert adapter.embeddings.attached and torch.equal(model.text.emb(ids)[0, 2], vec[0])
    adapter.detach()
    assert not adapter.embeddings.attached
    assert torch.equal(model.text.emb(ids)[0, 2], model.text.emb.weight[WORDS["sks"][0]])


@pytest.mark.parametrize("vectors, message", [
    ({"two": torch.randn(1, 6)}, "1 vector.*2 token"),
    ({"sks": torch.randn(1, 5)}, "5 wide"),
])
def test_attach_errors(vectors, message):
    with pytest.raises(ValueError, match=message):
        TokenEmbeddings(vectors).attach(ToyText())


def test_kohya_bundle_round_trip_through_load_lora(tmp_path):
    from t2i_engine.adapters.layers import LoRA

    src = Bundle()
    layer = LoRA(6, 6, 2)
    with torch.no_grad():
        layer.up.weight.normal_()
    adapter = attach(src, Adapter({"text.proj": layer}, embeddings=TokenEmbeddings({"sks": torch.randn(1, 6)})))
    ids = src.text.ids("a sks red")
    want = src.text(ids).detach()
    path = str(tmp_path / "l.safetensors")
    save_kohya(adapter, path, KEYMAP)
    assert set(load_file(path)) == {"lora_te_proj.lora_down.weight", "lora_te_proj.lora_up.weight",
                                    "lora_te_proj.alpha", "bundle_emb.sks.string_to_param.*"}
    dst = Bundle()
    loaded, report = load_lora(dst, path, KEYMAP)
    assert report.embeddings == ("sks",) and report.targets == 1 and "token embeddings sks" in str(report)
    assert torch.allclose(dst.text(ids), want, atol=1e-6)
    loaded.enabled = False  # the adapter's switch covers its embeddings
    assert not loaded.embeddings.enabled
    loaded.enabled = True
    loaded.detach()
    assert not loaded.embeddings.attached


def test_a_file_with_only_an_embedding_loads(tmp_path):
    path = str(tmp_path / "e.safetensors")
    save_file({"bundle_emb.sks.string_to_param.*": torch.randn(1, 6)}, path)
    model = Bundle()
    _, report = load_lora(model, path, KEYMAP)
    assert report.embeddings == ("sks",) and report.targets == 0


def test_a_bundled_vector_of_any_leading_shape_is_read_as_rows(tmp_path):
    """A one-token word's vector stored as ``(dim,)`` or ``(1, 1, dim)`` is one row, which the
    word's token then takes (against the stored numbers)."""
    for shape in ((6,), (1, 1, 6)):
        vec = torch.randn(shape)
        path = str(tmp_path / "e.safetensors")
        save_file({"bundle_emb.sks.string_to_param.*": vec}, path)
        model = Bundle()
        loaded, _ = load_lora(model, path, KEYMAP)
        assert loaded.embeddings.vectors[0].shape == (1, 6)
        assert torch.equal(model.text.emb(model.text.ids("a sks"))[0, 2], vec.reshape(6))


def test_bundle_errors(tmp_path):
    with pytest.raises(CheckpointError, match="bundle_emb.sks.clip_l is not in the SD 1.x/2.x layout"):
        split_bundle({"bundle_emb.sks.clip_l": torch.zeros(1, 6)}, source="f")
    path = str(tmp_path / "e.safetensors")
    save_file({"bundle_emb.sks.string_to_param.*": torch.randn(1, 6)}, path)
    with pytest.raises(CheckpointError, match="carries token embeddings \\(sks\\), but Linear has no text encoder"):
        load_lora(nn.Linear(6, 6), path, KEYMAP)
