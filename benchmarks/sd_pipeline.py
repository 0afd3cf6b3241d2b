"""Stable Diffusion 1.5 on the CPU: the engine against diffusers, same weights, same run.

The real ``sd-1`` architecture with random weights is built once by the engine and written as a
diffusers folder; every measurement then runs in a fresh subprocess that loads that folder (ours
through the SD plugin's diffusers format, theirs with ``StableDiffusionPipeline.from_pretrained``),
so both hold identical weights and each peak-memory figure is that process's own.

* generation: 256x256, batch 1, DPM-Solver++ 2M for ``--steps`` steps, classifier-free guidance
  7.5 (text encoding, denoising and decoding), in float32 and under bf16 autocast;
* training step: UNet forward + backward + AdamW at 256x256 (32x32 latents), batch 2.

With ``--rounds N`` each side runs in N fresh processes: a round is a pair of processes back to
back, ours first in even rounds and diffusers first in odd ones; the table keeps each side's best
time and median peak memory, and the median of the per-round ratios with a 95% bootstrap interval
(the pair shares the machine's state of that minute, so drift between rounds cancels in its ratio).
Each side runs its own allocator as its users get it (the engine keeps freed memory in the heap). Wall time is the best of ``--repeats`` runs after one warm-up (a 2-step generation, or one
training step); peak memory is the peak resident
set size during the warm-up and timed runs minus the resident size before them (weights excluded, as both
sides hold the same). Prints a table of ours/diffusers ratios.

    python benchmarks/sd_pipeline.py [--steps 20] [--repeats 1] [--rounds 1] [--only generate|train] [--threads N]
    python benchmarks/sd_pipeline.py --preset tiny --size 64 --steps 2   # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import median_interval  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak - base`` in MiB."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.base = self._rss()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _autocast(precision: str) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _resident(*modules: torch.nn.Module) -> None:
    """Read every weight once, so that lazily memory-mapped files (diffusers loads safetensors that
    way) are resident before the memory baseline is taken."""
    with torch.no_grad():
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                if not t.is_mkldnn:  # packed weights (prepare_for_inference) are written, so resident
                    t.sum()


def _timed(fn: Any, *, repeats: int, warmup: Any = None) -> tuple[float, float]:
    """Best wall time of ``repeats`` calls of ``fn`` after one ``warmup`` call (default ``fn``)."""
    best = float("inf")
    with PeakRSS() as mem:  # from before the warm-up: memory an allocator keeps counts once
        (warmup or fn)()  # warm-up (allocator, oneDNN primitive caches)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best, mem.mib


# --- workers (one per subprocess) ---------------------------------------------------------

def _ours_generate(folder: str, precision: str, args: argparse.Namespace) -> tuple[float, float]:
    from t2i_engine.diffusion.guidance import GuidanceConfig
    from t2i_engine.diffusion.registry import SAMPLERS, SamplerConfig
    from t2i_engine.pipeline import generate
    from t2i_engine.tasks.common import prepare_for_inference
    from t2i_plugin_sd.formats import DiffusersFolder
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    model = build_model(DiffusersFolder().load(folder), PRESETS[args.preset])
    # what the sample task does after loading: under bf16-mixed the autocast layers' weights are cast
    # once (the same arithmetic as autocast's per-call casts); on the CPU deep convolutions are packed
    prepare_for_inference(model, autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    _resident(model)
    noise = _noise(args)

    def run(steps: int = args.steps) -> None:
        sampler = SAMPLERS["dpmpp_2m"](SamplerConfig(steps=steps))
        with torch.inference_mode(), _autocast(precision):
            generate(model, [PROMPT], noise, sampler=sampler, guidance=GuidanceConfig(guidance_scale=7.5))

    return _timed(run, repeats=args.repeats, warmup=lambda: run(2))


def _diffusers_generate(folder: str, precision: str, args: argparse.Namespace) -> tuple[float, float]:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    _resident(pipe.unet, pipe.vae, pipe.text_encoder)
    noise = _noise(args)

    def run(steps: int = args.steps) -> None:
        with torch.inference_mode(), _autocast(precision):
            pipe(PROMPT, latents=noise.clone(), num_inference_steps=steps, guidance_scale=7.5, height=args.size,
                 width=args.size, output_type="pt")

    return _timed(run, repeats=args.repeats, warmup=lambda: run(2))


def _noise(args: argparse.Namespace) -> torch.Tensor:
    return torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))


def _train_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from t2i_plugin_sd.presets import PRESETS

    g, h = torch.Generator().manual_seed(0), args.size // 8
    x = torch.randn(2, 4, h, h, generator=g)  # (B, 4, h, w) latents (32x32 for 256x256 images)
    t = torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 77, PRESETS[args.preset].unet.context_dim, generator=g)  # (B, L, D) text tokens
    target = torch.randn(2, 4, h, h, generator=g)
    return x, t, context, target


def _ours_train(folder: str, precision: str, args: argparse.Namespace) -> tuple[float, float]:
    from t2i_engine.interfaces import Conditioning, TextEmbedding
    from t2i_engine.training.config import TrainConfig
    from t2i_engine.training.optim import build_optimizer
    from t2i_plugin_sd.formats import DiffusersFolder
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    from t2i_engine.utils.cpu_memory import retain_freed_memory

    unet = build_model(DiffusersFolder().load(folder), PRESETS[args.preset]).unet.train()
    _resident(unet)
    opt = build_optimizer(unet.parameters(), TrainConfig(lr=1e-5))  # the train task's AdamW (fused here)
    retain_freed_memory()  # what the train loop does on the CPU before its first step
    x, t, context, target = _train_inputs(args)
    cond = Conditioning(text=TextEmbedding(context))

    def run() -> None:
        with _autocast(precision):
            loss = torch.nn.functional.mse_loss(unet(x, t, cond).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(run, repeats=args.repeats)


def _diffusers_train(folder: str, precision: str, args: argparse.Namespace) -> tuple[float, float]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").train()
    _resident(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    x, t, context, target = _train_inputs(args)

    def run() -> None:
        with _autocast(precision):
            loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=context).sample.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(run, repeats=args.repeats)


WORKERS = {("ours", "generate"): _ours_generate, ("diffusers", "generate"): _diffusers_generate,
           ("ours", "train"): _ours_train, ("diffusers", "train"): _diffusers_train}


# --- driver ----------------------------------------------------------------------------------

def _measure(folder: str, impl: str, job: str, precision: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", impl, job, precision, "--folder", folder, "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--preset", args.preset, "--size", str(args.size)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {job} {precision} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    """Best time and median peak memory over the rounds of one side."""
    peaks = sorted(m["peak_mib"] for m in runs)
    mid = len(peaks) // 2
    median = peaks[mid] if len(peaks) % 2 else (peaks[mid - 1] + peaks[mid]) / 2
    return {"seconds": min(m["seconds"] for m in runs), "peak_mib": median}


def main() -> None:
    from t2i_engine.kernels.cpu_paths import cpu_description

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (best is kept)")
    p.add_argument("--rounds", type=int, default=1,
                   help="fresh worker processes per side, alternating ours/diffusers (best time, median memory)")
    p.add_argument("--only", choices=("generate", "train"), default=None, help="run one of the two jobs")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: torch default)")
    p.add_argument("--preset", default="sd-1", help="SD plugin preset (tiny: a smoke run)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--folder", default=None, help="reuse an sd-1 diffusers folder written by an earlier run")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "JOB", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, job, precision = args.worker
        seconds, mib = WORKERS[(impl, job)](args.folder, precision, args)
        print(json.dumps({"seconds": seconds, "peak_mib": mib}))
        return

    tmp = None
    folder = args.folder
    if folder is None:
        from t2i_plugin_sd.formats import DiffusersFolder
        from t2i_plugin_sd.model import build_model
        from t2i_plugin_sd.presets import PRESETS

        tmp = tempfile.TemporaryDirectory(prefix="sd1-bench-")
        folder = str(Path(tmp.name) / "sd-1")
        DiffusersFolder().save(build_model(None, PRESETS[args.preset], seed=0), folder)
    jobs = [j for j in ("generate", "train") if args.only in (None, j)]
    rows = []
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; threads {args.threads or torch.get_num_threads()}")
    for job in jobs:
        for precision in args.precisions.split(","):
            runs: dict[str, list[dict[str, float]]] = {"ours": [], "diffusers": []}
            for r in range(args.rounds):  # a pair of processes per round, the order alternating
                for impl in (("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")):
                    runs[impl].append(_measure(folder, impl, job, precision, args))
                print(f"  {job} {precision} round {r + 1}: " + ", ".join(
                    f"{impl} {m[-1]['seconds']:.2f} s / {m[-1]['peak_mib']:.0f} MiB" for impl, m in runs.items()),
                    flush=True)
            ours, theirs = (_summary(runs[impl]) for impl in ("ours", "diffusers"))
            paired = median_interval([o["seconds"] / d["seconds"] for o, d in zip(runs["ours"], runs["diffusers"])])
            rows.append((job, precision, ours, theirs, paired))
    px = f"{args.size}x{args.size}"
    what = {"generate": f"{args.preset} generate {px}, {args.steps} steps DPM++ 2M, CFG, batch 1",
            "train": f"{args.preset} UNet fwd+bwd+AdamW {px}, batch 2"}
    print("\n| job | precision | ours (s) | diffusers (s) | time ratio (best) | per-round ratio (median, 95% interval) "
          "| ours peak (MiB) | diffusers peak (MiB) | memory ratio |\n|---|---|---|---|---|---|---|---|---|")
    for job, precision, ours, theirs, (med, low, high) in rows:
        print(f"| {what[job]} | {precision} | {ours['seconds']:.2f} | {theirs['seconds']:.2f} | "
              f"{ours['seconds'] / theirs['seconds']:.2f}x | {med:.2f}x ({low:.2f}-{high:.2f}) | "
              f"{ours['peak_mib']:.0f} | {theirs['peak_mib']:.0f} | "
              f"{ours['peak_mib'] / max(theirs['peak_mib'], 1e-9):.2f}x |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
