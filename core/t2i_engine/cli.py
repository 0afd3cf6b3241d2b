"""``t2i-engine``: the one command for every job.

    t2i-engine run CONFIG.toml [--set key.path=value ...] [--debug]
    t2i-engine run --from-png IMAGE.png [--set ...] re-run the job recorded in a sample PNG
    t2i-engine serve CONFIG.toml [--host H] [--port P] [--set ...]
                                                    serve a job's model over HTTP: an API and a
                                                    web page ([task] name = "serve", docs/serving.md)
    t2i-engine config CONFIG.toml [--set ...] [--explain]
                                                    print the resolved config, defaults filled in
                                                    (--explain: each key's help as a comment)
    t2i-engine plugins [--json]                     installed plugins and what each registers
    t2i-engine new-plugin NAME [--kind KIND] [--dir DIR]
                                                    scaffold a plugin distribution (KIND: conditioner,
                                                    sampler, model or task)
    t2i-engine --version                            engine, SDK, plugin, torch, CUDA, Triton versions

Exit status: 0 on success, 2 for a configuration or plugin error (one readable message on
stderr, a traceback only with ``--debug``), 1 for any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from t2i_engine.errors import ConfigError, T2IError


class _VersionAction(argparse.Action):
    """``--version``: the report a bug needs (built only when asked: it imports torch)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from t2i_engine.utils.versions import version_report

        print(version_report())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i-engine", description="Plugin-based text-to-image engine.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print engine, SDK, plugin, torch, CUDA and Triton versions and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", help="the job's TOML file")
        p.add_argument("--from-png", metavar="PNG", help="instead of a TOML file: the job recorded in a PNG "
                       "the sample task wrote (it writes beside the PNG, in <name>-rerun/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value, e.g. --set sampler.steps=30 (repeatable)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    with_config(sub.add_parser("run", help="run the job a config describes"))
    p = sub.add_parser("serve", help="serve a job's model: HTTP API and web page ([task] name = \"serve\")")
    with_config(p)
    p.add_argument("--host", help="address to listen on (overrides task.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (overrides task.port; 0: any free port)")
    p = sub.add_parser("config", help="print the resolved config with every default")
    with_config(p)
    p.add_argument("--explain", action="store_true", help="add each key's help text as a comment")
    p = sub.add_parser("plugins", help="list installed plugins and what they register")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show load tracebacks")
    p = sub.add_parser("new-plugin", help="write a new plugin distribution to start from")
    p.add_argument("name", help="plugin name (the distribution is t2i-plugin-NAME; t2i-plugin-NAME is accepted)")
    p.add_argument("--kind", default="task", choices=("conditioner", "sampler", "model", "task"),
                   help="what the example plugin registers (default: task)")
    p.add_argument("--dir", default=".", help="folder to create it in")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get("T2I_DEBUG") == "1"
    try:
        if args.command == "run":
            return _cmd_run(args, debug=debug)
        if args.command == "serve":
            return _cmd_serve(args, debug=debug)
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "plugins":
            return _cmd_plugins(args)
        if args.command == "new-plugin":
            from t2i_engine.scaffold import write_plugin

            path = write_plugin(args.name, Path(args.dir), kind=args.kind)
            print(f"wrote {path}; install it with `pip install -e {path}`")
            return 0
    except T2IError as exc:
        if debug:
            traceback.print_exc()
        print(f"t2i-engine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a filesystem fault no layer turned into a T2IError: one line still
        if debug:
            traceback.print_exc()
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"t2i-engine: error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("t2i-engine: interrupted", file=sys.stderr)
        return 130
    return 2


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from t2i_engine.config.loader import load_config
    from t2i_engine.plugins import get_plugin_manager

    pm = get_plugin_manager()
    if args.from_png is not None:
        if args.config is not None:
            raise ConfigError(f"{args.command}: give a config file or --from-png, not both")
        from t2i_engine.utils.recipe import load_png_job

        return pm, load_png_job(args.from_png, pm, overrides=args.overrides)
    if args.config is None:
        raise ConfigError(f"{args.command}: give the job's TOML file (or --from-png IMAGE.png)")
    return pm, load_config(args.config, pm, overrides=args.overrides)


def _cmd_run(args: argparse.Namespace, *, debug: bool) -> int:
    from t2i_engine.runner import run_config

    pm, config = _load(args)
    summary = run_config(config, pm, debug=debug)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _cmd_serve(args: argparse.Namespace, *, debug: bool) -> int:
    """``run`` for a job whose task is ``serve``; --host/--port are ``--set task.host/port``."""
    if args.host is not None:
        args.overrides.append(f"task.host={json.dumps(args.host)}")
    if args.port is not None:
        args.overrides.append(f"task.port={args.port}")
    from t2i_engine.runner import run_config

    if args.from_png is not None:
        raise ConfigError("serve: give the job's TOML file ([task] name = \"serve\"), not --from-png")
    pm, config = _load(args)
    if config.task.name != "serve":
        raise ConfigError(f"task.name: 't2i-engine serve' serves a job whose [task] name is \"serve\", this one's is "
                          f"'{config.task.name}' (see docs/serving.md)")
    for key, value in run_config(config, pm, debug=debug).items():
        print(f"{key}: {value}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from t2i_engine.config.render import render_toml

    _, config = _load(args)
    sys.stdout.write(render_toml(config, explain=args.explain))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    """List plugins; exit 2 when one failed to load or two register the same name (the
    problems are listed last, one line each, also on stderr)."""
    from t2i_engine.plugins import get_plugin_manager

    pm = get_plugin_manager()
    problems = pm.problems()  # runs the registration hooks, fills each plugin's `registers`
    infos = list(pm.plugins.values())
    clashes_of = pm.clashes_of
    if args.json:
        print(json.dumps([{
            "name": i.name, "distribution": i.distribution, "version": i.version,
            "registers": i.registers, "error": i.error, "clashes": clashes_of(i.name),
        } for i in infos], indent=2))
    else:
        for info in infos:
            status = "ok" if info.loaded and not clashes_of(info.name) else "FAILED" if not info.loaded else "CLASH"
            print(f"{info.name}  ({info.distribution or '?'} {info.version or ''})  [{status}]".replace(" )", ")"))
            for kind, names in sorted(info.registers.items()):
                print(f"    {kind}: {', '.join(sorted(names))}")
            if info.error:
                print(f"    error: {info.error}")
                if args.debug and info.traceback:
                    print(info.traceback)
            for clash in clashes_of(info.name):
                print(f"    clash: {clash}")
    for line in problems:
        print(f"t2i-engine: {line}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
