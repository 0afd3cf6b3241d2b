"""``t2i-engine serve JOB.toml`` as a user runs it: a subprocess that listens on the port it prints,
answers a generation, and stops cleanly on Ctrl-C (SIGINT); a job of another task is refused; the
shipped example job validates."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.serve.support import write_job

from t2i_engine.cli import main

httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_command_listens_generates_and_stops_on_ctrl_c(tmp_path):
    job = write_job(tmp_path, conditioners=False)
    host = "127.0.0.2"  # another loopback address: --host (task.host) must be the one bound
    with socket.socket() as probe:  # a port free now, to see --port (task.port) used
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "t2i_engine.cli", "serve", str(job), "--port", str(port),
                             "--host", host],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the model is resident and the port bound
        assert line.startswith("t2i-engine serve: model ") and f"http://{host}:" in line, line
        assert "generator 'text-to-image'" in line, line
        url = line.split(" on ", 1)[1].split("/ ", 1)[0]
        assert url == f"http://{host}:{port}"
        with pytest.raises(httpx.ConnectError):  # not bound on the default address
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/").status_code == 200
            job_id = client.post("/api/generations", json={"prompt": "cli", "seed": 3}).json()["id"]
            with client.stream("GET", f"/api/generations/{job_id}/events") as stream:
                kinds = [x[7:] for x in stream.iter_lines() if x.startswith("event: ")]
            assert kinds[-1] == "done"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "served: 1" in out
    assert (tmp_path / "out" / f"{job_id}.png").exists()


def test_serve_refuses_a_job_of_another_task(tmp_path, capsys):
    job = tmp_path / "sample.toml"
    job.write_text('[engine]\nplugins = ["sd"]\n[task]\nname = "sample"\nprompts = ["x"]\n'
                   '[model]\ntype = "stable-diffusion"\npreset = "tiny"\n')
    assert main(["serve", str(job)]) == 2
    assert "task.name: 't2i-engine serve' serves a job whose [task] name is \"serve\", this one's is 'sample'" \
        in capsys.readouterr().err


def test_the_example_job_validates():
    from t2i_engine.config.loader import load_config
    from t2i_engine.plugins.manager import EnginePluginManager

    config = load_config(ROOT / "examples" / "serve.toml", EnginePluginManager().load(), overrides=["task.port=0"])
    assert config.task.name == "serve" and (config.task.options.width, config.task.options.port) == (64, 0)


def test_without_the_serve_extra_the_task_names_it(monkeypatch):
    from t2i_engine.errors import ConfigError
    from t2i_engine.serve.config import ServeConfig
    from t2i_engine.serve.task import ServeTask

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if uvicorn were not installed
    with pytest.raises(ConfigError, match=r"'serve' needs FastAPI and uvicorn \(uvicorn is missing\); "
                                          r"pip install 't2i-engine\[serve\]'"):
        ServeTask(ServeConfig()).run(None)  # type: ignore[arg-type]
