"""LoRA files: read (kohya, diffusers/PEFT, legacy diffusers, NeMo) and write (kohya, PEFT).

A file is a flat ``key -> tensor`` map. Each key is a *spelling* of a target (see
:mod:`t2i_engine.adapters.keymaps`) followed by one suffix from :data:`SUFFIXES`, which says
whether the tensor is the ``down`` matrix, the ``up`` matrix or kohya's ``alpha``. The suffix table
is finite and the spellings come from the model's forward map, so no key is guessed at.

Alpha, per target, comes from (first found): kohya's ``<name>.alpha`` tensor; diffusers'
``lora_adapter_metadata`` in the safetensors header (per component: ``unet.lora_alpha``,
``unet.alpha_pattern`` ...); an ``adapter_config.json`` beside the file (PEFT's ``lora_alpha``,
``alpha_pattern``, ``rank_pattern``, ``use_rslora``); the ``network_alpha`` of a NeMo archive's
``model_config.yaml``. Absent everywhere: alpha = rank (scale = multiplier), the kohya, PEFT and
NeMo convention alike.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import tarfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import fsspec
import torch
from torch import Tensor

from t2i_engine.adapters.attach import Adapter
from t2i_engine.adapters.embeddings import bundle_tensors
from t2i_engine.adapters.keymaps import KeyMap
from t2i_engine.adapters.layers import LoRA
from t2i_engine.checkpoint.io import read_bytes, safe_torch_load, save_safetensors
from t2i_engine.errors import CheckpointError

__all__ = ["SUFFIXES", "LoRAFile", "PeftSettings", "group_keys", "read_lora_file", "save_kohya", "save_peft"]

SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),  # kohya-ss, A1111
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),  # PEFT, diffusers >= 0.21
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),  # diffusers LoRACompatibleLinear era
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),  # its text encoder
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention processors: processor.to_q_lora
    (".adapter_layer.parallel_linear_adapter.linear_in.weight", "down"),  # NeMo LinearWrapper adapters
    (".adapter_layer.parallel_linear_adapter.linear_out.weight", "up"),
)
"""Key suffix -> role. ``"<spelling><suffix>"``; attention-processor keys spell the target as
``...attn1.processor.to_q`` (the ``_lora`` belongs to the suffix)."""

UNSUPPORTED: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), kind) for p, kind in (
    (r"\.hada_(w[12]_[ab]|t[12])$", "LoHa"), (r"\.lokr_(w[12](_[ab])?|t2)$", "LoKr"),
    (r"\.(dora_scale|lora_magnitude_vector(\.\w+)*)$", "DoRA"), (r"\.lora_mid\.weight$", "LoCon-Tucker"),
    (r"\.lora_(B|up)\.bias$", "LoRA bias"), (r"\.diff(_b)?$", "full-weight diff")))
"""Key endings of adapter kinds that are not low-rank ``up @ down`` updates."""


def _unsupported(key: str) -> str | None:
    return next((kind for pattern, kind in UNSUPPORTED if pattern.search(key)), None)


WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
                "adapter_model.bin")
"""The files a diffusers or PEFT LoRA folder holds its weights in."""

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors-header key for its LoraConfig fields


@attrs.frozen
class PeftSettings:
    """The LoraConfig fields that change computation, for one component (``""``: all)."""

    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: Mapping[str, int] = attrs.field(factory=dict)
    alpha_pattern: Mapping[str, float] = attrs.field(factory=dict)
    use_rslora: bool = False

    def alpha_for(self, module: str, rank: int, *, where: str) -> float | None:
        """Alpha (rsLoRA folded in) for ``module`` with ``rank``; a contradicting rank is an error."""
        expected = _pattern_value(self.rank_pattern, module, self.r)
        if expected is not None and int(expected) != rank:
            raise CheckpointError(f"{where}: the adapter config gives {module} rank {expected} but its weights "
                                  f"have rank {rank}")
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        if alpha is None:
            return None
        return float(alpha) * math.sqrt(rank) if self.use_rslora else float(alpha)  # alpha/sqrt(r) = a'/r


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():  # PEFT's own matching rule (peft.utils.other.get_pattern_key)
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@attrs.frozen
class LoRAFile:
    """What a LoRA file holds: tensors, the header metadata and alpha settings per component."""

    tensors: dict[str, Tensor]
    source: str
    metadata: dict[str, str] = attrs.field(factory=dict)
    settings: dict[str, PeftSettings] = attrs.field(factory=dict)  # component ("unet", "" = all) -> fields


# --- reading ------------------------------------------------------------------------------------


def read_lora_file(url: str) -> LoRAFile:
    """Read a LoRA from ``url``: a ``.safetensors`` file, a pickled ``.bin``/``.pt``/``.ckpt``
    (``weights_only``), a NeMo ``.nemo`` archive, or a diffusers/PEFT folder holding one of
    :data:`WEIGHT_NAMES`. An ``adapter_config.json`` beside the weights is read too."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        found = next((n for n in WEIGHT_NAMES if fs.exists(f"{path}/{n}")), None)
        if found is None:
            raise CheckpointError(f"{url}: a folder without LoRA weights (looked for {', '.join(WEIGHT_NAMES)})")
        url = url.rstrip("/") + "/" + found
        path = f"{path}/{found}"
    if path.endswith(".nemo"):
        return _read_nemo(url)
    data = read_bytes(url)
    metadata: dict[str, str] = {}
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            tensors = load(data)
            metadata = _safetensors_metadata(data)
        except Exception as e:
            raise CheckpointError(f"{url} is not a readable safetensors file: {e}") from e
    else:
        obj = safe_torch_load(url)
        obj = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{url}: not a flat name -> tensor LoRA state dict")
        tensors = dict(obj)
    settings: dict[str, PeftSettings] = {}
    if METADATA_KEY in metadata:
        settings |= _diffusers_settings(json.loads(metadata[METADATA_KEY]), where=f"{url} ({METADATA_KEY})")
    config = path.rpartition("/")[0] + "/adapter_config.json" if "/" in path else "adapter_config.json"
    if fs.exists(config) and "" not in settings:
        with fs.open(config, "rb") as f:
            settings[""] = _peft_settings(json.load(f), where=config)
    return LoRAFile(tensors, url, metadata, settings)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})


_REFUSED_FIELDS = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "layer_replication": None,
                   "modules_to_save": None, "target_parameters": None, "use_qalora": False}
"""LoraConfig fields that change computation in ways a plain LoRA cannot: refused unless unset."""


def _peft_settings(cfg: Mapping[str, Any], *, where: str) -> PeftSettings:
    if cfg.get("peft_type", "LORA") not in ("LORA", None):
        raise CheckpointError(f"{where}: peft_type {cfg['peft_type']!r} is not LoRA")
    for key, neutral in _REFUSED_FIELDS.items():
        value = cfg.get(key, neutral)
        if value not in (neutral, None, False, [], {}):
            raise CheckpointError(f"{where}: {key} = {value!r} is not supported (it changes what the adapter "
                                  f"computes); only plain LoRA is")
    return PeftSettings(r=cfg.get("r"), lora_alpha=cfg.get("lora_alpha"), rank_pattern=cfg.get("rank_pattern") or {},
                        alpha_pattern=cfg.get("alpha_pattern") or {}, use_rslora=bool(cfg.get("use_rslora")))


def _diffusers_settings(meta: Mapping[str, Any], *, where: str) -> dict[str, PeftSettings]:
    per: dict[str, dict[str, Any]] = {}
    for key, value in meta.items():
        component, _, field = key.partition(".")
        per.setdefault(component, {})[field] = value
    return {c: _peft_settings(fields, where=f"{where}, {c}") for c, fields in per.items()}


def _read_nemo(url: str) -> LoRAFile:
    """A NeMo LoRA archive: ``model_weights.ckpt`` (adapter tensors) and ``model_config.yaml``
    (``peft.lora_tuning.network_alpha``; absent or null: scale 1, as NeMo's LinearWrapper)."""
    with tarfile.open(fileobj=io.BytesIO(read_bytes(url))) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        if "model_weights.ckpt" not in members:
            raise CheckpointError(f"{url}: a .nemo archive without model_weights.ckpt")
        raw = tar.extractfile(members["model_weights.ckpt"]).read()  # type: ignore[union-attr]
        cfg_raw = tar.extractfile(members["model_config.yaml"]).read() if "model_config.yaml" in members else b""  # type: ignore[union-attr]
    try:
        sd = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"refusing {url}: model_weights.ckpt cannot be read with weights_only=True ({e})") from e
    sd = sd.get("state_dict", sd)
    settings: dict[str, PeftSettings] = {}
    if cfg_raw:
        import yaml

        cfg = yaml.safe_load(cfg_raw) or {}
        tuning = ((cfg.get("peft") or {}).get("lora_tuning") or {})
        settings[""] = PeftSettings(r=tuning.get("adapter_dim"), lora_alpha=tuning.get("network_alpha"))
    return LoRAFile(dict(sd), url, {}, settings)


# --- key parsing ---------------------------------------------------------------------------------


def split_key(key: str) -> tuple[str, str] | None:
    """``key -> (spelling, role)`` by :data:`SUFFIXES`, or None for a key no LoRA suffix ends."""
    for suffix, role in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def group_keys(tensors: Mapping[str, Tensor], *, source: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group keys by spelling: ``{spelling: {role: key}}`` and the keys no suffix explains.
    Keys of unsupported adapter kinds (LoHa, LoKr, DoRA ...) are a CheckpointError naming them."""
    odd = sorted(k for k in tensors if _unsupported(k))
    if odd:
        kinds = sorted({_unsupported(k) or "" for k in odd})
        raise CheckpointError(f"{source}: holds {'/'.join(kinds)} keys, which are not plain LoRA and are not "
                              f"supported: {', '.join(odd[:10])}{' ...' if len(odd) > 10 else ''}")
    groups: dict[str, dict[str, str]] = {}
    loose: list[str] = []
    for key in tensors:
        split = split_key(key)
        if split is None:
            loose.append(key)
            continue
        spelling, role = split
        if role in groups.setdefault(spelling, {}):
            raise CheckpointError(f"{source}: {key} and {groups[spelling][role]} are both the {role} of {spelling}")
        groups[spelling][role] = key
    return groups, loose


# --- writing -------------------------------------------------------------------------------------


def _common(values: list[Any]) -> Any:
    """The most frequent value (PEFT's ``r``/``lora_alpha``; the rest go to its patterns)."""
    return Counter(values).most_common(1)[0][0]


def save_kohya(adapter: Adapter, url: str, keymap: KeyMap, *, dtype: torch.dtype | None = None,
               metadata: Mapping[str, str] | None = None) -> None:
    """Write ``adapter`` as a kohya-ss LoRA (``lora_unet_*``/``lora_te_*`` with ``.lora_down``,
    ``.lora_up`` and ``.alpha``) with the ``ss_*`` metadata kohya's tools and A1111 read. The
    adapter's token embeddings, if any, are bundled in as ``bundle_emb.<word>.string_to_param.*``
    (:mod:`t2i_engine.adapters.embeddings`).
    ``ss_network_dim``/``ss_network_alpha`` say ``Dynamic`` where layers differ, as kohya's
    ``resize_lora`` does. The multiplier is a load-time choice and is not written. ``metadata``
    adds further header entries (a trainer's ``ss_num_train_images``, ``ss_max_train_steps`` ...);
    it cannot replace the ones describing the weights."""
    tensors: dict[str, Tensor] = {}
    unknown = [name for name in adapter.names() if name not in keymap.targets]
    if unknown:
        raise ValueError(f"the model's LoRA key map has no file spelling for {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}; adapt only the modules its plugin names")
    for name, layer in adapter.items():
        spelled = keymap.targets[name].kohya
        tensors[f"{spelled}.lora_down.weight"] = layer.down.weight
        tensors[f"{spelled}.lora_up.weight"] = layer.up.weight
        tensors[f"{spelled}.alpha"] = torch.tensor(layer.effective_alpha, dtype=torch.float32)
    if adapter.embeddings is not None:
        tensors |= bundle_tensors(adapter.embeddings)
    ranks = {layer.rank for _, layer in adapter.items()}
    alphas = {layer.effective_alpha for _, layer in adapter.items()}
    meta = {"ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic" if ranks else "0",
            "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic" if alphas else "0",
            "ss_base_model_version": keymap.base_model_version, "ss_v2": str(bool(keymap.v2))}
    clash = sorted(set(metadata or {}) & set(meta))
    if clash:
        raise ValueError(f"save_kohya: metadata {', '.join(clash)} is derived from the weights; leave it out")
    save_safetensors(tensors, url, metadata={**meta, **{k: str(v) for k, v in (metadata or {}).items()}}, dtype=dtype)


def save_peft(adapter: Adapter, url: str, keymap: KeyMap, *, dtype: torch.dtype | None = None,
              skip_embeddings: bool = False) -> str:
    """Write ``adapter`` in the diffusers/PEFT layout (``unet.<module>.lora_A.weight`` ...).

    ``url`` ending in ``.safetensors`` is the file; otherwise it is a folder and the file is
    ``pytorch_lora_weights.safetensors`` in it (what ``pipe.load_lora_weights(folder)`` reads).
    Alphas go into the header as diffusers' ``lora_adapter_metadata`` (``r``, ``lora_alpha``,
    ``rank_pattern``, ``alpha_pattern``, ``target_modules`` per component), the LoraConfig
    diffusers builds when it loads the file. Returns the file written.

    The layout has no place for token embeddings: an adapter with some is a ValueError unless
    ``skip_embeddings`` (write them with :func:`t2i_engine.adapters.embeddings.save_textual_inversion`).
    """
    if adapter.embeddings is not None and not skip_embeddings:
        raise ValueError("the diffusers/PEFT LoRA layout cannot hold token embeddings; save them as a "
                         "textual-inversion file (save_textual_inversion) and pass skip_embeddings=True")
    file = url if url.endswith(".safetensors") else url.rstrip("/") + "/pytorch_lora_weights.safetensors"
    tensors: dict[str, Tensor] = {}
    per: dict[str, dict[str, LoRA]] = {}  # component ("unet", "text_encoder") -> module -> layer
    for name, layer in adapter.items():
        spelled = keymap.targets[name].peft
        tensors[f"{spelled}.lora_A.weight"] = layer.down.weight
        tensors[f"{spelled}.lora_B.weight"] = layer.up.weight
        component, _, module = spelled.partition(".")
        per.setdefault(component, {})[module] = layer
    meta: dict[str, Any] = {}
    for component, layers in per.items():
        r = _common([x.rank for x in layers.values()])
        a = _common([x.effective_alpha for x in layers.values()])
        meta |= {f"{component}.r": r, f"{component}.lora_alpha": a,
                 f"{component}.rank_pattern": {m: x.rank for m, x in layers.items() if x.rank != r},
                 f"{component}.alpha_pattern": {m: x.effective_alpha for m, x in layers.items()
                                                if x.effective_alpha != a},
                 f"{component}.target_modules": sorted(layers)}
    save_safetensors(tensors, file, dtype=dtype,
                     metadata={"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})
    return file
