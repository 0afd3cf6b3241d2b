"""The task example: plugin module and test."""

PLUGIN = '''"""The $name plugin: a task (``[task] name = "$name-hello"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from t2i_sdk import RunContext, hookimpl, option


class Hello:
    """A task that writes a greeting to engine.output_dir/hello.txt."""

    @attrs.frozen
    class Config:
        greeting: str = option(default="hello", help="what to write")

    def __init__(self, config: Config) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Mapping[str, Any]:
        path = ctx.output_dir / "hello.txt"
        path.write_text(self.config.greeting + "\\n")
        return {"wrote": str(path)}


@hookimpl
def register_tasks() -> Mapping[str, Any]:
    return {"$name-hello": Hello}
'''

TEST = '''import t2i_plugin_${module}.plugin as plugin
from t2i_sdk.testing import check_plugin


def test_conforms() -> None:
    registers = check_plugin(plugin, name="$name")
    assert registers == {"task": ["$name-hello"]}
'''
