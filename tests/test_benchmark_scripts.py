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


def test_the_bootstrap_interval_of_the_median_covers_the_true_median() -> None:
    """benchmarks/bench_stats.median_interval against the distribution it estimates: for samples
    of a normal law (true median 0), the 95% interval holds 0 in about 95% of the draws (a
    percentile bootstrap of a median runs a little under its level at n = 15), and a constant
    sample gives a zero-width interval."""
    import random
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_stats import median_interval
    finally:
        sys.path.remove(str(BENCHMARKS))
    rng = random.Random(1)
    trials = 200
    covered = 0
    for t in range(trials):
        med, low, high = median_interval([rng.gauss(0.0, 1.0) for _ in range(15)], resamples=1000, seed=t)
        assert low <= med <= high
        covered += low <= 0.0 <= high
    assert 0.85 <= covered / trials <= 1.0
    assert median_interval([0.5] * 6) == (0.5, 0.5, 0.5)


def test_cpu_path_gain_runs_and_refuses_an_unknown_path() -> None:
    """benchmarks/cpu_path_gain.py as its docstring's smoke run (tiny preset), and a path name
    that does not exist refused by name."""
    script = str(BENCHMARKS / "cpu_path_gain.py")
    done = subprocess.run([sys.executable, script, "--preset", "tiny", "--size", "32", "--pairs", "1",
                           "--only", "unet,train"], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| unet |" in done.stdout and "| train |" in done.stdout
    bad = subprocess.run([sys.executable, script, "--paths", "conv_winograd"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert bad.returncode == 2 and "unknown CPU paths ['conv_winograd']" in bad.stderr
