"""Engine training loop vs a plain PyTorch loop: step time and peak memory on one tiny model.

Both loops do the same work per step: one micro-batch from the same dataset through a
DataLoader, forward + backward of the same conv denoiser, global-norm clipping, AdamW, and an
EMA update. Step times come from alternating runs in one process (best median of
``--repeats``); the first ``--warmup`` steps are not timed. Peak memory is the CUDA allocator
peak per run, or on the CPU each variant's peak RSS in a process of its own.

    python benchmarks/train_loop.py [--steps 60] [--repeats 3] [--device cpu|cuda] [--batch 16] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn


class BenchDenoiser(nn.Module):
    """A small conv eps-predictor implementing TrainableModel."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(4, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 3, 3, padding=1))

    def training_loss(self, batch, *, generator):
        x0 = batch["image"]  # (B, 3, H, W)
        sigma = torch.exp(torch.randn(x0.shape[0], generator=generator, device=x0.device) * 1.2 - 1.2)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_t = (x0 + sigma.view(-1, 1, 1, 1) * noise) / torch.sqrt(1 + sigma**2).view(-1, 1, 1, 1)
        smap = sigma.log().view(-1, 1, 1, 1).expand(-1, 1, *x0.shape[2:])
        return (self.net(torch.cat([x_t, smap], 1)) - noise).pow(2).mean()

    def trainable_parameters(self):
        return self.parameters()


def _dataset(size: int):
    from t2i_engine.data.shapes import ShapesDataset

    return ShapesDataset(ShapesDataset.Config(size=size, count=4096, seed=0))


def _peak_mb(device: torch.device) -> float:
    from t2i_engine.training.logging import peak_memory_mb

    return peak_memory_mb(device)


def run_plain(args: argparse.Namespace) -> list[float]:
    """The baseline: a hand-written loop doing the engine's work per step."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = BenchDenoiser().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    ema = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator(device=device).manual_seed(0)
    loader = torch.utils.data.DataLoader(_dataset(args.size), batch_size=args.batch, shuffle=True,
                                         drop_last=True, pin_memory=device.type == "cuda")
    stamps = [time.perf_counter()]
    it = iter(loader)
    for _ in range(args.steps):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(it).items()}
        loss = model.training_loss(batch, generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1e-4)
        loss.item()  # the loss is read every step, as any loop that logs or checks it does
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_engine(args: argparse.Namespace) -> list[float]:
    """The engine: fit() with logging every 10 steps and no periodic checkpoints."""
    from t2i_engine.training.config import TrainConfig
    from t2i_engine.training.loop import fit

    stamps = [time.perf_counter()]

    class Hooks:
        def on_train_step_end(self, *, step, metrics):
            stamps.append(time.perf_counter())

        def on_checkpoint_saved(self, *, step, path):
            pass

    torch.manual_seed(0)
    cfg = TrainConfig(accelerator="cuda" if args.device == "cuda" else "cpu", max_steps=args.steps,
                      batch_size=args.batch, lr=1e-4, ema=True, checkpoint_every=0, log_every=10,
                      progress_bar=False)
    with tempfile.TemporaryDirectory() as out:
        fit(BenchDenoiser(), _dataset(args.size), cfg, output_dir=out, seed=0, hooks=Hooks())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating runs of each variant; the best median is kept (shared machines are noisy)")
    p.add_argument("--variant", choices=["plain", "engine"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        times = (run_plain if args.variant == "plain" else run_engine)(args)[args.warmup:]
        print(json.dumps({"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
                          "peak_mb": _peak_mb(torch.device(args.device))}))
        return
    # Step times: both variants in this process, alternating, best median kept (the machine
    # may be shared). Peak memory: CUDA allocator peak per run; on the CPU, each variant's peak
    # RSS measured once in its own process.
    device = torch.device(args.device)
    rows: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for variant, fn in (("plain", run_plain), ("engine", run_engine)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = fn(args)[args.warmup:]
            r = {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
                 "peak_mb": _peak_mb(device) if device.type == "cuda" else math.nan}
            if variant not in rows or r["median_s"] < rows[variant]["median_s"]:
                rows[variant] = r
    if device.type != "cuda":
        for variant in rows:
            cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[variant]["peak_mb"] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    plain, engine = rows["plain"], rows["engine"]
    print(f"device={args.device} steps={args.steps} (first {args.warmup} untimed) batch={args.batch} "
          f"size={args.size}, best of {args.repeats} alternating runs")
    print(f"{'':8} {'median step ms':>15} {'mean step ms':>13} {'peak MiB':>10}")
    for name, r in rows.items():
        print(f"{name:8} {r['median_s'] * 1e3:15.2f} {r['mean_s'] * 1e3:13.2f} {r['peak_mb']:10.1f}")
    print(f"{'ratio':8} {engine['median_s'] / plain['median_s']:15.3f} {engine['mean_s'] / plain['mean_s']:13.3f} "
          f"{engine['peak_mb'] / plain['peak_mb']:10.3f}")


if __name__ == "__main__":
    main()
