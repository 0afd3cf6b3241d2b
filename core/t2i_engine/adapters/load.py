"""Load a LoRA file onto a model through the model's forward key map."""

from __future__ import annotations

import warnings

import attrs
import torch
from torch import Tensor, nn

from t2i_engine.adapters.attach import Adapter, Target, attach, base_weight, find_targets
from t2i_engine.adapters.embeddings import TokenEmbeddings, find_host, split_bundle
from t2i_engine.adapters.formats import LoRAFile, PeftSettings, group_keys, read_lora_file
from t2i_engine.adapters.keymaps import KeyMap
from t2i_engine.adapters.layers import LoRA
from t2i_engine.errors import CheckpointError

__all__ = ["LoadReport", "adapter_from_file", "load_lora"]

_SHOWN = 20


@attrs.frozen
class LoadReport:
    """What a load matched: targets adapted, keys used, and the keys that matched nothing."""

    source: str
    targets: int
    keys: int
    unmatched: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()  # words of the bundled token embeddings, attached to the text encoder

    def __str__(self) -> str:
        text = f"{self.source}: {self.keys} keys -> {self.targets} targets"
        if self.embeddings:
            text += f", token embeddings {', '.join(self.embeddings)}"
        return text + (f"; {len(self.unmatched)} keys matched no module" if self.unmatched else "")


def load_lora(root: nn.Module, url: str, keymap: KeyMap, *, multiplier: float = 1.0, partial: bool = False,
              name: str | None = None) -> tuple[Adapter, LoadReport]:
    """Read the LoRA at ``url`` and attach it to ``root`` with ``multiplier``.

    Every key must belong to a target of ``keymap``: otherwise a :class:`CheckpointError` lists
    the keys that matched nothing (a LoRA that loads and silently does nothing is the commonest
    complaint about LoRA loaders). ``partial=True`` attaches what matched and reports the rest
    (a warning and :attr:`LoadReport.unmatched`). A file that matches nothing at all is always
    an error.
    """
    adapter, report = adapter_from_file(read_lora_file(url), root, keymap, partial=partial, name=name)
    adapter.multiplier = multiplier
    return attach(root, adapter), report


def adapter_from_file(file: LoRAFile, root: nn.Module, keymap: KeyMap, *, partial: bool = False,
                      name: str | None = None) -> tuple[Adapter, LoadReport]:
    """An (unattached) adapter for ``root`` from ``file``'s tensors; see :func:`load_lora`.
    Bundled token embeddings (``bundle_emb.<word>.string_to_param.*``) come with it; the model
    must then have one text encoder that takes them."""
    tensors, bundled = split_bundle(file.tensors, source=file.source)
    embeddings = None
    if bundled:
        try:
            device = find_host(root).token_embedding_layer().weight.device
        except ValueError as e:
            raise CheckpointError(f"{file.source} carries token embeddings ({', '.join(bundled)}), but {e}") from e
        embeddings = TokenEmbeddings({w: t.to(device=device, dtype=torch.float32) for w, t in bundled.items()})
    groups, unmatched = group_keys(tensors, source=file.source)
    lookup = keymap.lookup()
    targets = find_targets(root)
    layers: dict[str, LoRA] = {}
    spelled_as: dict[str, str] = {}
    used = 0
    for spelling, roles in groups.items():
        ours = lookup.get(spelling)
        if ours is None:
            unmatched += roles.values()
            continue
        if ours not in targets:
            raise CheckpointError(f"LoRA key map names {ours}, which is not a target of {type(root).__name__} "
                                  f"(a key-map bug in the model plugin)")
        if ours in layers:
            raise CheckpointError(f"{file.source}: {spelled_as[ours]} and {spelling} are both {ours}")
        layers[ours] = _layer(file, spelling, roles, targets[ours], base_weight(root, targets[ours]))
        spelled_as[ours] = spelling
        used += len(roles)
    unmatched = sorted(unmatched)
    report = LoadReport(file.source, len(layers), used, tuple(unmatched), tuple(bundled))
    if not layers and not bundled:
        raise CheckpointError(f"{file.source}: no key matches a module of this model ({len(unmatched)} keys, "
                              f"e.g. {', '.join(unmatched[:5])}); is it a LoRA for another model family?")
    if unmatched and not partial:
        more = f" ... (+{len(unmatched) - _SHOWN} more)" if len(unmatched) > _SHOWN else ""
        raise CheckpointError(f"{file.source}: {len(unmatched)} of {len(file.tensors)} keys match no module of this "
                              f"model: {', '.join(unmatched[:_SHOWN])}{more}. Loading it would silently leave them "
                              f"out; set partial = true to load the {used} keys that match")
    if unmatched:
        warnings.warn(f"{report} (partial = true): {', '.join(unmatched[:_SHOWN])}", stacklevel=3)
    return Adapter(layers, name=name or file.source.rsplit("/", 1)[-1], embeddings=embeddings), report


def _settings_for(file: LoRAFile, spelling: str) -> tuple[PeftSettings | None, str]:
    for component, settings in file.settings.items():
        if component and spelling.startswith(component + "."):
            return settings, spelling[len(component) + 1:]
    return file.settings.get(""), spelling


def _as_shape(t: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """``t`` as ``shape``: equal, or the same matrix held as a linear weight and as a 1x1
    convolution (files trained on SD 1's convolutional ``proj_in`` and SD 2's linear one); else None."""
    if tuple(t.shape) == shape:
        return t

    def matrix(s: tuple[int, ...]) -> tuple[int, ...] | None:
        return tuple(s[:2]) if len(s) == 2 or tuple(s[2:]) == (1, 1) else None

    core = matrix(tuple(t.shape))
    return t.reshape(shape) if core is not None and core == matrix(shape) else None


def _layer(file: LoRAFile, spelling: str, roles: dict[str, str], target: Target, base: Tensor) -> LoRA:
    where = f"{file.source}: {spelling}"
    if "down" not in roles or "up" not in roles:
        missing = "up" if "down" in roles else "down"
        raise CheckpointError(f"{where} has no {missing} matrix (keys: {', '.join(roles.values())})")
    down, up = file.tensors[roles["down"]], file.tensors[roles["up"]]
    rank = down.shape[0]
    alpha = float(file.tensors[roles["alpha"]].float().reshape(-1)[0]) if "alpha" in roles else None
    if alpha is None:
        settings, module = _settings_for(file, spelling)
        alpha = settings.alpha_for(module, rank, where=where) if settings else None
    layer = LoRA(target.in_features, target.out_features, rank, alpha=alpha, conv=target.conv,
                 device=base.device, dtype=base.dtype)
    with torch.no_grad():
        for role, tensor, param in (("down", down, layer.down.weight), ("up", up, layer.up.weight)):
            fitted = _as_shape(tensor, tuple(param.shape))
            if fitted is None:
                raise CheckpointError(f"{where}: {role} is {tuple(tensor.shape)} but {target.module} needs "
                                      f"{tuple(param.shape)} for rank {rank}")
            param.copy_(fitted)
    return layer
