"""Load a TOML config into a :class:`~t2i_engine.config.schema.RunConfig`.

Steps: parse (syntax errors name file, line and column), apply ``--set`` overrides, check the
top-level tables, validate ``[engine]``, load and require the plugins it lists, then validate
each component table against the ``Config`` of the component it selects. Every failure is a
:class:`~t2i_engine.errors.ConfigError` whose message names the dotted key and the file:line.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from t2i_engine.config.paths import BASE_DIR
from t2i_engine.config.schema import COMPONENT_TABLES, TOP_LEVEL, ComponentConfig, EngineConfig, RunConfig
from t2i_engine.config.structure import Locate, structure
from t2i_engine.errors import ConfigError
from t2i_engine.plugins.manager import EnginePluginManager, did_you_mean

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")


def index_lines(text: str) -> dict[str, int]:
    """Map dotted keys and table names to the (1-based) line that defines them.

    Array-of-tables entries are indexed as ``name[i]``. This is a light scanner for error
    messages, not a TOML parser; keys it cannot place are simply not found.
    """
    where: dict[str, int] = {}
    counts: dict[str, int] = {}
    table = ""
    for lineno, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            name = header.group(2).replace('"', "").replace("'", "").strip()
            if header.group(1) == "[[":
                i = counts.get(name, 0)
                counts[name] = i + 1
                name = f"{name}[{i}]"
            table = name
            where.setdefault(table, lineno)
            continue
        key = _KEY.match(line)
        if key:
            k = key.group(1).strip("\"'")
            where.setdefault(f"{table}.{k}" if table else k, lineno)
    return where


def _dotted(parts: list[str]) -> str:
    """``["conditioners", "0", "type"]`` -> ``conditioners[0].type`` (how errors name keys)."""
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() and out else f".{part}" if out else part
    return out


def _parent_key(key: str) -> str:
    """``a.b[2]`` -> ``a.b``, ``a.b`` -> ``a``, ``a`` -> ``""``."""
    if key.endswith("]") and "[" in key:
        return key[:key.rindex("[")]
    return key.rsplit(".", 1)[0] if "." in key else ""


def make_locator(source: Path | None, text: str | None, *,
                 overrides: Iterable[str] = ()) -> Locate:
    """A function giving `` (file:line)`` for a dotted key, falling back to its parents; a key
    that a ``--set`` gave (or lies inside one) is placed at that ``--set`` instead."""
    lines = index_lines(text) if text is not None else {}
    set_at = {_dotted(parse_override(item)[0]): item for item in overrides}

    def in_file(key: str) -> int | None:
        return lines.get(key, lines.get(f"{key}[0]"))

    def locate(key: str) -> str:
        for set_key, item in reversed(set_at.items()):  # the last --set of a key wins
            if key == set_key or key.startswith((f"{set_key}.", f"{set_key}[")):
                return f" (--set {item})"
        if in_file(key) is None:  # a table only a --set created
            made = [item for set_key, item in set_at.items() if set_key.startswith(f"{key}.")]
            if made:
                return f" (--set {made[-1]})"
        if source is None or text is None:
            return ""
        probe = key
        while probe:
            if (line := in_file(probe)) is not None:
                return f" ({source}:{line})"
            probe = _parent_key(probe)
        return f" ({source})"

    return locate


def _check_utf8(where: str, raw: str) -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates: refuse them here."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:
        offset = len(raw[:exc.start].encode("utf-8", "surrogateescape"))
        raise ConfigError(f"{where}: not valid UTF-8 (byte offset {offset}); config values must "
                          "be UTF-8 text") from None


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    except RecursionError:
        raise ConfigError(f"--set value {raw[:40]!r}...: arrays or inline tables nested too deeply "
                          "for the TOML parser") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``key.path=value`` -> (["key", "path"], value); the value is read as TOML, else a string."""
    _check_utf8(f"--set {item.encode('utf-8', 'replace').decode()!r}", item)
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: the key is empty")
    return parts, _parse_value(raw.strip())


def _child(node: Any, part: str, item: str, where: str) -> Any:
    """``node[part]`` for a table or an array of tables (index), or a ConfigError."""
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"--set {item!r}: '{where}' is an array of {len(node)}; use an index "
                              f"0..{len(node) - 1}")
        return node[int(part)]
    return node.setdefault(part, {})


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> None:
    """Set each ``key.path=value`` in ``data`` (creating tables as needed)."""
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, item, ".".join(parts[:i]) or part)
            if not isinstance(node, dict | list):
                raise ConfigError(f"--set {item!r}: '{'.'.join(parts[:i + 1])}' is not a table")
        if isinstance(node, list):
            raise ConfigError(f"--set {item!r}: '{'.'.join(parts[:-1])}' is an array of tables; "
                              f"name an entry, e.g. {'.'.join(parts[:-1])}.0.{parts[-1]}=...")
        node[parts[-1]] = value


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{path}:{line}:{col}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); TOML files must be UTF-8 text") from None


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Parse ``path``; a missing or unreadable file, bytes that are not UTF-8, nesting deeper
    than the parser can recurse, or a syntax error is a ConfigError with file (and line:col)."""
    if path.is_dir():
        raise ConfigError(f"'{path}' is a folder; give the job's TOML file")
    if not path.exists():
        raise ConfigError(f"config file not found: '{path}'")
    try:
        text = _decode(path, path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the config file '{path}': {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text), text
    except RecursionError:
        raise ConfigError(f"{path}: arrays or inline tables nested too deeply for the TOML parser "
                          "(Python's recursion limit); flatten the value") from None
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        col = getattr(exc, "colno", None)
        msg = getattr(exc, "msg", str(exc))
        if line is None:  # Python < 3.14: position only inside the message "(at line L, column C)"
            found = re.search(r"at line (\d+), column (\d+)", str(exc))
            if found:
                line, col = int(found.group(1)), int(found.group(2))
                msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        where = f"{path}:{line}:{col}" if line is not None else str(path)
        raise ConfigError(f"{where}: TOML syntax error: {msg}") from exc


def _component(pm: EnginePluginManager, table_name: str, table: Any, locate: Locate,
               *, kind: str, selector: str) -> ComponentConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{table_name}: expected a table, got {table!r}{locate(table_name)}")
    if selector not in table:
        raise ConfigError(f"{table_name}.{selector}: required key is missing (which {kind} to use)"
                          f"{locate(table_name)}")
    name = table[selector]
    if not isinstance(name, str):
        raise ConfigError(f"{table_name}.{selector}: expected a string, got {name!r}"
                          f"{locate(f'{table_name}.{selector}')}")
    try:
        reg = pm.get(kind, name, key=f"{table_name}.{selector}")
    except ConfigError as exc:
        raise ConfigError(f"{exc}{locate(f'{table_name}.{selector}')}") from None
    schema = getattr(reg.factory, "Config", None)
    if schema is None:
        extra = [k for k in table if k != selector]
        if extra:
            raise ConfigError(f"{table_name}.{extra[0]}: unknown key; {kind} '{name}' takes no "
                              f"options{locate(f'{table_name}.{extra[0]}')}")
        options = None
    else:
        options = structure(schema, table, table_name, locate, ignore=(selector,))
    return ComponentConfig(kind=kind, name=name, options=options, plugin=reg.plugin)


def resolve_config(data: dict[str, Any], pm: EnginePluginManager, *, source: Path | None = None,
                   text: str | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Validate parsed TOML ``data`` into a RunConfig, loading plugins as ``[engine]`` asks
    (``overrides``: the ``--set`` items already applied, so errors point at them)."""
    locate = make_locator(source, text, overrides=overrides)
    token = BASE_DIR.set(source.parent.resolve() if source is not None else None)
    try:
        for key in data:
            if key not in TOP_LEVEL:
                raise ConfigError(f"{key}: unknown table{did_you_mean(key, TOP_LEVEL)}; valid "
                                  f"tables: {', '.join(TOP_LEVEL)}{locate(key)}")
        engine = structure(EngineConfig, data.get("engine", {}), "engine", locate)
        pm.load()
        try:
            pm.require(engine.plugins)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{locate('engine.plugins')}") from None
        if "task" not in data:
            raise ConfigError(f"task: the [task] table is missing (name = the job to run)"
                              f"{f' ({source})' if source else ''}")
        parts: dict[str, Any] = {}
        for table_name, (kind, selector) in COMPONENT_TABLES.items():
            if table_name in data:
                parts[table_name] = _component(pm, table_name, data[table_name], locate,
                                               kind=kind, selector=selector)
        from t2i_engine.conditioning.config import resolve_conditioners

        conds = resolve_conditioners(pm, data.get("conditioners", []), locate)  # core keys + each one's Config
        train = None
        if "train" in data:
            from t2i_engine.training.config import TrainConfig

            table = data["train"]
            # a task may change [train]'s defaults (ControlNet: lr 1e-5); keys the job gives win
            defaults = getattr(pm.get("task", parts["task"].name).factory, "train_defaults", None) \
                if "task" in parts and isinstance(table, dict) else None
            train = structure(TrainConfig, {**defaults, **table} if defaults else table, "train", locate)
        guidance = None
        if "guidance" in data:
            from t2i_engine.diffusion.guidance import GuidanceConfig

            guidance = structure(GuidanceConfig, data["guidance"], "guidance", locate)
        from t2i_engine.adapters.config import structure_adapters

        adapters = structure_adapters(data.get("adapters", []), locate)
        return RunConfig(engine=engine, train=train, guidance=guidance, conditioners=conds, adapters=adapters,
                         source=source.resolve() if source else None, **parts)
    finally:
        BASE_DIR.reset(token)


def load_config(path: str | Path, pm: EnginePluginManager, *, overrides: Iterable[str] = ()) -> RunConfig:
    """Read, override and validate the config file at ``path``."""
    source = Path(path)
    data, text = read_toml(source)
    overrides = list(overrides)
    apply_overrides(data, overrides)
    return resolve_config(data, pm, source=source, text=text, overrides=overrides)
