"""Token embeddings (textual inversion, pivotal tuning): learned input vectors that stand in for
a word's tokens at the text encoder's input.

A text encoder takes them when it provides the two methods of :class:`EmbeddingHost`:

* ``word_token_ids(word) -> list[int]``: the ids its tokenizer gives the word alone (no start or
  end token);
* ``token_embedding_layer() -> nn.Embedding``: the layer that maps ids to input vectors.

:class:`TokenEmbeddings` holds ``word -> (n, dim)`` vectors for words of ``n`` tokens. Attached, a
forward hook on the embedding layer puts vector ``k`` at the ``k``-th position of every run of the
word's ``n`` ids in a prompt. That is the rule AUTOMATIC1111's web UI applies (it finds an
embedding's name by its token ids in the prompt), and for a word of one token it gives what
diffusers' ``load_textual_inversion`` gives (a new token whose input row is the vector, put where
the word was). The model's own weights and state dict are not touched, except by :meth:`bake`.

Files (the layouts users' tools read):

* inside a LoRA file, kohya/A1111 "bundled" embeddings: ``bundle_emb.<word>.string_to_param.*``,
  ``(n, dim)`` (read by the A1111 web UI, ComfyUI, SD.Next; written by OneTrainer). diffusers'
  ``load_lora_weights`` refuses keys it does not convert, these too;
* a textual-inversion file of its own, diffusers' ``learned_embeds.safetensors`` layout: one key,
  the word, ``(n, dim)`` (diffusers' ``load_textual_inversion`` and the A1111 web UI read it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from t2i_engine.checkpoint.io import save_safetensors
from t2i_engine.errors import CheckpointError

__all__ = ["BUNDLE_PREFIX", "BUNDLE_SUFFIX", "EmbeddingHost", "TokenEmbeddings", "bundle_tensors", "find_host",
           "save_textual_inversion", "split_bundle"]

BUNDLE_PREFIX = "bundle_emb."
BUNDLE_SUFFIX = ".string_to_param.*"
"""``bundle_emb.<word>.string_to_param.*``: an embedding bundled in a kohya LoRA file (SD 1.x/2.x)."""


@runtime_checkable
class EmbeddingHost(Protocol):
    """What a text encoder provides to take token embeddings (see the module docstring)."""

    def word_token_ids(self, word: str) -> list[int]:
        """The token ids of ``word`` alone (no start/end tokens)."""
        ...

    def token_embedding_layer(self) -> nn.Embedding:
        """The layer mapping token ids to the transformer's input vectors."""
        ...


def find_host(root: nn.Module) -> EmbeddingHost:
    """The one module of ``root`` (itself included) that can take token embeddings."""
    hosts = [m for m in root.modules() if isinstance(m, EmbeddingHost)]
    if len(hosts) != 1:
        what = "no text encoder" if not hosts else f"{len(hosts)} text encoders"
        raise ValueError(f"{type(root).__name__} has {what} that can take token embeddings (a text encoder "
                         f"with word_token_ids() and token_embedding_layer()); exactly one is needed")
    return hosts[0]


class TokenEmbeddings(nn.Module):
    """Input vectors for words, ``word -> (n, dim)``; a parameter each (trainable: pivotal tuning).

    Build it unattached, then :meth:`attach` it to a text encoder (an :class:`EmbeddingHost`);
    a word whose token count differs from its vector count is an error there.

    ``lr_scale`` makes an Adam(W) optimizer move the vectors ``lr_scale`` times as fast as its
    learning rate says, without a parameter group of their own: each parameter holds
    ``vector / lr_scale`` and the vector is ``lr_scale * parameter``. Adam's step on a parameter
    does not depend on its gradient's scale, so the vector's step is ``lr_scale`` times the
    parameter's; AdamW's decoupled weight decay shrinks both by the same fraction. (Exact up to
    Adam's ``eps``.)
    """

    def __init__(self, vectors: Mapping[str, Tensor], *, lr_scale: float = 1.0) -> None:
        super().__init__()
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be positive, not {lr_scale}")
        self.words = list(vectors)
        self.lr_scale = float(lr_scale)
        self.params = nn.ParameterList([nn.Parameter(_rows(v) / self.lr_scale) for v in vectors.values()])
        self.enabled = True
        self.__dict__["_host"] = None  # not a submodule: the text encoder is the model's
        self.__dict__["_hook"] = None
        self._ids: list[list[int]] = []

    @property
    def vectors(self) -> list[Tensor]:
        """The ``(n, dim)`` vectors, in the order of :attr:`words` (differentiable)."""
        return [p * self.lr_scale for p in self.params]

    @classmethod
    def from_words(cls, host: EmbeddingHost, words: Sequence[str], *, init: Mapping[str, str] | None = None,
                   lr_scale: float = 1.0) -> TokenEmbeddings:
        """Fresh vectors for ``words``, each starting from the input rows of its own tokens (or of
        the tokens of ``init[word]``, which must be as many): training then starts from the model.
        ``lr_scale``: see the class docstring."""
        weight = host.token_embedding_layer().weight
        vectors = {}
        for word in words:
            ids = host.word_token_ids(word)
            source = (init or {}).get(word)
            if source is not None:
                start = host.word_token_ids(source)
                if len(start) != len(ids):
                    raise ValueError(f"embedding of {word!r} ({len(ids)} tokens) cannot start from {source!r} "
                                     f"({len(start)} tokens)")
                ids = start
            vectors[word] = weight.detach()[torch.tensor(ids, device=weight.device)].float().clone()
        return cls(vectors, lr_scale=lr_scale)

    def items(self) -> list[tuple[str, Tensor]]:
        """``(word, (n, dim) vectors)`` pairs."""
        return list(zip(self.words, self.vectors))

    @property
    def attached(self) -> bool:
        """True while hooked into a text encoder."""
        return self._host is not None

    def attach(self, host: EmbeddingHost) -> TokenEmbeddings:
        """Hook the vectors into ``host``'s embedding layer; returns ``self``."""
        if self._host is not None:
            raise RuntimeError("token embeddings already attached")
        layer = host.token_embedding_layer()
        ids = []
        for word, vec in self.items():
            token_ids = host.word_token_ids(word)
            if len(token_ids) != vec.shape[0]:
                raise ValueError(f"embedding {word!r} has {vec.shape[0]} vector(s) but the tokenizer makes "
                                 f"{len(token_ids)} token(s) of the word; it must be as many")
            if vec.shape[1] != layer.embedding_dim:
                raise ValueError(f"embedding {word!r} is {vec.shape[1]} wide; the text encoder's token embeddings "
                                 f"are {layer.embedding_dim}")
            if token_ids in ids:
                raise ValueError(f"embedding {word!r} has the same tokens as {self.words[ids.index(token_ids)]!r}")
            ids.append(token_ids)
        self._ids = ids
        self.__dict__["_host"] = host
        self.__dict__["_hook"] = layer.register_forward_hook(self._hook_fn)
        return self

    def detach(self) -> None:
        """Unhook from the text encoder."""
        if self._hook is not None:
            self._hook.remove()
        self.__dict__["_host"] = None
        self.__dict__["_hook"] = None

    @torch.no_grad()
    def bake(self) -> None:
        """Write the vectors into the token rows of the embedding layer for good, and detach.
        Only words of one token can be baked (a row of several-token word's ids is shared)."""
        self.check_bakeable()
        weight = self._host.token_embedding_layer().weight  # type: ignore[union-attr]
        for (token,), vec in zip(self._ids, self.vectors):  # as merge, whatever `enabled` says
            weight[token] = vec[0].to(weight.dtype)
        self.detach()

    def check_bakeable(self) -> None:
        """Raise what :meth:`bake` would (not attached, a word of several tokens), changing nothing."""
        if self._host is None:
            raise RuntimeError("token embeddings are not attached")
        multi = [w for w, ids in zip(self.words, self._ids) if len(ids) != 1]
        if multi:
            raise ValueError(f"cannot bake the embedding of {multi[0]!r} into the weights: it spans "
                             f"{len(self._ids[self.words.index(multi[0])])} tokens, whose rows other words share")

    def _hook_fn(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        if not self.enabled:
            return output
        ids = args[0]
        for token_ids, vec in zip(self._ids, self.vectors):
            if vec.device != output.device:
                raise RuntimeError(f"token embeddings are on {vec.device} but the text encoder runs on "
                                   f"{output.device}; move them with the model")
            slot = _slots(ids, token_ids)  # (B, L): which vector, -1 for none
            picked = vec.to(output.dtype)[slot.clamp(min=0)]  # no host sync: where() keeps the rest
            output = torch.where((slot >= 0).unsqueeze(-1), picked, output)
        return output


def _rows(vectors: Tensor) -> Tensor:
    """A detached copy of ``vectors`` as ``(n, dim)`` rows, leading dimensions flattened (a file's
    ``(dim,)`` vector is one row); the one place token vectors are reshaped."""
    v = torch.as_tensor(vectors).detach().clone()
    return v.reshape(-1, v.shape[-1])


def _slots(ids: Tensor, pattern: Sequence[int]) -> Tensor:
    """For ids ``(B, L)``: ``k`` at the ``k``-th position of each run of ``pattern``, else -1."""
    n = len(pattern)
    slot = torch.full_like(ids, -1)
    length = ids.shape[-1]
    if length < n:
        return slot
    start = torch.ones_like(ids[..., : length - n + 1], dtype=torch.bool)
    for k, token in enumerate(pattern):
        start &= ids[..., k: length - n + 1 + k] == token
    for k in range(n):
        view = slot[..., k: length - n + 1 + k]
        view.masked_fill_(start, k)
    return slot


# --- files ----------------------------------------------------------------------------------------


def split_bundle(tensors: Mapping[str, Tensor], *, source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(LoRA tensors, {word: vectors})``: the bundled embeddings of a LoRA file taken out, as
    stored (:class:`TokenEmbeddings` makes them ``(n, dim)``). A ``bundle_emb.`` key of another
    layout (SDXL's ``.clip_l``/``.clip_g``) is an error naming it."""
    rest: dict[str, Tensor] = {}
    found: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            rest[key] = t
            continue
        if not key.endswith(BUNDLE_SUFFIX) or len(key) <= len(BUNDLE_PREFIX) + len(BUNDLE_SUFFIX):
            raise CheckpointError(f"{source}: bundled embedding {key} is not in the SD 1.x/2.x layout "
                                  f"(bundle_emb.<word>{BUNDLE_SUFFIX}); other layouts are not supported")
        word = key[len(BUNDLE_PREFIX): -len(BUNDLE_SUFFIX)]
        found[word] = t
    return rest, found


def bundle_tensors(embeddings: TokenEmbeddings) -> dict[str, Tensor]:
    """The kohya/A1111 bundle keys of ``embeddings`` (for a kohya LoRA file)."""
    return {f"{BUNDLE_PREFIX}{word}{BUNDLE_SUFFIX}": vec for word, vec in embeddings.items()}


def save_textual_inversion(embeddings: TokenEmbeddings, url: str, *, dtype: torch.dtype | None = None) -> str:
    """Write a textual-inversion file in diffusers' ``learned_embeds.safetensors`` layout (one key,
    the word; diffusers' ``load_textual_inversion`` and the A1111 web UI read it). One word per
    file, as both require. Returns ``url``."""
    if len(embeddings.words) != 1:
        raise ValueError(f"a textual-inversion file holds one embedding; these are {len(embeddings.words)}")
    word, vec = embeddings.items()[0]
    save_safetensors({word: vec}, url, metadata={"format": "pt"}, dtype=dtype)
    return url
