"""Hook implementations of the Imagen plugin (entry point ``imagen``)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from t2i_engine.config.fields import existing_path, option
from t2i_engine.hookspecs import hookimpl
from t2i_plugin_imagen.precond import Preconditioning
from t2i_plugin_imagen.stage import NoiseAugConfig
from t2i_plugin_imagen.word_t5 import WordT5Config


def _positive(inst: Any, attr: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"'{attr.name}' must be a positive integer, got {value!r}")


@attrs.frozen
class ImagenConfig:
    """``[model] type = "imagen"``."""

    checkpoint: str = existing_path(kind="dir", help="a diffusers DeepFloyd IF folder (IFPipeline stage I)")
    token_length: int = option(default=77, validator=_positive, help="T5 tokens per prompt (IF: 77, NeMo: 128)")
    zero_padding: bool = option(default=False, validator=attrs.validators.instance_of(bool),
                                help="zero the T5 states at padding positions (NeMo, imagen-pytorch; IF does not)")


def build_imagen(config: ImagenConfig) -> Any:
    """An IF stage from ``checkpoint`` (architecture read from its configs)."""
    from t2i_plugin_imagen.model import load_if_stage

    from t2i_engine.errors import ConfigError

    stage = load_if_stage(config.checkpoint, max_length=config.token_length)
    if stage.stage != 1:
        raise ConfigError(f"model.checkpoint: {config.checkpoint} is an IF stage II (super-resolution) folder; "
                          "the sample task runs stage I (stage II: a [[task.stages]] entry of imagen-cascade)")
    stage.text_encoder.zero_padding = config.zero_padding
    return stage


build_imagen.Config = ImagenConfig  # type: ignore[attr-defined]


@attrs.frozen
class ImagenStageConfig:
    """``[model] type = "imagen-stage"``: one Imagen UNet stage, from a file or built from keys."""

    checkpoint: str | None = existing_path(default=None, kind="file",
                                           help="a stage written by this plugin (.safetensors), a NeMo Imagen "
                                           ".nemo or a NeMo Imagen Lightning .ckpt; or give the keys below")
    t5: str | None = existing_path(default=None, kind="dir", help="NeMo .nemo / .ckpt only: the T5EncoderModel folder")
    tokenizer: str | None = existing_path(default=None, kind="dir",
                                          help="NeMo .nemo / .ckpt only: the T5 tokenizer folder")
    ema_checkpoint: str | None = existing_path(
        default=None, kind="file", help="NeMo .nemo / .ckpt only: NeMo's <name>-EMA.ckpt; its EMA weights replace the "
        "checkpoint's (default: the trained weights, as NeMo's inference)")
    nemo_config: str | None = existing_path(
        default=None, kind="file", help="NeMo .ckpt only: the run's hparams.yaml (cfg:) or NeMo config yaml (model:); "
        "default: the checkpoint's hyper_parameters.cfg")
    unet_type: Literal["base", "sr"] | None = option(default=None, help="base UNet or Efficient U-Net (sr)")
    unet: dict[str, Any] | None = option(default=None, help="the UNet's keys (NeMo's names, see docs/imagen.md)")
    text: WordT5Config | None = option(default=None, help="the word-level T5 encoder")
    text_from: str | None = existing_path(default=None, kind="file",
                                          help="take the T5 encoder (keys and weights) from this stage file")
    precond: Preconditioning | None = option(default=None, help="edm (default) or continuous-ddpm")
    image_size: int | None = option(default=None, help="the side this stage generates")
    lowres_size: int | None = option(default=None, help="super-resolution: the side of the low-res input")
    noise_aug: NoiseAugConfig | None = option(default=None, help="augmentation of the low-res input")
    seed: int = option(default=0, help="initialisation seed of a stage built from keys")
    save_dtype: Literal["float32", "float16"] = option(default="float32", help="dtype of the tensors save() writes")


def build_imagen_stage(config: ImagenStageConfig) -> Any:
    """An Imagen stage from ``checkpoint`` or, for training from scratch, from its keys."""
    from t2i_plugin_imagen.stage import build_stage, load_imagen_stage, load_text_encoder, stage_text_config

    from t2i_engine.errors import ConfigError

    keys = ("unet_type", "unet", "text", "text_from", "precond", "image_size", "lowres_size", "noise_aug")
    if config.checkpoint is not None and config.checkpoint.endswith((".nemo", ".ckpt")):
        return _nemo_stage(config)
    nemo_keys = ("t5", "tokenizer", "ema_checkpoint", "nemo_config")
    if any(getattr(config, k) is not None for k in nemo_keys):
        raise ConfigError("model.t5 / model.tokenizer / model.ema_checkpoint / model.nemo_config: only for a NeMo "
                          ".nemo or .ckpt checkpoint")
    if config.checkpoint is not None:
        given = [k for k in keys if getattr(config, k) is not None]
        if given:
            raise ConfigError(f"model: {', '.join(given)} cannot be set with checkpoint (the file holds the "
                              "architecture); remove them or the checkpoint")
        stage = load_imagen_stage(config.checkpoint)
        stage.save_dtype = config.save_dtype
        return stage
    missing = [k for k in ("unet_type", "unet", "image_size") if getattr(config, k) is None]
    if config.text is None and config.text_from is None:
        missing.append("text (or text_from)")
    if missing:
        raise ConfigError(f"model: an imagen-stage without checkpoint needs {', '.join(missing)}")
    try:
        text = config.text or stage_text_config(config.text_from)  # type: ignore[arg-type]
        stage = build_stage(unet_type=config.unet_type, unet=config.unet, text=text,  # type: ignore[arg-type]
                            precond=config.precond or Preconditioning(), image_size=config.image_size,  # type: ignore[arg-type]
                            lowres_size=config.lowres_size, noise_aug=config.noise_aug, seed=config.seed)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.unet: {e}") from e
    if config.text_from is not None:
        load_text_encoder(stage, config.text_from)
    stage.save_dtype = config.save_dtype
    return stage


def _nemo_stage(config: ImagenStageConfig) -> Any:
    """A stage from a NeMo ``.nemo`` archive or Lightning ``.ckpt`` (the architecture from its config)."""
    from t2i_plugin_imagen.nemo import load_nemo_checkpoint_stage, load_nemo_stage

    from t2i_engine.errors import ConfigError

    archive = config.checkpoint.endswith(".nemo")  # type: ignore[union-attr]
    kind = ".nemo" if archive else ".ckpt"
    given = [k for k in ("unet_type", "unet", "text", "text_from", "precond", "image_size", "noise_aug")
             if getattr(config, k) is not None]
    if given:
        raise ConfigError(f"model: {', '.join(given)} cannot be set with a NeMo {kind} checkpoint (its NeMo config "
                          "holds the architecture)")
    if config.t5 is None or config.tokenizer is None:
        raise ConfigError(f"model: a NeMo {kind} checkpoint needs t5 and tokenizer (NeMo encodes text with an "
                          "external T5)")
    folders = dict(t5=config.t5, tokenizer=config.tokenizer, lowres_size=config.lowres_size,
                   ema_checkpoint=config.ema_checkpoint)
    if archive:
        if config.nemo_config is not None:
            raise ConfigError("model.nemo_config: only for a NeMo .ckpt (a .nemo holds its model_config.yaml)")
        return load_nemo_stage(config.checkpoint, **folders)  # type: ignore[arg-type]
    return load_nemo_checkpoint_stage(config.checkpoint, config=config.nemo_config, **folders)  # type: ignore[arg-type]


build_imagen_stage.Config = ImagenStageConfig  # type: ignore[attr-defined]


@hookimpl
def register_models() -> dict[str, Any]:
    """``imagen``: pixel-space DeepFloyd IF stages (the core's ``sample`` task drives stage I);
    ``imagen-stage``: an Imagen UNet stage (base or super-resolution) of this plugin's format."""
    return {"imagen": build_imagen, "imagen-stage": build_imagen_stage}


@hookimpl
def register_tasks() -> dict[str, Any]:
    """``imagen-cascade`` (sample base -> SR stages into one grid) and ``imagen-shapes-eval``
    (prompt adherence of a cascade on a shapes split)."""
    from t2i_plugin_imagen.cascade_task import CascadeEvalTask, CascadeTask

    return {"imagen-cascade": CascadeTask, "imagen-shapes-eval": CascadeEvalTask}
