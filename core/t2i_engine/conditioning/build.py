"""Building a run's ``[[conditioners]]`` once, and refusing them where a task cannot apply them."""

from __future__ import annotations

from typing import Any

import torch

from t2i_engine.conditioning.chain import ConditionerChain, Entry
from t2i_engine.errors import ConfigError, T2IError
from t2i_engine.interfaces import LatentDiffusionModel, RunContext

__all__ = ["applies_conditioners", "build_conditioners", "check_conditioner", "refuse_conditioners"]


def check_conditioner(obj: Any, *, label: str = "conditioner") -> None:
    """A ConfigError naming ``label`` unless ``obj`` implements ``condition`` or ``residuals``
    (see :class:`~t2i_engine.interfaces.Conditioner`)."""
    if not any(callable(getattr(obj, m, None)) for m in ("condition", "residuals")):
        raise ConfigError(f"{label}: built a {type(obj).__name__}, which implements neither condition() nor "
                          "residuals(); a conditioner needs at least one (see docs/contracts.md)")


def _label(i: int, component: Any) -> str:
    return f"conditioners[{i}] (type '{component.name}', plugin '{component.plugin}')"


def build_conditioners(ctx: RunContext, model: LatentDiffusionModel, *,
                       dtype: torch.dtype | None = None) -> ConditionerChain | None:
    """Build every ``[[conditioners]]`` entry of the run in declared order, call each one's
    ``setup(model)`` once and return the chain on the run's device (None when there are none);
    ``dtype`` casts the conditioners' floating-point weights (a ``*-true`` precision).

    A constructor or ``setup`` that raises is a ConfigError naming the entry and its line (the
    job exits 2).
    """
    entries = []
    for i, component in enumerate(ctx.config.conditioners):
        label, where = _label(i, component), getattr(component, "where", "")
        try:
            obj = ctx.plugins.build(component)
        except T2IError as exc:
            raise ConfigError(f"{label}: {exc}{where}") from exc
        except Exception as exc:  # noqa: BLE001 - a plugin's constructor: name it, exit 2
            raise ConfigError(f"{label}: could not be built: {type(exc).__name__}: {exc}{where}") from exc
        check_conditioner(obj, label=f"{label}{where}")
        setup = getattr(obj, "setup", None)
        if callable(setup):
            try:
                setup(model)
            except Exception as exc:  # noqa: BLE001 - same: a plugin's failure, named
                raise ConfigError(f"{label}: setup(model) failed: {type(exc).__name__}: {exc}{where}") from exc
        keys = getattr(component, "keys", None)
        entries.append(Entry(obj, keys=keys, label=label) if keys is not None else Entry(obj, label=label))
    if not entries:
        return None
    chain = ConditionerChain(entries).to(ctx.device)
    return chain.to(dtype) if dtype is not None and dtype != torch.float32 else chain


def applies_conditioners(task: Any) -> bool:
    """Whether a task applies ``[[conditioners]]`` (its class sets ``applies_conditioners = True``
    and builds them with :func:`build_conditioners`)."""
    return bool(getattr(task, "applies_conditioners", False))


def refuse_conditioners(config: Any, task: Any) -> None:
    """A ConfigError when the job lists ``[[conditioners]]`` and its task does not apply them."""
    if config.conditioners and not applies_conditioners(task):
        first = config.conditioners[0]
        raise ConfigError(f"conditioners: task '{config.task.name}' does not apply [[conditioners]] "
                          f"({len(config.conditioners)} given, the first '{first.name}'"
                          f"{getattr(first, 'where', '')}); core tasks that do: sample, sample-grid, serve, "
                          "train, precache (and plugin tasks that declare it). "
                          "Remove the entries or pick one of those tasks")
