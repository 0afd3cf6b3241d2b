"""The run configuration: what one ``t2i-engine run CONFIG.toml`` job is made of.

Top-level tables of a config file:

==================  ===========================  =============================================
table               selector key                 validated by
==================  ===========================  =============================================
``[engine]``        (none)                       :class:`EngineConfig`
``[task]``          ``name``                     the registered task's ``Config``
``[model]``         ``type``                     the registered model's ``Config``
``[sampler]``       ``name``                     the registered sampler's ``Config``
``[schedule]``      ``type``                     the registered schedule's ``Config``
``[data]``          ``type``                     the registered dataset's ``Config``
``[train]``         (none)                       ``t2i_engine.training.config.TrainConfig``
``[guidance]``      (none)                       ``t2i_engine.diffusion.guidance.GuidanceConfig``
``[[conditioners]]`` ``type``                    each registered conditioner's ``Config``
``[[adapters]]``     (none)                       ``t2i_engine.adapters.config.AdapterEntry`` (LoRA)
==================  ===========================  =============================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs

from t2i_engine.config.fields import option
from t2i_engine.config.limits import seed_value

Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]


@attrs.frozen
class EngineConfig:
    """``[engine]``: what every job shares."""

    plugins: list[str] = option(factory=list, help="plugins the job needs; a missing one is an error")
    seed: int = option(default=0, validator=seed_value,
                       help="global seed in [0, 2**63-1]; per-image seeds derive from it")
    device: str = option(default="auto", help="auto, cpu, cuda or cuda:N")
    precision: Precision = option(default="32-true", help="numeric precision for sampling and training")
    output_dir: str = option(default="outputs", help="where the job writes; relative to the config file")


@attrs.frozen
class ComponentConfig:
    """One selected component: its kind, registered name, validated options, and provider."""

    kind: str
    name: str
    options: Any  # an instance of the factory's Config, or None when it declares none
    plugin: str


@attrs.frozen
class RunConfig:
    """A fully validated job configuration."""

    engine: EngineConfig
    task: ComponentConfig
    model: ComponentConfig | None = None
    sampler: ComponentConfig | None = None
    schedule: ComponentConfig | None = None
    data: ComponentConfig | None = None
    train: Any = None  # TrainConfig or None
    guidance: Any = None  # GuidanceConfig or None
    conditioners: list[ComponentConfig] = attrs.field(factory=list)
    adapters: list[Any] = attrs.field(factory=list)  # [[adapters]]: t2i_engine.adapters.config.AdapterEntry
    source: Path | None = None  # the config file, when loaded from one

    @property
    def output_dir(self) -> Path:
        """``engine.output_dir`` resolved against the config file's folder."""
        out = Path(self.engine.output_dir).expanduser()
        if not out.is_absolute() and self.source is not None:
            out = self.source.parent / out
        return out.resolve()


COMPONENT_TABLES: dict[str, tuple[str, str]] = {
    "task": ("task", "name"),
    "model": ("model", "type"),
    "sampler": ("sampler", "name"),
    "schedule": ("schedule", "type"),
    "data": ("dataset", "type"),
}
"""Top-level table -> (registry kind, selector key)."""

TOP_LEVEL = ("engine", *COMPONENT_TABLES, "train", "guidance", "conditioners", "adapters")
