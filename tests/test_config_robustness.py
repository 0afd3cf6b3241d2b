"""Hostile config input: every malformed job file or --set value is one ConfigError (exit 2)
naming the key or byte offset, where it came from (file:line or the --set), and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2i_engine.config.limits import MAX_IMAGE_SIDE, SEED_MAX, require_image_memory
from t2i_engine.config.loader import load_config
from t2i_engine.config.render import render_toml
from t2i_engine.errors import ConfigError
from t2i_engine.plugins.manager import EnginePluginManager
from tests.helpers import run_cli

BASE = '[task]\nname = "preview-data"\ncount = 4\n[data]\ntype = "shapes"\n'


@pytest.fixture(scope="module")
def pm() -> EnginePluginManager:
    return EnginePluginManager().load(autoload=False)


def error_of(tmp_path: Path, pm: EnginePluginManager, content: str | bytes, *overrides: str) -> str:
    path = tmp_path / "job.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path, pm, overrides=overrides)
    return str(info.value)


def test_non_utf8_bytes_name_line_column_and_offset(tmp_path: Path, pm: EnginePluginManager) -> None:
    data = BASE.encode() + b'[guidance]\n# caf\xe9\n'
    offset = data.index(b"\xe9")
    msg = error_of(tmp_path, pm, data)
    assert f"job.toml:7:6: not UTF-8 (byte 0xe9 at offset {offset})" in msg
    assert "must be UTF-8" in msg


def test_non_utf8_prompt_in_set(tmp_path: Path, pm: EnginePluginManager) -> None:
    bad = b"task.filename=caf\xe9.png".decode("utf-8", "surrogateescape")  # what argv makes of it
    assert "not valid UTF-8 (byte offset 17)" in error_of(tmp_path, pm, BASE, bad)


def test_deep_nesting_is_refused(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, BASE + "[guidance]\nx = " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in msg and "job.toml" in msg
    assert "nested too deeply" in error_of(tmp_path, pm, BASE, "task.count=" + "[" * 5000 + "]" * 5000)


@pytest.mark.parametrize(("snippet", "expected"), [
    ("[[engine]]\nseed = 1\n", "engine: expected a table ([engine] with key = value lines), got an array of tables"),
    ("engine = 5\n", "engine: expected a table ([engine] with key = value lines), got 5"),
    ("[[guidance]]\nguidance_scale = 2.0\n", "guidance: expected a table"),
    ("[[train]]\nlr = 1.0\n", "train: expected a table"),
    ("[conditioners]\ntype = 'x'\n", "conditioners: expected an array of tables"),
    ("conditioners = [1]\n", "conditioners[0]: expected a table"),
])
def test_table_shape_mismatch(tmp_path: Path, pm: EnginePluginManager, snippet: str, expected: str) -> None:
    msg = error_of(tmp_path, pm, snippet + BASE)
    assert msg.startswith(expected) and "job.toml:1)" in msg


def test_scalar_where_table_expected_in_task(tmp_path: Path, pm: EnginePluginManager) -> None:
    assert error_of(tmp_path, pm, 'task = "preview-data"\n').startswith("task: expected a table")


@pytest.mark.parametrize(("snippet", "expected"), [
    ("[engine]\nseed = 18446744073709551616\n", "engine.seed: 18446744073709551616 is out of range"),
    ("[engine]\nseed = -1\n", "engine.seed: must be between 0 and 2**63-1"),
    ("[train]\nsample_seed = -5\n", "train.sample_seed: must be between 0 and 2**63-1"),
    ("[train]\nmax_steps = 99999999999999999999\n", "train.max_steps: 99999999999999999999 is out of range"),
])
def test_seed_and_count_bounds(tmp_path: Path, pm: EnginePluginManager, snippet: str, expected: str) -> None:
    msg = error_of(tmp_path, pm, snippet + BASE)
    assert msg.startswith(expected) and "job.toml:2)" in msg


def test_largest_seed_is_accepted_and_usable(tmp_path: Path, pm: EnginePluginManager) -> None:
    import torch

    from t2i_engine.data.shapes import ShapesDataset

    path = tmp_path / "job.toml"
    path.write_text(f"[engine]\nseed = {SEED_MAX}\n" + BASE + f"seed = {SEED_MAX}\n")
    config = load_config(path, pm)
    assert config.engine.seed == SEED_MAX
    torch.Generator().manual_seed(SEED_MAX + 1000)  # per-image seeds seed + i fit torch's 64 bits
    assert ShapesDataset(config.data.options)[0]["image"].shape == (3, 32, 32)


def test_image_sides_are_bounded(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, BASE + "size = 100000\n")
    assert msg.startswith(f"data.size: must be between 8 and {MAX_IMAGE_SIDE} pixels: 100000")


def test_image_larger_than_memory_is_refused_before_allocating() -> None:
    import torch

    with pytest.raises(ConfigError, match=r"task.width/height: a batch of 4 images of 16384x16384 .* needs at "
                                          r"least 12.0 GiB, but only .* is free"):
        from unittest import mock

        with mock.patch("t2i_engine.config.limits.available_memory", return_value=2**30):
            require_image_memory("task.width/height", width=16384, height=16384, batch=4,
                                 device=torch.device("cpu"))
    require_image_memory("task.width/height", width=64, height=64, batch=1, device=torch.device("cpu"))


def test_folder_where_a_file_is_expected(tmp_path: Path) -> None:
    from t2i_engine.config.paths import check_exists

    (tmp_path / "img").mkdir()
    with pytest.raises(ConfigError, match="task.init_image: '.*img' is a folder; a file is expected here"):
        check_exists("task.init_image", str(tmp_path / "img"), lambda _k: "", kind="file")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ConfigError, match="is a file; a folder is expected here"):
        check_exists("data.root", str(tmp_path / "f.txt"), lambda _k: "", kind="dir")


def test_set_errors_point_at_the_set_not_the_file(tmp_path: Path, pm: EnginePluginManager) -> None:
    msg = error_of(tmp_path, pm, BASE, "task.count=abc")
    assert msg == "task.count: expected an integer, got 'abc' (--set task.count=abc)"
    msg = error_of(tmp_path, pm, BASE, "guidance.guidance_scale=[1]")
    assert msg.endswith("(--set guidance.guidance_scale=[1])")
    assert "job.toml:6)" in error_of(tmp_path, pm, BASE + "bogus = 1\n", "task.count=5")  # file keys stay


@pytest.mark.parametrize(("override", "expected"), [
    ("conditioners.x=1", "conditioners: expected an array of tables ([[conditioners]]) (--set conditioners.x=1)"),
    ("task.count.x=1", "'task.count' is not a table"),
    ("=3", "the key is empty"),
    ("task", "expected key.path=value"),
])
def test_malformed_set(tmp_path: Path, pm: EnginePluginManager, override: str, expected: str) -> None:
    assert expected in error_of(tmp_path, pm, BASE, override)


def test_set_into_array_of_tables(tmp_path: Path, pm: EnginePluginManager) -> None:
    text = BASE + '[[conditioners]]\ntype = "nope"\n'
    assert "use an index 0..0" in error_of(tmp_path, pm, text, "conditioners.5.type=x")
    assert "name an entry, e.g. conditioners.0.type" in error_of(tmp_path, pm, text, "conditioners.type=x")
    msg = error_of(tmp_path, pm, text, "conditioners.0.type=other")
    assert "unknown conditioner 'other'" in msg and "(--set conditioners.0.type=other)" in msg


def test_config_explain_shows_help_and_stays_toml(tmp_path: Path, pm: EnginePluginManager) -> None:
    import tomllib

    path = tmp_path / "job.toml"
    path.write_text(BASE + "[train]\n")
    config = load_config(path, pm)
    text = render_toml(config, explain=True)
    assert "count = 4  # samples to show" in text
    assert "max_steps = 1000  # optimizer steps to train" in text
    assert tomllib.loads(text) == tomllib.loads(render_toml(config))  # comments only


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "folder.toml").mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[engine]\nseed = 1\n\xff\n" + BASE.encode())
    for path, expected in ((tmp_path / "folder.toml", "is a folder; give the job's TOML file"),
                           (bad, "bad.toml:3:1: not UTF-8 (byte 0xff at offset 18)")):
        done = run_cli("run", str(path), env={"T2I_DISABLE_PLUGIN_AUTOLOAD": "1"})
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    done = run_cli("config", "--explain", str(tmp_path / "job.toml"), env={"T2I_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert done.returncode == 2 and "config file not found" in done.stderr


def test_cli_unwritable_output_dir_exits_2(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    job = tmp_path / "job.toml"
    job.write_text('[engine]\noutput_dir = "file/out"\n' + BASE)
    done = run_cli("run", str(job), env={"T2I_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert done.returncode == 2 and "engine.output_dir: cannot write to" in done.stderr
    assert "Traceback" not in done.stderr


def test_init_image_that_is_not_an_image(tmp_path: Path) -> None:
    from t2i_engine.tasks.sample import _load_image

    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"task.init_image: '.*x.png' is not a readable image "
                                          r"\(UnidentifiedImageError\)"):
        _load_image(str(tmp_path / "x.png"), width=8, height=8)


def test_output_dir_with_a_nul_character(tmp_path: Path, pm: EnginePluginManager) -> None:
    from t2i_engine.runner import run_config

    job = tmp_path / "job.toml"
    job.write_text('[engine]\noutput_dir = "a\\u0000b"\n' + BASE)
    with pytest.raises(ConfigError, match="engine.output_dir: not a usable path: embedded null byte"):
        run_config(load_config(job, pm), pm)
