"""Settings shared by every test folder (tests/, plugins/*/tests, sdk/tests)."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Tests run every CPU fast path (``T2I_CPU_PATHS=fixed``: no per-machine timing, nothing
    written under ~/.cache; tests/kernels/test_cpu_paths.py tests the timing and its cache).

    Under pytest-xdist (``make test`` runs 2 workers), give each worker its share of the cores:
    torch's default of one thread per core in every worker oversubscribes the CPU."""
    os.environ.setdefault("T2I_CPU_PATHS", "fixed")
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or "OMP_NUM_THREADS" in os.environ:  # not under xdist, or the user chose
        return
    threads = max(1, len(os.sched_getaffinity(0)) // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # also for the CLI subprocesses tests start
    import torch

    torch.set_num_threads(threads)
