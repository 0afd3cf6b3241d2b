"""The benchmark scripts run as ``python benchmarks/<script>.py``, which puts benchmarks/ first on
``sys.path``: a script named like a module the reference libraries probe for shadows it (a
``benchmarks/kernels.py`` broke ``from diffusers import StableDiffusionPipeline`` once
transformers began probing Hugging Face's ``kernels`` package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_reference_pipeline_imports_with_benchmarks_first_on_the_path() -> None:
    pytest.importorskip("diffusers")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from diffusers import StableDiffusionPipeline, UNet2DConditionModel")
    done = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
