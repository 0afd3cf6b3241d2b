"""The plugin manager against real entry points of a pip-installed distribution."""

from __future__ import annotations

import json
import sys

import pytest

from t2i_engine.errors import ConfigError, PluginError
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.hookspecs import hookimpl
from tests.helpers import run_cli


def test_core_builtins_register_through_hooks() -> None:
    pm = EnginePluginManager().load(autoload=False)
    regs = pm.registries()
    assert pm.plugins["core"].error is None
    assert "euler" in regs["sampler"] and regs["sampler"]["euler"].plugin == "core"
    assert "shapes" in regs["dataset"]
    assert "preview-data" in regs["task"]


def test_discovery_through_entry_points(demo_plugin: str) -> None:
    pm = EnginePluginManager().load()
    info = pm.plugins["demo"]
    assert info.distribution == "t2i-plugin-demo" and info.version == "0.0.1"
    regs = pm.registries()
    assert regs["task"]["demo-hello"].plugin == "demo"
    assert regs["model"]["demo-model"].plugin == "demo"
    assert set(info.registers) == {"model", "text_encoder", "autoencoder", "sampler", "schedule",
                                   "conditioner", "task", "checkpoint_format", "dataset"}


def test_import_failure_is_isolated(demo_plugin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("T2I_DEMO_BROKEN", "1")
    monkeypatch.delitem(sys.modules, "t2i_plugin_demo.broken", raising=False)  # import it afresh
    pm = EnginePluginManager().load()
    assert "fails to import on purpose" in (pm.plugins["demo_broken"].error or "")
    assert "demo_broken" in capsys.readouterr().err
    assert "demo-hello" in pm.registry("task")  # the others still load
    with pytest.raises(PluginError, match="demo_broken.*failed to load"):
        pm.require(["demo_broken"])


def test_name_clash_names_both_plugins(demo_plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2I_DEMO_CLASH", "1")
    pm = EnginePluginManager().load()
    regs = pm.registries()  # a clash breaks nothing else ...
    assert "demo-hello" not in regs["task"] and regs["model"]["demo-model"].plugin == "demo"
    assert "preview-data" in regs["task"]
    with pytest.raises(PluginError, match=r"task 'demo-hello' is registered by two plugins: 'demo' and 'demo_clash'"):
        pm.get("task", "demo-hello")  # ... only the clashing name is withheld
    assert pm.problems() == ["task 'demo-hello' is registered by two plugins: 'demo' and 'demo_clash'"]


def test_clash_blocks_only_jobs_using_the_name(demo_plugin: str, tmp_path) -> None:
    env = {"T2I_DEMO_CLASH": "1"}
    listed = run_cli("plugins", env=env)
    assert listed.returncode == 2
    assert "task 'demo-hello' is registered by two plugins: 'demo' and 'demo_clash'" in listed.stderr
    assert "clash: task 'demo-hello' is also registered by 'demo_clash'" in listed.stdout
    cfg = tmp_path / "job.toml"
    cfg.write_text('[engine]\noutput_dir = "out"\n[task]\nname = "demo-hello"\n')
    done = run_cli("run", str(cfg), env=env)
    assert done.returncode == 2 and "'demo' and 'demo_clash'" in done.stderr and "Traceback" not in done.stderr
    cfg.write_text('[engine]\noutput_dir = "out"\n[task]\nname = "preview-data"\ncount = 2\n[data]\ntype = "shapes"\n')
    assert run_cli("run", str(cfg), env=env).returncode == 0


class _FailingHook:
    """A plugin registered in-process whose registration hook raises."""

    @hookimpl
    def register_models(self) -> dict:
        return {"hookfail-model": object}

    @hookimpl
    def register_tasks(self) -> dict:
        raise RuntimeError("register_tasks fails on purpose")


def test_hook_failure_stops_jobs_that_require_the_plugin(tmp_path) -> None:
    from t2i_engine.config.loader import load_config

    pm = EnginePluginManager().load(autoload=False)
    pm.register(_FailingHook(), name="hookfail")
    assert "hookfail-model" not in pm.registry("model")  # nothing of a plugin that failed is used
    assert "preview-data" in pm.registry("task")
    cfg = tmp_path / "job.toml"
    cfg.write_text('[engine]\nplugins = ["hookfail"]\n[task]\nname = "preview-data"\n[data]\ntype = "shapes"\n')
    with pytest.raises(PluginError, match=r"plugin 'hookfail' .*failed to load: register_tasks raised "
                                          r"RuntimeError: register_tasks fails on purpose") as info:
        load_config(cfg, pm)
    assert info.value.exit_code == 2
    cfg.write_text('[task]\nname = "preview-data"\n[data]\ntype = "shapes"\n[model]\ntype = "hookfail-model"\n')
    with pytest.raises(ConfigError, match=r"unknown model 'hookfail-model'.*failed to load, which may provide "
                                          r"it: 'hookfail' \(register_tasks raised"):
        load_config(cfg, pm)


def test_job_requiring_a_plugin_that_fails_to_import_exits_2(demo_plugin: str, tmp_path) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text('[engine]\nplugins = ["demo_broken"]\n[task]\nname = "preview-data"\n')
    done = run_cli("run", str(cfg), env={"T2I_DEMO_BROKEN": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "plugin 'demo_broken' (t2i-plugin-demo) is installed but failed to load: RuntimeError: " \
           "demo_broken fails to import on purpose" in done.stderr


def test_autoload_switch(demo_plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2I_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = EnginePluginManager().load()
    assert set(pm.plugins) == {"core"}
    with pytest.raises(ConfigError, match="plugin 'demo' is not installed; install the distribution that "
                                          "provides it") as info:
        pm.require(["demo"])
    assert "pip install" not in str(info.value)  # t2i-plugin-demo is not a package this project publishes


def test_trace_prints_hook_calls(demo_plugin: str) -> None:
    done = run_cli("plugins", env={"T2I_TRACE_PLUGINS": "1"})
    assert done.returncode == 0, done.stderr
    assert "[t2i trace] register_tasks" in done.stderr


def test_plugins_command_lists_builtins_and_errors(demo_plugin: str) -> None:
    done = run_cli("plugins", "--json", env={"T2I_DEMO_BROKEN": "1"})
    assert done.returncode == 2 and "plugin 'demo_broken' (t2i-plugin-demo) failed to load" in done.stderr
    listed = {p["name"]: p for p in json.loads(done.stdout)}
    assert "euler" in listed["core"]["registers"]["sampler"]
    assert listed["demo"]["distribution"] == "t2i-plugin-demo"
    assert "on purpose" in listed["demo_broken"]["error"]
    text = run_cli("plugins", env={"T2I_DEMO_BROKEN": "1"})
    assert "FAILED" in text.stdout and "demo_broken" in text.stdout


def test_job_runs_when_an_unrelated_plugin_is_broken(demo_plugin: str, tmp_path) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text('[engine]\nplugins = ["demo"]\noutput_dir = "out"\n[task]\nname = "demo-hello"\n'
                   'greeting = "hi"\nrepeat = 2\n[model]\ntype = "demo-model"\n')
    done = run_cli("run", str(cfg), env={"T2I_DEMO_BROKEN": "1"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "hello.txt").read_text() == "hi\nhi\n"


def test_lifecycle_hooks_are_called(demo_plugin: str, tmp_path) -> None:
    events = tmp_path / "events.jsonl"
    cfg = tmp_path / "job.toml"
    cfg.write_text('[engine]\noutput_dir = "out"\n[task]\nname = "demo-hello"\n')
    done = run_cli("run", str(cfg), env={"T2I_DEMO_EVENTS": str(events)})
    assert done.returncode == 0, done.stderr
    names = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert names == ["on_run_start", "on_run_end"]


@pytest.mark.parametrize("hook_name", [
    "register_models", "register_text_encoders", "register_autoencoders", "register_samplers",
    "register_schedules", "register_conditioners", "register_tasks",
    "register_checkpoint_formats", "register_datasets",
])
def test_each_registration_hook_reaches_the_plugin(demo_plugin: str, hook_name: str) -> None:
    from t2i_engine.hookspecs import REGISTRATION_HOOKS

    pm = EnginePluginManager().load()
    results = getattr(pm.hook, hook_name)()
    assert any(any(name.startswith("demo-") for name in r) for r in results)
    kind = REGISTRATION_HOOKS[hook_name]
    assert any(r.plugin == "demo" for r in pm.registry(kind).values())


def test_two_distributions_with_one_plugin_name(demo_plugin: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second distribution that also names its plugin 'demo': that name is unusable (naming both),
    everything else still loads."""
    info = tmp_path / "t2i_plugin_other-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: t2i-plugin-other\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[t2i_engine.plugins]\ndemo = t2i_plugin_demo.clash\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = EnginePluginManager().load()
    assert "t2i-plugin-demo" in pm.plugins["demo"].error and "t2i-plugin-other" in pm.plugins["demo"].error
    assert "demo-hello" not in pm.registry("task") and "preview-data" in pm.registry("task")
    with pytest.raises(PluginError, match="two installed distributions provide a plugin named 'demo'"):
        pm.require(["demo"])
