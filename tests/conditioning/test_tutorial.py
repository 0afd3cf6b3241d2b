"""docs/writing-a-conditioner.md, followed literally: scaffold, install (into a temporary target,
never the shared environment), run the job it shows on the shapes model, compare."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "writing-a-conditioner.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_tutorial_works_as_written(tmp_path: Path) -> None:
    scaffold, install, hint, run = _blocks("bash")
    (job_text,) = _blocks("toml")
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")  # "in the root of a t2i-engine checkout"

    # 1. scaffold
    args = shlex.split(scaffold)
    assert args[0] == "t2i-engine"
    done = run_cli(*args[1:], cwd=work)
    assert done.returncode == 0, done.stderr
    plugin = work / "t2i-plugin-brightness"
    assert (plugin / "t2i_plugin_brightness" / "plugin.py").is_file()

    # 3. install: the page says `pip install -e`; here into a temporary target instead
    assert shlex.split(install.splitlines()[0]) == ["pip", "install", "-e", "t2i-plugin-brightness"]
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--target", str(target), str(plugin)], capture_output=True, text=True, check=False)
    assert pip.returncode == 0, pip.stderr
    env = {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    listed = run_cli("plugins", env=env, cwd=work)
    assert "conditioner: brightness" in listed.stdout

    # 4. the hint image and the job
    made = subprocess.run([sys.executable, *shlex.split(hint)[1:]], cwd=work, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    job = work / "brightness-job.toml"
    job.write_text(job_text)
    assert shlex.split(run) == ["t2i-engine", "run", "brightness-job.toml"]
    done = run_cli("run", "brightness-job.toml", env=env, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    steered = _pixels(work / "outputs" / "brightness" / "00000-0.png")

    without = work / "without.toml"
    without.write_text(job_text[:job_text.index("[[conditioners]]")])
    done = run_cli("run", "without.toml", "--set", "engine.output_dir=outputs/without", env=env, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = _pixels(work / "outputs" / "without" / "00000-0.png")
    done = run_cli("run", "brightness-job.toml", "--set", "engine.output_dir=outputs/scale0",
                   "--set", "conditioners.0.scale=0.0", env=env, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]

    assert np.abs(steered - plain).mean() > 5  # a visible change, in 0..255 levels
    assert np.array_equal(_pixels(work / "outputs" / "scale0" / "00000-0.png"), plain)  # exactly unconditioned

    # the plugin's own validator, reported like the core's: key and line
    bad = run_cli("run", "brightness-job.toml", "--set", "conditioners.0.strength=0", env=env, cwd=work)
    assert bad.returncode == 2
    assert "conditioners[0].strength: must not be 0" in bad.stderr and "(--set conditioners.0.strength=0)" in bad.stderr
