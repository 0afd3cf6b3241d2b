"""``t2i-engine --version``: what a bug report needs, checked against the installed metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import pytest
import torch

from t2i_engine.cli import main
from t2i_engine.plugins import reset_plugin_manager
from t2i_engine.utils import versions
from tests.helpers import run_cli


def _report(capsys: pytest.CaptureFixture[str]) -> list[str]:
    reset_plugin_manager()
    try:
        with pytest.raises(SystemExit) as done:
            main(["--version"])
    finally:
        reset_plugin_manager()
    assert done.value.code in (0, None)
    return capsys.readouterr().out.splitlines()


def test_version_lists_engine_sdk_plugins_torch_cuda_triton(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _report(capsys)
    assert lines[0] == f"t2i-engine {version('t2i-engine')}"
    assert f"t2i-sdk: {version('t2i-sdk')}" in lines
    assert f"  sd (t2i-plugin-sd {version('t2i-plugin-sd')})" in lines
    assert any(line.startswith(f"torch: {torch.__version__} ") for line in lines)
    cuda = [line for line in lines if line.startswith("CUDA available: ")]
    assert cuda and cuda[0].startswith("CUDA available: yes" if torch.cuda.is_available() else "CUDA available: no")
    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = "not installed"
    assert f"triton: {triton}" in lines


def test_missing_triton_reads_not_installed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_version(name: str) -> str:
        if name == "triton":
            raise PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(versions, "version", fake_version)
    assert "triton: not installed" in _report(capsys)


def test_version_names_a_plugin_that_failed_to_load(demo_plugin: str) -> None:
    done = run_cli("--version", env={"T2I_DEMO_BROKEN": "1"})
    assert done.returncode == 0, done.stderr
    assert "  demo (t2i-plugin-demo 0.0.1)" in done.stdout.splitlines()
    broken = [line for line in done.stdout.splitlines() if line.startswith("  demo_broken ")]
    assert broken and "FAILED" in broken[0] and "fails to import on purpose" in broken[0]
