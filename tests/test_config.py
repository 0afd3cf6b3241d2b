"""Every kind of config error, and the --set override, through the real loader and CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2i_engine.config.loader import index_lines, load_config
from t2i_engine.errors import ConfigError
from t2i_engine.plugins.manager import EnginePluginManager
from tests.helpers import run_cli

GOOD = """\
[engine]
plugins = ["demo"]
seed = 3
output_dir = "out"

[model]
type = "demo-model"
width = 16

[task]
name = "demo-hello"
greeting = "hey"
"""


@pytest.fixture
def pm(demo_plugin: str) -> EnginePluginManager:
    return EnginePluginManager().load()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, pm: EnginePluginManager, text: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), pm, overrides=overrides)
    return str(info.value)


def test_good_config_resolves_with_defaults(tmp_path: Path, pm: EnginePluginManager) -> None:
    config = load_config(write(tmp_path, GOOD), pm)
    assert config.engine.seed == 3 and config.engine.device == "auto"
    assert config.model.options.width == 16 and config.model.plugin == "demo"
    assert config.task.options.greeting == "hey" and config.task.options.repeat == 1
    assert config.output_dir == tmp_path / "out"


def test_misspelled_table_suggests_the_right_one(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, GOOD.replace("[model]", "[modle]"))
    assert "modle" in msg and "did you mean 'model'?" in msg and ":6)" in msg


def test_unknown_key_names_dotted_path_and_nearest(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, GOOD.replace("greeting =", "greting ="))
    assert msg.startswith("task.greting: unknown key (did you mean 'greeting'?)")
    assert "job.toml:12" in msg


def test_unknown_engine_key(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, GOOD.replace("seed = 3", "sed = 3"))
    assert "engine.sed" in msg and "'seed'" in msg


def test_wrong_type_names_key_expected_and_value(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, GOOD.replace("width = 16", 'width = "wide"'))
    assert msg.startswith("model.width: expected an integer, got 'wide'") and ":8)" in msg


def test_out_of_range_value(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, GOOD + "repeat = 0\n")
    assert msg.startswith("task.repeat: must be >= 1: 0")


def test_literal_choices(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, GOOD + 'mode = "whisper"\n')
    assert "task.mode: expected one of 'plain', 'shout', got 'whisper'" in msg


def test_missing_path(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, GOOD + 'template = "nowhere.txt"\n')
    assert "task.template: path does not exist: 'nowhere.txt'" in msg


def test_relative_path_resolves_against_config_folder(tmp_path: Path, pm: EnginePluginManager) -> None:
    (tmp_path / "t.txt").write_text("tmpl")
    config = load_config(write(tmp_path, GOOD + 'template = "t.txt"\n'), pm)
    assert config.task.options.template == str(tmp_path / "t.txt")


def test_missing_plugin_names_distribution(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, GOOD.replace('plugins = ["demo"]', 'plugins = ["nonexistent"]'))
    assert "plugin 'nonexistent' is not installed" in msg and "pip install" not in msg  # no guessed names
    from importlib.metadata import entry_points

    from t2i_engine.plugins.manager import KNOWN_DISTRIBUTIONS

    installed = {ep.name for ep in entry_points(group="t2i_engine.plugins")}
    missing = [name for name in KNOWN_DISTRIBUTIONS if name not in installed]
    if not missing:
        pytest.skip("every first-party plugin is installed here")
    name = missing[0]  # a first-party plugin this environment lacks
    msg = error_of(tmp_path, pm, GOOD.replace('plugins = ["demo"]', f'plugins = ["{name}"]'))
    assert f"plugin '{name}' is not installed; install it with `pip install {KNOWN_DISTRIBUTIONS[name]}`" in msg


def test_unknown_component_suggests_and_lists(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, GOOD.replace('name = "demo-hello"', 'name = "demo-helo"'))
    assert "unknown task 'demo-helo' (did you mean 'demo-hello'?)" in msg


def test_first_party_component_names_its_distribution(tmp_path: Path, demo_plugin: str) -> None:
    # only the demo plugin, by hand: t2i-plugin-imagen itself may be installed in this environment
    import t2i_plugin_demo.plugin

    pm = EnginePluginManager().load(autoload=False)
    pm.register(t2i_plugin_demo.plugin, name="demo")
    msg = error_of(tmp_path, pm, GOOD.replace('type = "demo-model"\nwidth = 16', 'type = "imagen"'))
    assert "pip install t2i-plugin-imagen" in msg


def test_missing_task_table(tmp_path: Path, pm: EnginePluginManager) -> None:
    assert "[task] table is missing" in error_of(tmp_path, pm, "[engine]\nseed = 1\n")


def test_overrides(tmp_path: Path, pm: EnginePluginManager) -> None:
    config = load_config(write(tmp_path, GOOD), pm, overrides=["model.width=32", "task.greeting=yo", "engine.plugins=[]"])
    assert config.model.options.width == 32 and config.task.options.greeting == "yo"
    assert "model.width: expected an integer" in error_of(tmp_path, pm, GOOD, 'model.width="x"')


def test_index_lines_handles_arrays_of_tables() -> None:
    lines = index_lines('[[conditioners]]\ntype = "a"\n[[conditioners]]\ntype = "b"\n')
    assert lines["conditioners[1].type"] == 4


# --- through the console script: exit codes and messages -------------------------------


def test_cli_syntax_error_exits_2_with_line(tmp_path: Path) -> None:
    done = run_cli("run", str(write(tmp_path, '[task]\nname = "preview-data"\ncount = = 3\n')))
    assert done.returncode == 2
    assert "job.toml:3:" in done.stderr and "TOML syntax error" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_misspelled_table_exits_2(tmp_path: Path) -> None:
    done = run_cli("run", str(write(tmp_path, '[modle]\ntype = "x"\n[task]\nname = "preview-data"\n')))
    assert done.returncode == 2 and "modle" in done.stderr and "did you mean 'model'?" in done.stderr


def test_cli_missing_plugin_exits_2(tmp_path: Path) -> None:
    done = run_cli("run", str(write(tmp_path, '[engine]\nplugins = ["nonexistent"]\n[task]\nname = "preview-data"\n')))
    assert done.returncode == 2 and "plugin 'nonexistent' is not installed" in done.stderr


def test_cli_debug_shows_traceback(tmp_path: Path) -> None:
    done = run_cli("run", "--debug", str(write(tmp_path, '[modle]\n')))
    assert done.returncode == 2 and "Traceback" in done.stderr


def test_cli_missing_file_and_version(tmp_path: Path) -> None:
    done = run_cli("run", str(tmp_path / "nope.toml"))
    assert done.returncode == 2 and "config file not found" in done.stderr
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("t2i-engine ")


def test_cli_config_prints_resolved_defaults(tmp_path: Path) -> None:
    done = run_cli("config", str(write(tmp_path, '[task]\nname = "preview-data"\n[data]\ntype = "shapes"\n')))
    assert done.returncode == 0, done.stderr
    assert "[engine]" in done.stdout and 'device = "auto"' in done.stdout and "count = 16" in done.stdout
    import tomllib

    tomllib.loads(done.stdout)  # the output is itself valid TOML


def test_core_job_runs_without_model_plugins(tmp_path: Path) -> None:
    cfg = write(tmp_path, '[engine]\noutput_dir = "o"\n[task]\nname = "preview-data"\ncount = 4\n'
                          '[data]\ntype = "shapes"\n')
    done = run_cli("run", str(cfg), env={"T2I_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert Image.open(tmp_path / "o" / "preview.png").size[0] > 0


@pytest.mark.parametrize(("snippet", "expected"), [
    ('[sampler]\nname = "eulr"\n', "unknown sampler 'eulr' (did you mean 'euler'?)"),
    ('[sampler]\nname = "euler"\nsteps = 0\n', "sampler.steps: must be >= 1"),
    ('[sampler]\nname = "ddim"\neta = "x"\n', "sampler.eta: expected a number, got 'x'"),
    ('[guidance]\nguidance_scale = "high"\n', "guidance.guidance_scale: expected a number, got 'high'"),
    ('[schedule]\ntype = "scaled_linear"\nnum_train_timesteps = 0\n', "schedule.num_train_timesteps"),
])
def test_core_component_errors(tmp_path: Path, snippet: str, expected: str) -> None:
    pm = EnginePluginManager().load(autoload=False)
    text = '[task]\nname = "preview-data"\n' + snippet
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), pm)
    assert expected in str(info.value) and "job.toml:" in str(info.value)


def test_a_task_may_change_the_train_tables_defaults(tmp_path: Path, pm: EnginePluginManager, monkeypatch) -> None:
    """A task class's ``train_defaults`` replace [train]'s defaults; keys the job gives win."""
    factory = pm.get("task", "demo-hello").factory
    monkeypatch.setattr(factory, "train_defaults", {"lr": 1e-5, "batch_size": 3}, raising=False)
    config = load_config(write(tmp_path, GOOD + "[train]\nbatch_size = 5\n"), pm)
    assert config.train.lr == 1e-5 and config.train.batch_size == 5
    monkeypatch.delattr(factory, "train_defaults")
    assert load_config(write(tmp_path, GOOD + "[train]\nbatch_size = 5\n"), pm).train.lr == 1e-4
