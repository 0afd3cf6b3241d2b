"""NeMo Imagen ``.nemo`` archives and Lightning ``.ckpt`` checkpoints (``MegatronImagen``): read
into an :class:`ImagenStage`; ``.nemo`` also written (the same layout, for a round trip and for
NeMo users).

A ``.nemo`` is a tar with ``model_config.yaml`` (read with ``yaml.safe_load``) and
``model_weights.ckpt`` (a state dict, read only with ``torch.load(weights_only=True)``). The UNet's
tensors are ``model.model.unet.<name>`` (``MegatronImagen.model`` = ``Imagen``, whose ``model`` is
the preconditioning wrapper holding ``unet``), with the names of
:mod:`t2i_plugin_imagen.imagen_unet`. The yaml fields that change the computation are read
(``unet_type``, ``unet``, ``conditioning.embed_dim`` / ``token_length``, ``noise_cond_aug``,
``preconditioning_type`` and ``preconditioning``) or refused naming the field. NeMo encodes text
with an external T5 (precached embeddings), so the user's T5 folders come with the archive.

``unet_type``: ``base`` (``UNetModel``), ``sr`` (``EfficientUNetModel``) and ``sr-unet``
(``UNetModel`` again, with ``unet.low_res_cond: true`` and the top-level ``noise_cond_aug``: a
base-type UNet used for super-resolution), as NeMo's ``Imagen.__init__`` builds them. NeMo's
``UNetModel`` registers its first conv twice (``init_conv`` and ``input_blocks.0``), so its state
dict holds ``init_conv.0.*`` beside ``input_blocks.0.0.*``; both are read (they must agree) and
written. TorchInductor's ``._orig_mod`` (NeMo trains with ``inductor: true``) is removed from the
names, as NeMo's loaders do.

EMA: NeMo's ``EMA`` callback keeps the moving average outside the module and its
``NeMoModelCheckpoint`` writes it as a separate Lightning checkpoint ``<name>-EMA.ckpt`` (the
model's names, EMA values); the ``.nemo`` (``save_to``) holds the trained weights, which is what
NeMo's inference (``ImagenPipeline``) samples with. :func:`read_ema_weights` reads such a file,
recognised by its contents (``EMAOptimizer``'s state, or the first callback's ``ema_weights``), the
name deciding only where the contents cannot tell.

Lightning ``.ckpt`` (a training run's checkpoint, no ``.nemo``): the same names in its
``state_dict``; the model config from a yaml the user gives (``hparams.yaml``, the run's config)
or from ``hyper_parameters["cfg"]`` (``ModelPT.save_hyperparameters("cfg")``: an OmegaConf
``DictConfig`` pickle, read with inert globals and turned into plain data by :func:`plain_config`).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from t2i_engine.checkpoint.io import atomic_write_bytes, load_state_dict_strict, safe_torch_load
from t2i_engine.checkpoint.nemo import (CONFIG_MEMBER, WEIGHTS_MEMBER, archive_member, read_archive_weights,
                                        strip_compile_names)
from t2i_engine.errors import CheckpointError
from t2i_engine.nn.init import skip_weight_init
from t2i_plugin_imagen.imagen_unet import build_unet, unet_options
from t2i_plugin_imagen.precond import Preconditioning
from t2i_plugin_imagen.stage import ImagenStage
from t2i_plugin_imagen.text_encoder import T5TextEncoder

UNET_PREFIX = "model.model.unet."
# unet: keys NeMo reads that do not change the forward pass (memory, kernels, backward numerics)
NEUTRAL_UNET_KEYS = ("gradient_checkpointing", "stable_attention", "flash_attention")
_OBJECTIVES = {"noise": "eps", "x_start": "x0"}
# NeMo unet_type -> this plugin's UNet (sr-unet: the base UNet with low_res_cond)
UNET_TYPES = {"base": "base", "sr": "sr", "sr-unet": "base"}
# NeMoModelCheckpoint._ema_format_filepath: the EMA copy of <name>.ckpt
EMA_SUFFIX = "-EMA.ckpt"
# UNetModel's state dict names its first conv twice: init_conv (an attribute) and input_blocks.0
_INIT_CONV_ALIAS = {"init_conv.0.weight": "input_blocks.0.0.weight", "init_conv.0.bias": "input_blocks.0.0.bias"}


def _member(path: str, name: str) -> bytes:
    data = archive_member(path, name)
    if data is None:
        raise CheckpointError(f"{path}: the .nemo archive has no {name}")
    return data


def read_nemo_config(path: str) -> dict[str, Any]:
    """The ``model_config.yaml`` of a ``.nemo`` archive (its ``model:`` level unwrapped); the
    archive's weights are not read."""
    import yaml

    if not tarfile.is_tarfile(path):
        raise CheckpointError(f"{path}: not a .nemo archive (a tar file)")
    cfg = yaml.safe_load(_member(path, CONFIG_MEMBER)) or {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: {CONFIG_MEMBER} is not a mapping")
    return cfg.get("model", cfg)


def read_nemo(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state dict)`` of a ``.nemo`` archive (the config's ``model:`` level unwrapped)."""
    return read_nemo_config(path), read_archive_weights(path)


def _precond(cfg: dict[str, Any], path: str) -> Preconditioning:
    kind = cfg.get("preconditioning_type", "DDPM")
    p = dict(cfg.get("preconditioning") or {})
    loss = p.pop("loss_type", "l2")
    if loss != "l2":
        raise CheckpointError(f"{path}: preconditioning.loss_type = {loss!r} is not supported (l2)")
    if kind == "EDM":
        unknown = set(p) - {"sigma_data", "p_mean", "p_std"}
        if unknown:
            raise CheckpointError(f"{path}: preconditioning key(s) {sorted(unknown)} are not supported")
        return Preconditioning(kind="edm", **{k: float(v) for k, v in p.items()})
    if kind == "DDPM":
        objective = p.pop("pred_objective", "noise")
        schedule = p.pop("noise_schedule", "cosine")
        p.pop("timesteps", None)  # the discrete sampler's default step count: not part of the network
        if p or objective not in _OBJECTIVES or schedule not in ("linear", "cosine"):
            raise CheckpointError(f"{path}: preconditioning {cfg.get('preconditioning')} is not supported "
                                  "(pred_objective noise|x_start, noise_schedule linear|cosine)")
        return Preconditioning(kind="continuous-ddpm", objective=_OBJECTIVES[objective], log_snr=schedule)  # type: ignore[arg-type]
    raise CheckpointError(f"{path}: preconditioning_type = {kind!r} is not supported (EDM, DDPM)")


def _tensors(named: dict[str, Any], path: str) -> dict[str, Tensor]:
    bad = sorted(k for k, v in named.items() if not isinstance(v, Tensor))
    if bad:
        raise CheckpointError(f"{path}: the weights {bad[:5]} are not tensors")
    return named


def _callback_ema_weights(ckpt: dict[str, Any], state: dict[str, Any], path: str) -> dict[str, Tensor] | None:
    """The ``ema_weights`` of NeMo's first EMA callback (its ``state_dict``, kept in the
    checkpoint's ``callbacks``: one tensor per ``state_dict`` entry, in its order), or None."""
    for callback in (ckpt.get("callbacks") or {}).values():
        if isinstance(callback, dict) and callback.get("ema_weights") is not None:
            weights = list(callback["ema_weights"])
            if len(weights) != len(state):
                raise CheckpointError(f"{path}: the EMA callback holds {len(weights)} tensors for "
                                      f"{len(state)} in state_dict; they cannot be matched by name")
            return _tensors(dict(zip(state, weights)), path)
    return None


def _are_state_tensors(tensors: list[Any], state: dict[str, Any]) -> bool:
    """Whether every tensor of ``tensors`` is (equal to) a distinct tensor of ``state``: the
    parameters in any order (the optimizer's groups), buffers and aliases of ``state`` left over."""
    pool: dict[tuple[Any, ...], list[Tensor]] = {}
    for value in state.values():
        if isinstance(value, Tensor):
            pool.setdefault((tuple(value.shape), value.dtype), []).append(value)
    for t in tensors:
        if not isinstance(t, Tensor):
            return False
        candidates = pool.get((tuple(t.shape), t.dtype), [])
        shared = [i for i, c in enumerate(candidates)  # saved together: one storage
                  if c.data_ptr() == t.data_ptr() and c.stride() == t.stride()]
        found = shared[:1] or [i for i, c in enumerate(candidates) if torch.equal(c, t)][:1]
        if not found:
            return False
        del candidates[found[0]]
    return True


def read_ema_weights(path: str) -> dict[str, Tensor]:
    """The EMA weights in a NeMo Lightning checkpoint (read with ``weights_only=True``), under the
    model's names, told by the file's contents first:

    * ``callbacks`` holding ``ema_weights``: NeMo's first EMA callback (its state, one tensor per
      ``state_dict`` entry, in that order); taken whatever the file's name;
    * ``optimizer_states`` holding ``EMAOptimizer``'s state (``opt``, ``ema``, ...): NeMo's current
      EMA callback. ``NeMoModelCheckpoint`` writes ``<name>-EMA.ckpt`` with the EMA weights swapped
      into the module, where ``ema`` is the module's parameters, so the ``state_dict`` is the EMA
      copy when every ``ema`` tensor is one of its tensors (a renamed file is recognised);
      otherwise the ``state_dict`` holds the trained weights (refused: ``ema`` is unnamed);
    * ``optimizer_states`` of a plain optimizer: the regular ``<name>.ckpt`` (``EMA`` saves it
      with the wrapped optimizer's state), or a run without EMA: refused, whatever the name;
    * no ``optimizer_states`` (a weights-only checkpoint): the contents cannot tell, so the name
      decides: ``<name>-EMA.ckpt`` is the EMA copy, any other name is refused.
    """
    ckpt = _lightning_checkpoint(path)
    state = ckpt["state_dict"]
    from_callback = _callback_ema_weights(ckpt, state, path)
    if from_callback is not None:
        return from_callback
    named = Path(path).name.endswith(EMA_SUFFIX)
    looked = f"{path}: holds no EMA weights: no callbacks entry with ema_weights (NeMo's first EMA callback)"
    optimizers = ckpt.get("optimizer_states")
    if not optimizers:
        if named:
            return _tensors(dict(state), path)
        raise CheckpointError(f"{looked} and no optimizer_states (a weights-only checkpoint), so only the name "
                              f"could tell, and it does not end in {EMA_SUFFIX} (NeMo's name for the EMA copy)")
    ema_states = [s for s in optimizers if isinstance(s, dict) and "ema" in s and "opt" in s]
    if not ema_states:
        raise CheckpointError(f"{looked}, and its optimizer_states are a plain optimizer's, not EMAOptimizer's "
                              f"(opt, ema), as in NeMo's regular <name>.ckpt"
                              + (f" (the name {EMA_SUFFIX} alone is not trusted)" if named else "")
                              + f"; NeMo's EMA callback writes the EMA copy to <name>{EMA_SUFFIX}: give that file")
    ema = [t for s in ema_states for t in s["ema"]]
    if ema and _are_state_tensors(ema, state):
        return _tensors(dict(state), path)
    raise CheckpointError(f"{path}: its EMAOptimizer state's ema tensors are not its state_dict's: the state_dict "
                          "holds the trained weights (NeMo's <name>-EMA.ckpt holds the EMA copy in both), and ema "
                          "is unnamed (the optimizer's parameter order); give the <name>-EMA.ckpt")


def _unet_state(state: dict[str, Tensor], path: str, *, base: bool) -> dict[str, Tensor]:
    """The UNet's tensors of a NeMo state dict (``model.model.unet.*``, TorchInductor's
    ``._orig_mod`` removed; a base-type UNet's ``init_conv.0.*`` checked against ``input_blocks.0.0.*``)."""
    state = strip_compile_names(state)
    others = sorted(k for k in state if not k.startswith(UNET_PREFIX))
    if others:
        raise CheckpointError(f"{path}: tensors outside {UNET_PREFIX}*: {others[:5]}")
    unet = {k[len(UNET_PREFIX):]: v.float() for k, v in state.items()}
    if base:
        for alias, name in _INIT_CONV_ALIAS.items():
            if alias not in unet:
                continue
            value = unet.pop(alias)
            if name not in unet:
                unet[name] = value
            elif not torch.equal(unet[name], value):
                raise CheckpointError(f"{path}: {UNET_PREFIX}{alias} and {UNET_PREFIX}{name} differ (NeMo's "
                                      "UNetModel holds one conv under both names)")
    return unet


def _unet_from_config(cfg: dict[str, Any], where: str) -> tuple[Any, str, dict[str, Any], dict[str, Any]]:
    """``(unet, kind, unet options, conditioning)`` built from a NeMo Imagen model config (read
    from ``where``), every field that changes the computation checked."""
    unet_type = cfg.get("unet_type", "base")
    if unet_type not in UNET_TYPES:
        raise CheckpointError(f"{where}: unet_type = {unet_type!r} is not supported ({', '.join(UNET_TYPES)})")
    kind = UNET_TYPES[unet_type]
    options = {k: v for k, v in dict(cfg.get("unet") or {}).items() if k not in NEUTRAL_UNET_KEYS}
    conditioning = dict(cfg.get("conditioning") or {})
    if "embed_dim" not in conditioning:
        raise CheckpointError(f"{where}: conditioning.embed_dim (the T5 width) is missing")
    options["text_embed_dim"] = int(conditioning["embed_dim"])
    if unet_type in ("sr", "sr-unet"):
        if "noise_cond_aug" in options:  # NeMo passes the top-level key too: a duplicate argument there
            raise CheckpointError(f"{where}: unet.noise_cond_aug is not a NeMo {unet_type} key (use the top-level "
                                  "noise_cond_aug)")
        options["noise_cond_aug"] = bool(cfg.get("noise_cond_aug", False))
    low_res = bool(options.get("low_res_cond", False))
    if unet_type == "sr-unet" and not low_res:
        raise CheckpointError(f"{where}: unet_type sr-unet needs unet.low_res_cond = true (NeMo's UNetModel refuses "
                              "the low-res input otherwise)")
    if unet_type == "base" and low_res:
        raise CheckpointError(f"{where}: unet.low_res_cond = true with unet_type base (NeMo's Imagen gives a base "
                              "model no low-res input; a super-resolution UNetModel is unet_type sr-unet)")
    try:
        unet = build_unet(kind, options)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: unet: {e}") from e
    return unet, kind, options, conditioning


def _stage(cfg: dict[str, Any], where: str, weights: Callable[[], tuple[dict[str, Any], str]], *, t5: str,
           tokenizer: str, lowres_size: int | None) -> ImagenStage:
    """A stage from a model config (read from ``where``) and ``weights()`` (``(NeMo state dict,
    its source)``, called once the config has been checked)."""
    with skip_weight_init():  # the strict load below replaces every parameter
        unet, kind, options, conditioning = _unet_from_config(cfg, where)
    precond = _precond(cfg, where)
    state, source = weights()
    load_state_dict_strict(unet, _unet_state(state, source, base=kind == "base"), source=f"{source} (unet)")
    text = T5TextEncoder.from_folders(t5, tokenizer, max_length=int(conditioning.get("token_length", 128)),
                                      zero_padding=True, lowercase=False, zero_empty=True)
    size = int(options.get("image_size", unet.config.image_size))
    return ImagenStage(unet, text, precond, image_size=size, lowres_size=lowres_size).eval()


def load_nemo_stage(path: str, *, t5: str, tokenizer: str, lowres_size: int | None = None,
                    ema_checkpoint: str | None = None) -> ImagenStage:
    """A stage from a NeMo Imagen ``.nemo`` and the user's T5 folders (``T5EncoderModel`` and
    ``spiece.model``); ``lowres_size`` is the input side of a super-resolution stage (``sr`` and
    ``sr-unet``). ``ema_checkpoint``: take the UNet's weights from NeMo's EMA checkpoint
    (:func:`read_ema_weights`) instead of the archive's (the trained weights, NeMo's default); the
    archive's ``model_weights.ckpt`` is then not read at all (only its ``model_config.yaml``)."""
    cfg = read_nemo_config(path)

    def weights() -> tuple[dict[str, Any], str]:
        if ema_checkpoint is not None:
            return read_ema_weights(ema_checkpoint), ema_checkpoint
        return read_archive_weights(path), path

    return _stage(cfg, path, weights, t5=t5, tokenizer=tokenizer, lowres_size=lowres_size)


def plain_config(value: Any) -> Any:
    """Plain data (dicts, lists, scalars) from an OmegaConf config read with
    ``safe_torch_load(inert_globals=True)``: ``DictConfig`` / ``ListConfig`` are inert placeholders
    whose pickled state holds ``_content`` (a dict or list of nodes, or None), value nodes
    (``AnyNode``, ``IntegerNode``, ...) hold ``_val``; anything else is returned as it is."""
    if isinstance(value, dict):
        return {k: plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    state = getattr(value, "state", None)
    if isinstance(state, dict) and "_content" in state:
        return plain_config(state["_content"])
    if isinstance(state, dict) and "_val" in state:
        return plain_config(state["_val"])
    return value


def _model_section(data: Any, where: str) -> dict[str, Any]:
    """The model config in ``data``: under ``cfg`` (Lightning's ``hparams.yaml`` of a NeMo model:
    ``ModelPT.save_hyperparameters("cfg")``), under ``model`` (a NeMo training config, a
    ``model_config.yaml``), or ``data`` itself."""
    for key in ("cfg", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: the model config is not a mapping")
    return data


def read_config_yaml(path: str) -> dict[str, Any]:
    """The model config in a yaml (``yaml.safe_load``): Lightning's ``hparams.yaml`` of the run
    (``cfg:``), the run's NeMo config (``model:``) or a ``.nemo``'s ``model_config.yaml``."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: cannot be read as yaml ({e})") from e
    return _model_section(data, path)


def _lightning_checkpoint(path: str) -> dict[str, Any]:
    """A Lightning checkpoint (``weights_only``, OmegaConf objects inert) that has a ``state_dict``."""
    ckpt = safe_torch_load(path, inert_globals=True)  # NeMo pickles its hyper_parameters as OmegaConf
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a NeMo (Lightning) checkpoint: it has no state_dict")
    return ckpt


def read_checkpoint_config(ckpt: dict[str, Any], path: str) -> dict[str, Any]:
    """The model config of a NeMo Lightning checkpoint: ``hyper_parameters["cfg"]`` (NeMo's
    ``ModelPT`` saves its ``cfg`` as a hyperparameter, pickled as an OmegaConf ``DictConfig``)."""
    hparams = plain_config(ckpt.get("hyper_parameters"))
    if not isinstance(hparams, dict) or not isinstance(hparams.get("cfg"), dict):
        found = f"hyper_parameters keys {sorted(map(str, hparams))}" if isinstance(hparams, dict) else \
            ("no hyper_parameters" if hparams is None else f"hyper_parameters of type {type(hparams).__name__}")
        raise CheckpointError(f"{path}: no model config in the checkpoint: NeMo's ModelPT keeps it in "
                              f"hyper_parameters.cfg, and this one has {found}; give the run's hparams.yaml "
                              "(or its NeMo config yaml) as [model] nemo_config")
    return _model_section(hparams["cfg"], f"{path} hyper_parameters.cfg")


def load_nemo_checkpoint_stage(path: str, *, t5: str, tokenizer: str, config: str | None = None,
                               lowres_size: int | None = None, ema_checkpoint: str | None = None) -> ImagenStage:
    """A stage from a NeMo Imagen Lightning checkpoint (``.ckpt``, the ``state_dict`` under NeMo's
    names) and the user's T5 folders. The model config comes from ``config`` (a yaml, see
    :func:`read_config_yaml`) when given, else from the checkpoint's ``hyper_parameters.cfg``.
    ``ema_checkpoint`` as for :func:`load_nemo_stage` (with ``config`` given, ``path`` is then not read)."""
    ckpt: dict[str, Any] | None = None
    if config is not None:
        cfg, where = read_config_yaml(config), config
    else:
        ckpt = _lightning_checkpoint(path)
        cfg, where = read_checkpoint_config(ckpt, path), f"{path} (hyper_parameters.cfg)"

    def weights() -> tuple[dict[str, Any], str]:
        if ema_checkpoint is not None:
            return read_ema_weights(ema_checkpoint), ema_checkpoint
        state = (ckpt if ckpt is not None else _lightning_checkpoint(path))["state_dict"]
        return _tensors(dict(state), path), path

    return _stage(cfg, where, weights, t5=t5, tokenizer=tokenizer, lowres_size=lowres_size)


def save_nemo(stage: ImagenStage, path: str) -> None:
    """Write ``stage``'s UNet and configuration as a NeMo Imagen ``.nemo`` (T5 not included); a base
    UNet with ``low_res_cond`` is written as ``unet_type: sr-unet``, as NeMo's configs name it."""
    import yaml

    kind, unet = unet_options(stage.unet)
    unet_type = "sr-unet" if unet.get("low_res_cond") else kind
    unet = {k: v for k, v in unet.items()
            if k != "text_embed_dim" and not (unet_type != "base" and k == "noise_cond_aug")}
    p = stage.precond
    if p.kind == "edm":
        pre_type, pre = "EDM", {"loss_type": "l2", "sigma_data": p.sigma_data, "p_mean": p.p_mean, "p_std": p.p_std}
    else:
        objective = {v: k for k, v in _OBJECTIVES.items()}[p.objective]
        pre_type, pre = "DDPM", {"loss_type": "l2", "pred_objective": objective, "noise_schedule": p.log_snr}
    cfg = {"unet_type": unet_type, "unet": unet, "noise_cond_aug": bool(stage.unet.config.noise_cond_aug),
           "conditioning": {"embed_dim": stage.unet.config.text_embed_dim,
                            "token_length": int(stage.text_encoder.max_length)},
           "preconditioning_type": pre_type, "preconditioning": pre}
    weights = io.BytesIO()
    tensors = {k: v.detach().cpu() for k, v in stage.unet.state_dict().items()}
    if kind == "base":  # NeMo's UNetModel state dict also names its first conv init_conv.0
        tensors.update({alias: tensors[name] for alias, name in _INIT_CONV_ALIAS.items()})
    torch.save({UNET_PREFIX + k: v for k, v in tensors.items()}, weights)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in ((CONFIG_MEMBER, yaml.safe_dump(cfg).encode()), (WEIGHTS_MEMBER, weights.getvalue())):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    atomic_write_bytes(path, archive.getvalue())
