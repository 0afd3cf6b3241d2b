"""Two Fabric processes (ddp, gloo on the CPU) write the same files, pixel for pixel, and the same
manifest as one process: the result does not depend on the number of ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.batch.test_prompt_file import PROMPTS, _job, write_prompts

from t2i_engine.config.loader import load_config
from t2i_engine.plugins.manager import EnginePluginManager
from t2i_engine.runner import run_config


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path):
    prompts = tmp_path / "prompts.csv"
    write_prompts(prompts, PROMPTS)
    prompts.write_text(prompts.read_text(encoding="utf-8").replace("id,prompt", "id,caption"), encoding="utf-8")
    job = _job(tmp_path, prompts, 'prompt_column = "caption"\nmanifest = "made.jsonl"')
    pm = EnginePluginManager().load()
    one = run_config(load_config(job, pm, overrides=["engine.output_dir='one'"]), pm)
    assert (one["world_size"], one["images"]) == (1, 5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "t2i_engine.cli", "run", str(job), "--set", "engine.output_dir='two'",
                           "--set", "task.devices=2"], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "world_size: 2" in done.stdout
    # the two ranks print to one pipe: their "written: N" lines may interleave
    written = sorted(int(n) for n in re.findall(r"written: (\d+)", done.stdout))
    assert written == [2, 3]  # batches of 2: rank 0 took batches 0 and 2 (3 images), rank 1 batch 1 (2 images)
    _assert_same_outputs(tmp_path / "one", tmp_path / "two", "made.jsonl")


def _assert_same_outputs(one: Path, many: Path, manifest_name: str) -> None:
    """The files, their pixels and the manifest of a multi-rank run are the 1-process run's."""
    a, b = _pixels(one), _pixels(many)
    assert list(a) == list(b) == ["000000-5.png", "000001-6.png", "000002-7.png", "000003-8.png", "000004-9.png"]
    assert all(np.array_equal(a[name], b[name]) for name in a)
    manifest = (one / manifest_name).read_text(encoding="utf-8")
    assert manifest == (many / manifest_name).read_text(encoding="utf-8")
    assert [json.loads(line)["prompt"] for line in manifest.splitlines()] == PROMPTS


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_write_what_one_process_writes(tmp_path):
    """``num_nodes = 2``, ``devices = 1``, simulated on localhost: one process per "node", started
    by hand with the variables Lightning's LightningEnvironment reads (MASTER_ADDR, MASTER_PORT,
    NODE_RANK; LOCAL_RANK set, so Fabric launches no processes itself), as torchrun or a cluster
    script would on each machine. The files, their pixels and the manifest are the 1-process run's."""
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    job = _job(tmp_path, prompts)
    pm = EnginePluginManager().load()
    one = run_config(load_config(job, pm, overrides=["engine.output_dir='one'"]), pm)
    assert (one["world_size"], one["images"]) == (1, 5)
    port = str(_free_port())
    nodes = []
    for node in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "NODE_RANK": str(node), "LOCAL_RANK": "0"}
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "t2i_engine.cli", "run", str(job), "--set", "engine.output_dir='nodes'",
             "--set", "task.num_nodes=2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outs = []
    for proc in nodes:
        out, _ = proc.communicate(timeout=600)
        outs.append(out)
        assert proc.returncode == 0, out
    # node 0 is rank 0 (batches 0 and 2: 3 images, and the manifest), node 1 rank 1 (batch 1: 2 images)
    assert re.search(r"written: 3\b", outs[0]) and re.search(r"rank: 0\b", outs[0]), outs[0]
    assert re.search(r"written: 2\b", outs[1]) and re.search(r"rank: 1\b", outs[1]), outs[1]
    assert all("world_size: 2" in out for out in outs)
    _assert_same_outputs(tmp_path / "one", tmp_path / "nodes", "manifest.jsonl")


def test_the_output_dir_probe_is_unique_across_nodes(tmp_path, monkeypatch):
    """Every rank of a multi-node job checks the one shared output_dir with a probe file; two
    nodes' processes may have the same pid (containers), so the probe's name must not rest on it."""
    from t2i_engine import runner

    names: list[str] = []
    touch = Path.touch

    def recording(self: Path, *args, **kwargs):
        names.append(self.name)
        return touch(self, *args, **kwargs)

    monkeypatch.setattr(runner.os, "getpid", lambda: 7)
    monkeypatch.setattr(Path, "touch", recording)
    runner.writable_output_dir(tmp_path / "shared")
    runner.writable_output_dir(tmp_path / "shared")
    assert len(names) == 2 and names[0] != names[1] and all(n.startswith(".t2i-write-test-7-") for n in names)
    assert list((tmp_path / "shared").iterdir()) == []
