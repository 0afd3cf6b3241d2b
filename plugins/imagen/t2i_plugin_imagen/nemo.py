"""NeMo Imagen ``.nemo`` archives (``MegatronImagen``): read into an :class:`ImagenStage`, and
write (the same layout, for a round trip and for NeMo users).

A ``.nemo`` is a tar with ``model_config.yaml`` (read with ``yaml.safe_load``) and
``model_weights.ckpt`` (a state dict, read only with ``torch.load(weights_only=True)``). The UNet's
tensors are ``model.model.unet.<name>`` (``MegatronImagen.model`` = ``Imagen``, whose ``model`` is
the preconditioning wrapper holding ``unet``), with the names of
:mod:`t2i_plugin_imagen.imagen_unet`. The yaml fields that change the computation are read
(``unet_type``, ``unet``, ``conditioning.embed_dim`` / ``token_length``, ``noise_cond_aug``,
``preconditioning_type`` and ``preconditioning``) or refused naming the field. NeMo encodes text
with an external T5 (precached embeddings), so the user's T5 folders come with the archive.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

import torch
from torch import Tensor

from t2i_engine.checkpoint.io import atomic_write_bytes, load_state_dict_strict
from t2i_engine.checkpoint.nemo import CONFIG_MEMBER, WEIGHTS_MEMBER, archive_member, read_archive_weights
from t2i_engine.errors import CheckpointError
from t2i_plugin_imagen.imagen_unet import build_unet, unet_options
from t2i_plugin_imagen.precond import Preconditioning
from t2i_plugin_imagen.stage import ImagenStage
from t2i_plugin_imagen.text_encoder import T5TextEncoder

UNET_PREFIX = "model.model.unet."
# unet: keys NeMo reads that do not change the forward pass (memory, kernels, backward numerics)
NEUTRAL_UNET_KEYS = ("gradient_checkpointing", "stable_attention", "flash_attention")
_OBJECTIVES = {"noise": "eps", "x_start": "x0"}


def _member(path: str, name: str) -> bytes:
    data = archive_member(path, name)
    if data is None:
        raise CheckpointError(f"{path}: the .nemo archive has no {name}")
    return data


def read_nemo(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state dict)`` of a ``.nemo`` archive (the config's ``model:`` level unwrapped)."""
    import yaml

    if not tarfile.is_tarfile(path):
        raise CheckpointError(f"{path}: not a .nemo archive (a tar file)")
    cfg = yaml.safe_load(_member(path, CONFIG_MEMBER)) or {}
    cfg = cfg.get("model", cfg)
    return cfg, read_archive_weights(path)


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


def load_nemo_stage(path: str, *, t5: str, tokenizer: str, lowres_size: int | None = None) -> ImagenStage:
    """A stage from a NeMo Imagen ``.nemo`` and the user's T5 folders (``T5EncoderModel`` and
    ``spiece.model``); ``lowres_size`` is the input side of a super-resolution stage."""
    cfg, state = read_nemo(path)
    unet_type = cfg.get("unet_type", "base")
    if unet_type not in ("base", "sr"):
        raise CheckpointError(f"{path}: unet_type = {unet_type!r} is not supported (base, sr)")
    options = {k: v for k, v in dict(cfg.get("unet") or {}).items() if k not in NEUTRAL_UNET_KEYS}
    conditioning = dict(cfg.get("conditioning") or {})
    if "embed_dim" not in conditioning:
        raise CheckpointError(f"{path}: conditioning.embed_dim (the T5 width) is missing")
    options["text_embed_dim"] = int(conditioning["embed_dim"])
    if unet_type == "sr":
        options["noise_cond_aug"] = bool(cfg.get("noise_cond_aug", False))
    try:
        unet = build_unet(unet_type, options)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_config.yaml unet: {e}") from e
    unet_state = {k[len(UNET_PREFIX):]: v.float() for k, v in state.items() if k.startswith(UNET_PREFIX)}
    others = sorted(k for k in state if not k.startswith(UNET_PREFIX))
    if others:
        raise CheckpointError(f"{path}: tensors outside {UNET_PREFIX}*: {others[:5]}")
    load_state_dict_strict(unet, unet_state, source=f"{path} (unet)")
    text = T5TextEncoder.from_folders(t5, tokenizer, max_length=int(conditioning.get("token_length", 128)),
                                      zero_padding=True, lowercase=False, zero_empty=True)
    size = int(options.get("image_size", unet.config.image_size))
    return ImagenStage(unet, text, _precond(cfg, path), image_size=size, lowres_size=lowres_size).eval()


def save_nemo(stage: ImagenStage, path: str) -> None:
    """Write ``stage``'s UNet and configuration as a NeMo Imagen ``.nemo`` (T5 not included)."""
    import yaml

    kind, unet = unet_options(stage.unet)
    unet = {k: v for k, v in unet.items() if k != "text_embed_dim" and not (kind == "sr" and k == "noise_cond_aug")}
    p = stage.precond
    if p.kind == "edm":
        pre_type, pre = "EDM", {"loss_type": "l2", "sigma_data": p.sigma_data, "p_mean": p.p_mean, "p_std": p.p_std}
    else:
        objective = {v: k for k, v in _OBJECTIVES.items()}[p.objective]
        pre_type, pre = "DDPM", {"loss_type": "l2", "pred_objective": objective, "noise_schedule": p.log_snr}
    cfg = {"unet_type": kind, "unet": unet, "noise_cond_aug": bool(stage.unet.config.noise_cond_aug),
           "conditioning": {"embed_dim": stage.unet.config.text_embed_dim,
                            "token_length": int(stage.text_encoder.max_length)},
           "preconditioning_type": pre_type, "preconditioning": pre}
    weights = io.BytesIO()
    torch.save({UNET_PREFIX + k: v.detach().cpu() for k, v in stage.unet.state_dict().items()}, weights)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in ((CONFIG_MEMBER, yaml.safe_dump(cfg).encode()), (WEIGHTS_MEMBER, weights.getvalue())):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    atomic_write_bytes(path, archive.getvalue())
