"""A plugin's own validators get the core's error quality: the dotted key and its line."""

from __future__ import annotations

import types
from pathlib import Path

import attrs
import pytest

from t2i_engine.config.loader import load_config
from t2i_engine.errors import ConfigError
from t2i_engine.hookspecs import hookimpl
from t2i_engine.plugins.manager import EnginePluginManager


def _odd(instance: object, attribute: object, value: int) -> None:
    if value % 2 == 0:
        raise ValueError("must be odd")  # names no field: the loader has to find it


def _positive(instance: object, attribute: object, value: float) -> None:
    if value <= 0:
        raise AssertionError("not positive")  # not even a ValueError


class Picky:
    @attrs.frozen
    class Config:
        size: int = 3
        width: int = attrs.field(default=1, validator=_odd)
        strength: float = attrs.field(default=1.0, validator=_positive)

    def __init__(self, config: Config) -> None:
        self.config = config

    def residuals(self, x_t: object, t: object, cond: object) -> None:
        return None


def _pm() -> EnginePluginManager:
    pm = EnginePluginManager().load(autoload=False)
    module = types.ModuleType("picky_plugin")
    module.register_conditioners = hookimpl(lambda: {"picky": Picky})  # type: ignore[attr-defined]
    module.register_samplers = hookimpl(lambda: {"picky-sampler": Picky})  # type: ignore[attr-defined]
    pm.register(module, name="picky")
    return pm


@pytest.mark.parametrize(("table", "key", "message"), [
    ('[[conditioners]]\ntype = "picky"\nsize = 5\nwidth = 4\n', "conditioners[0].width", "must be odd"),
    ('[[conditioners]]\ntype = "picky"\nstrength = -1.0\nwidth = 3\n', "conditioners[0].strength", "not positive"),
    ('[sampler]\nname = "picky-sampler"\nwidth = 2\n', "sampler.width", "must be odd"),
])
def test_a_plugin_validator_error_names_its_key_and_line(tmp_path: Path, table: str, key: str, message: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'[task]\nname = "preview-data"\n{table}')
    leaf = key.rsplit(".", 1)[1]
    line = next(i for i, text in enumerate(job.read_text().splitlines(), 1) if text.startswith(f"{leaf} ="))
    with pytest.raises(ConfigError) as info:
        load_config(job, _pm())
    assert str(info.value) == f"{key}: {message} ({job}:{line})"
