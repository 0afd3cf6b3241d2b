"""Attach LoRA adapters to any ``nn.Module`` by its own module names.

A *target* is one place a LoRA can act, named by the module path of the model it lives in:

* a ``Linear`` or ungrouped ``Conv2d`` called as a layer: the update is added to its output by a
  forward hook (the model's own parameters and state-dict keys stay untouched);
* a slice of a weight another module reads directly: ``nn.MultiheadAttention`` never calls a
  layer for its fused ``in_proj_weight`` (rows q, k, v) nor for ``out_proj`` (it reads
  ``out_proj.weight``), so for an attention module at ``P`` the targets ``P.in_proj.q``,
  ``P.in_proj.k``, ``P.in_proj.v`` and ``P.out_proj`` add ``scale * up @ down`` to those rows of
  the weight for the duration of the attention module's forward. This is the same update as the
  separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` layers of a Hugging Face CLIP tower get.

Several adapters may share a target; each keeps its own multiplier. An adapter can be merged into
the weights (``W += scale * up @ down``) and unmerged (the same update subtracted).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2i_engine.adapters.embeddings import TokenEmbeddings, find_host
from t2i_engine.adapters.layers import ConvShape, LoRA

__all__ = ["Adapter", "Target", "attach", "base_weight", "create_adapter", "find_targets", "match_targets",
           "trainable_parameters"]

_SLOT = "_t2i_lora_slot"


@attrs.frozen
class Target:
    """Where one LoRA acts (see the module docstring)."""

    module: str  # the module whose forward computes the target (the layer, or the attention module)
    in_features: int
    out_features: int
    conv: ConvShape | None = None  # the layer's geometry when it is a convolution
    param: str | None = None  # weight-form targets: the weight under ``module`` that is adapted
    rows: tuple[int, int] | None = None  # weight-form targets: the adapted output rows of ``param``

    @property
    def weight_form(self) -> bool:
        """True where the update is added to a weight rather than to a layer's output."""
        return self.param is not None


def find_targets(root: nn.Module) -> dict[str, Target]:
    """Every place a LoRA can act in ``root``, by name (module paths relative to ``root``)."""
    found: dict[str, Target] = {}
    read_by_attention: set[str] = set()
    for name, m in root.named_modules():
        if name in read_by_attention:
            continue
        if isinstance(m, nn.MultiheadAttention):
            if not m._qkv_same_embed_dim:  # separate q/k/v weights: no fused slices to adapt
                continue
            d = m.embed_dim
            for i, part in enumerate("qkv"):
                found[_join(name, f"in_proj.{part}")] = Target(name, d, d, param="in_proj_weight",
                                                               rows=(i * d, (i + 1) * d))
            found[_join(name, "out_proj")] = Target(name, d, m.out_proj.out_features, param="out_proj.weight")
            read_by_attention.add(_join(name, "out_proj"))
        elif isinstance(m, nn.Linear):
            found[name] = Target(name, m.in_features, m.out_features)
        elif isinstance(m, nn.Conv2d) and m.groups == 1:
            found[name] = Target(name, m.in_channels, m.out_channels, conv=ConvShape.of(m))
    return found


def match_targets(targets: Mapping[str, Target], patterns: Sequence[str]) -> dict[str, Target]:
    """The targets a pattern names: a pattern with ``*`` is a glob over the whole name
    (``"unet.*.to_q"``); one without matches a name equal to it or ending with ``"." + pattern``
    (``"to_q"``, ``"ff.net.2"``, ``"attn.in_proj.q"``). A pattern that matches nothing is a
    ``ValueError`` naming it: a target list that silently adapts nothing is a training run wasted."""
    chosen: dict[str, Target] = {}
    for pattern in patterns:
        hits = {n: t for n, t in targets.items() if _matches(n, pattern)}
        if not hits:
            raise ValueError(f"LoRA target pattern {pattern!r} matches no Linear, Conv2d or attention "
                             f"projection of this model")
        chosen.update(hits)
    return dict(sorted(chosen.items()))


def _matches(name: str, pattern: str) -> bool:
    if "*" in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _key(name: str) -> str:
    return name.replace(".", "/")  # ModuleDict keys cannot hold dots


class Adapter(nn.Module):
    """A named set of LoRA layers over one model's targets (one file, or one training run).

    Build it with :func:`create_adapter` (fresh, for training) or a loader
    (:func:`t2i_engine.adapters.load.load_lora`); both attach it. The model's own
    ``state_dict`` is unchanged by an attached adapter; the adapter's layers live here, on the
    device and in the dtype of the weights they adapt when they were attached (move the model
    first, then attach).
    """

    def __init__(self, layers: Mapping[str, LoRA], *, name: str = "default",
                 embeddings: TokenEmbeddings | None = None) -> None:
        super().__init__()
        self.name = name
        self.layers = nn.ModuleDict({_key(k): v for k, v in layers.items()})
        # token embeddings that come with the LoRA (a kohya file's bundled embeddings, pivotal
        # tuning): attached to the model's text encoder with the layers; the multiplier and
        # merge/unmerge leave them as they are, bake() writes them into the token rows
        self.embeddings = embeddings
        self.targets: dict[str, Target] = {}
        self._enabled = True
        self.merged = False
        given = {layer.multiplier for layer in layers.values()}
        self._multiplier: float | None = given.pop() if len(given) == 1 else None
        self._set_root(None)

    def _set_root(self, root: nn.Module | None) -> None:
        # kept out of nn.Module's registry: the model is not part of the adapter (its parameters,
        # state dict and requires_grad stay the model's own)
        self.__dict__["_root"] = root

    def names(self) -> list[str]:
        """The target names this adapter holds layers for."""
        return [k.replace("/", ".") for k in self.layers]

    def items(self) -> Iterator[tuple[str, LoRA]]:
        """``(target name, LoRA)`` pairs."""
        for k, layer in self.layers.items():
            yield k.replace("/", "."), layer  # type: ignore[misc]

    def __getitem__(self, name: str) -> LoRA:
        return self.layers[_key(name)]  # type: ignore[return-value]

    @property
    def enabled(self) -> bool:
        """False: attached but not applied (a cheap A/B switch; token embeddings too)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        if self.embeddings is not None:
            self.embeddings.enabled = self._enabled

    @property
    def multiplier(self) -> float | None:
        """The strength every layer of this adapter is applied with (1.0: as trained); None
        while its layers hold different ones (as built). Setting it sets every layer's."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float | None) -> None:
        if value is None:
            raise ValueError("an adapter's multiplier must be a number")
        if self.merged:
            raise RuntimeError(f"adapter {self.name!r} is merged; unmerge it before changing its multiplier")
        self._multiplier = float(value)
        for _, layer in self.items():
            layer.multiplier = self._multiplier

    @property
    def active(self) -> bool:
        """Applied by the forward hooks (attached, enabled and not merged)."""
        return self._root is not None and self.enabled and not self.merged

    # --- merge ------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Add every layer's update into the weights it adapts (the hooks then skip it)."""
        self._apply_to_weights(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added; the weights return to theirs (float32: within 1e-6)."""
        self._apply_to_weights(-1.0)
        self.merged = False

    def _apply_to_weights(self, sign: float) -> None:
        root = self._attached_root()
        if self.merged == (sign > 0):
            raise RuntimeError(f"adapter {self.name!r} is {'already' if self.merged else 'not'} merged")
        for name, layer in self.items():
            target = self.targets[name]
            weight = base_weight(root, target)
            if weight.is_mkldnn:
                raise RuntimeError(f"{target.module}: its weight is packed for oneDNN inference; merge adapters "
                                   f"before packing (or leave them unmerged)")
            delta = layer.delta_weight().to(weight.dtype)
            view = weight[target.rows[0]:target.rows[1]] if target.rows else weight
            view.add_(delta, alpha=sign)

    @torch.no_grad()
    def bake(self) -> None:
        """Merge into the weights for good and leave the model: it then holds the adapted
        weights as its own (what training on top of a LoRA starts from)."""
        if self.embeddings is not None:
            self.embeddings.check_bakeable()  # before anything changes: a failed bake leaves the adapter as it was
        if not self.merged:
            self.merge()
        root = self._attached_root()
        for target in self.targets.values():
            _remove(root.get_submodule(target.module), self)
        if self.embeddings is not None:
            self.embeddings.bake()
        self._set_root(None)
        self.merged = False

    # --- attach -----------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove this adapter from its model (unmerging it first if merged)."""
        root = self._attached_root()
        if self.merged:
            self.unmerge()
        for target in self.targets.values():
            _remove(root.get_submodule(target.module), self)
        if self.embeddings is not None:
            self.embeddings.detach()
        self._set_root(None)

    def _attached_root(self) -> nn.Module:
        if self._root is None:
            raise RuntimeError(f"adapter {self.name!r} is not attached to a model")
        return self._root


def attach(root: nn.Module, adapter: Adapter) -> Adapter:
    """Attach ``adapter`` to ``root``: every layer name must be a target of ``root``
    (:func:`find_targets`) with the layer's shape; its token embeddings, if any, go to the one
    text encoder of ``root`` that takes them (:func:`t2i_engine.adapters.embeddings.find_host`).
    Returns ``adapter``."""
    if adapter._root is not None:
        raise RuntimeError(f"adapter {adapter.name!r} is already attached")
    targets = find_targets(root)
    unknown = [n for n in adapter.names() if n not in targets]
    if unknown:
        raise KeyError(f"adapter {adapter.name!r}: no such target in {type(root).__name__}: {', '.join(unknown[:20])}")
    for name, layer in adapter.items():
        t = targets[name]
        if (layer.in_features, layer.out_features) != (t.in_features, t.out_features) or layer.conv != t.conv:
            raise ValueError(f"adapter {adapter.name!r}: layer for {name} is {layer.in_features}->{layer.out_features}"
                             f" (conv {layer.conv}) but the target is {t.in_features}->{t.out_features} (conv {t.conv})")
        if t.weight_form and layer.dropout:
            raise ValueError(f"{name} is a slice of a fused weight: its update is added to the weight, where "
                             f"input dropout has no place; use dropout 0 for it")
        adapter.targets[name] = t
    if adapter.embeddings is not None:
        adapter.embeddings.attach(find_host(root))
    for name, t in adapter.targets.items():
        _install(root.get_submodule(t.module), adapter, adapter[name], t)
    adapter._set_root(root)
    return adapter


def create_adapter(root: nn.Module, targets: Sequence[str], *, rank: int, alpha: float | None = None,
                   dropout: float = 0.0, name: str = "default", dtype: torch.dtype | None = None,
                   embeddings: TokenEmbeddings | None = None) -> Adapter:
    """A fresh, attached adapter (update zero) on the targets of ``root`` matching ``targets``
    (:func:`match_targets`), on each target's device and in its dtype unless ``dtype`` is given.
    ``embeddings`` (unattached token embeddings: pivotal tuning) come with it, attached to the
    text encoder of ``root`` in the same :func:`attach`.

    Fused attention slices take no input dropout (their update is a weight); they get 0.
    """
    layers: dict[str, LoRA] = {}
    for tname, t in match_targets(find_targets(root), targets).items():
        w = base_weight(root, t)
        layers[tname] = LoRA(t.in_features, t.out_features, rank, alpha=alpha, conv=t.conv,
                             dropout=0.0 if t.weight_form else dropout, device=w.device, dtype=dtype or w.dtype)
    return attach(root, Adapter(layers, name=name, embeddings=embeddings))


def trainable_parameters(root: nn.Module, adapters: Sequence[Adapter]) -> list[nn.Parameter]:
    """Freeze every parameter of ``root`` and return the adapters' (made trainable): what the
    optimizer of a LoRA fine-tune gets."""
    root.requires_grad_(False)
    params: list[nn.Parameter] = []
    for adapter in adapters:
        adapter.requires_grad_(True)
        params += list(adapter.parameters())
    return params


# --- hooks --------------------------------------------------------------------------------------


@attrs.define
class _Slot:
    entries: list[tuple[Adapter, LoRA, Target]]
    remove: Callable[[], None]


def base_weight(root: nn.Module, target: Target) -> Tensor:
    """The base weight ``target`` adapts in ``root``: its ``param`` (weight-form targets) or its
    module's ``weight``."""
    module = root.get_submodule(target.module)
    return module.get_parameter(target.param) if target.param else module.weight


def _install(module: nn.Module, adapter: Adapter, layer: LoRA, target: Target) -> None:
    slot: _Slot | None = module.__dict__.get(_SLOT)
    if slot is None:
        if target.weight_form:
            original = module.forward
            module.forward = _weight_form_forward(module, original)  # instance attribute
            slot = _Slot([], lambda: module.__dict__.pop("forward", None))
        else:
            handle = module.register_forward_hook(_output_hook)
            slot = _Slot([], handle.remove)
        module.__dict__[_SLOT] = slot
    slot.entries.append((adapter, layer, target))


def _remove(module: nn.Module, adapter: Adapter) -> None:
    slot: _Slot | None = module.__dict__.get(_SLOT)
    if slot is None:
        return
    slot.entries = [e for e in slot.entries if e[0] is not adapter]
    if not slot.entries:
        slot.remove()
        del module.__dict__[_SLOT]


def _check_device(layer: LoRA, x: Tensor, adapter: Adapter) -> None:
    if layer.up.weight.device != x.device:
        raise RuntimeError(f"adapter {adapter.name!r} is on {layer.up.weight.device} but the model runs on "
                           f"{x.device}; attach adapters after moving the model, or move the adapter too")


def _output_hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    x = args[0]
    for adapter, layer, _ in module.__dict__[_SLOT].entries:
        if not adapter.active:
            continue
        _check_device(layer, x, adapter)
        dtype = layer.up.weight.dtype
        output = output + layer(x.to(dtype), training=module.training).to(output.dtype)
    return output


def _weight_form_forward(module: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        adapted: dict[str, Tensor] = {}
        for adapter, layer, target in module.__dict__[_SLOT].entries:
            if not adapter.active:
                continue
            assert target.param is not None
            base = adapted.get(target.param, module.get_parameter(target.param))
            _check_device(layer, base, adapter)
            delta = layer.delta_weight().to(base.dtype)
            if target.rows:  # place the (rows, in) update in the fused weight's rows
                delta = F.pad(delta, (0, 0, target.rows[0], base.shape[0] - target.rows[1]))
            adapted[target.param] = base + delta
        if not adapted:
            return original(*args, **kwargs)
        with _weights_replaced(module, adapted):
            return original(*args, **kwargs)

    return forward


@contextlib.contextmanager
def _weights_replaced(module: nn.Module, tensors: Mapping[str, Tensor]) -> Iterator[None]:
    """Make ``module``'s forward read ``tensors`` in place of the named parameters.

    An instance attribute shadows the registered parameter for attribute reads (``nn.Module``
    consults ``_parameters`` only when normal lookup fails), so the parameters themselves, their
    order and the state dict are never touched.
    """
    owners = []
    for path, tensor in tensors.items():
        owner_path, _, name = path.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        owner.__dict__[name] = tensor
        owners.append((owner, name))
    try:
        yield
    finally:
        for owner, name in owners:
            owner.__dict__.pop(name, None)
