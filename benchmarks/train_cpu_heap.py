"""A CPU training job with the engine's heap reuse on and off: step time, page faults, peak memory.

The training loop raises glibc's malloc thresholds before its first CPU step
(``t2i_engine.utils.cpu_memory.retain_freed_memory``; ``T2I_MALLOC_RETAIN=0`` turns it off), so
that the activations a step frees are reused by the next step instead of being handed back to
the system and page-faulted in again. This script runs a training job for a few steps in fresh
processes, alternating the switch off and on pair by pair (the order alternating too), and
reports each side's median step time (from the job's ``metrics.jsonl``, the first ``--warmup``
steps left out), the median of the per-pair ratios on/off with a 95% bootstrap interval, the
minor page faults per step and the peak resident memory of each process.

    python benchmarks/train_cpu_heap.py                        # the Imagen shapes base, 30 steps x 4 pairs
    python benchmarks/train_cpu_heap.py JOB.toml --steps 20 --pairs 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import median_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_once(job: Path, *, retain: bool, steps: int, warmup: int) -> dict[str, float]:
    """One process training ``job`` for ``steps`` steps; its median step time, faults and peak."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "t2i_engine.cli", "run", str(job),
               "--set", f"train.max_steps={steps}", "--set", "train.log_every=1", "--set", "train.resume=false",
               "--set", "train.checkpoint_every=0", "--set", "train.progress_bar=false",
               "--set", f"engine.output_dir={json.dumps(out)}",
               "--set", f"task.export={json.dumps(os.path.join(out, 'export.safetensors'))}"]
        env = {**os.environ, "T2I_MALLOC_RETAIN": "1" if retain else "0"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in rows if "step_time" in r and r["step"] > warmup]
    return {"step_s": statistics.median(times), "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "peak_mib": max(r["peak_memory_mb"] for r in rows if "peak_memory_mb" in r)}  # the process's peak RSS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job", nargs="?", default=str(ROOT / "examples" / "imagen-train-base.toml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pairs", type=int, default=4)
    args = p.parse_args()
    job = Path(args.job).resolve()
    sides: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    ratios = []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        pair = {retain: run_once(job, retain=retain, steps=args.steps, warmup=args.warmup) for retain in order}
        for retain, r in pair.items():
            sides[retain].append(r)
        ratios.append(pair[True]["step_s"] / pair[False]["step_s"])
        print(f"pair {i + 1}: off {pair[False]['step_s']:.3f} s, on {pair[True]['step_s']:.3f} s, "
              f"ratio {ratios[-1]:.2f}", flush=True)
    print(f"\n{job.name}: {args.steps} steps per process (first {args.warmup} untimed), {args.pairs} pairs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| heap reuse | median step (s) | minor page faults per step (the whole process / steps) | peak resident (MiB, median of the processes) |")
    print("|---|---|---|---|")
    for retain in (False, True):
        rs = sides[retain]
        print(f"| {'on' if retain else 'off (T2I_MALLOC_RETAIN=0)'} | {statistics.median(r['step_s'] for r in rs):.3f} "
              f"| {statistics.median(r['faults_per_step'] for r in rs):,.0f} | {statistics.median(r['peak_mib'] for r in rs):,.0f} |")
    med, lo, hi = median_interval(ratios)
    print(f"\nstep time on / off: median {med:.2f}x, 95% interval {lo:.2f}-{hi:.2f} "
          f"(pairs {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
