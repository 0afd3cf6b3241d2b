"""Hook implementations of the Imagen plugin (entry point ``imagen``)."""

from __future__ import annotations

from typing import Any

import attrs

from t2i_engine.config.fields import existing_path, option
from t2i_engine.hookspecs import hookimpl


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
                          "the sample task runs stage I (stage II: t2i_plugin_imagen.model.IFStage.generate)")
    stage.text_encoder.zero_padding = config.zero_padding
    return stage


build_imagen.Config = ImagenConfig  # type: ignore[attr-defined]


@hookimpl
def register_models() -> dict[str, Any]:
    """``imagen``: pixel-space DeepFloyd IF stages (the core's ``sample`` task drives stage I)."""
    return {"imagen": build_imagen}
