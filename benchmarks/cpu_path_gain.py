"""What one CPU fast path buys the engine: SD-1.5 components with the path on against off.

    python benchmarks/cpu_path_gain.py --size 256 --pairs 6 --threads 1
    python benchmarks/cpu_path_gain.py --paths conv_pack_fp32 --only unet --size 128
    python benchmarks/cpu_path_gain.py --preset tiny --size 32 --pairs 2   # seconds-long smoke run

The engine alone, in one process, with freed memory kept in the heap as ``generate()`` and the
train loop keep it: each component is called with the named paths on and with them off, the two
alternating call by call (``t2i_engine.kernels.cpu_paths.paired_ratios``; process CPU time with one
thread), and the table gives the median ratio on / off with a 95% bootstrap interval. The
components are the UNet on a guidance batch of 2 and the VAE decoder (inference, as the sample task
prepares the model) and the UNet's forward + backward at a batch of 2 (training); the default
paths are the Winograd ones (``conv_winograd_fp32`` for inference, ``conv_winograd_train_fp32``
for training). Every other path stays as this machine's timing chose it. Random weights of the
preset (no download).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import median_interval  # noqa: E402

from t2i_engine.kernels import cpu_paths  # noqa: E402
from t2i_engine.kernels.cpu_paths import cpu_description, paired_ratios  # noqa: E402
from t2i_engine.utils.cpu_memory import retain_freed_memory  # noqa: E402

Call = Callable[[], Any]
DEFAULT_PATHS = "conv_winograd_fp32,conv_winograd_train_fp32"


def with_paths_off(paths: set[str], fn: Call) -> Call:
    """``fn`` run with ``paths`` off (every other path as selected)."""
    def call() -> Any:
        selected = cpu_paths.enabled
        cpu_paths.enabled = lambda path: path not in paths and selected(path)  # type: ignore[assignment]
        try:
            return fn()
        finally:
            cpu_paths.enabled = selected  # type: ignore[assignment]
    return call


def components(preset: str, size: int, only: set[str]) -> dict[str, Call]:
    """``name -> call`` for the requested components, on fixed random inputs."""
    from t2i_engine.interfaces import Conditioning, TextEmbedding
    from t2i_engine.tasks.common import prepare_for_inference
    from t2i_plugin_sd.model import build_model
    from t2i_plugin_sd.presets import PRESETS

    arch = PRESETS[preset]
    g, h = torch.Generator().manual_seed(0), size // 8
    ctx = torch.randn(2, 77, arch.unet.context_dim, generator=g)
    cond = Conditioning(text=TextEmbedding(ctx))
    x, t = torch.randn(2, arch.unet.in_channels, h, h, generator=g), torch.tensor([500.0, 500.0])
    calls: dict[str, Call] = {}
    if only & {"unet", "decode"}:
        model = build_model(None, arch, seed=0)
        prepare_for_inference(model)  # what the sample task does after loading
        z = torch.randn(1, arch.vae.latent_channels, h, h, generator=g)

        def inference(fn: Call) -> Call:
            def call() -> Any:
                with torch.inference_mode():
                    return fn()
            return call
        if "unet" in only:
            calls["unet"] = inference(lambda: model.denoiser(x, t, cond))
        if "decode" in only:
            calls["decode"] = inference(lambda: model.autoencoder.decode(z))
    if "train" in only:
        unet = build_model(None, arch, seed=0).unet.train()
        target = torch.randn(2, arch.unet.out_channels, h, h, generator=g)

        def step() -> None:
            loss = torch.nn.functional.mse_loss(unet(x, t, cond), target)
            loss.backward()
            unet.zero_grad(set_to_none=True)
        calls["train"] = step
    return calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", default=DEFAULT_PATHS, help="comma-separated CPU paths to turn off on the 'off' side")
    p.add_argument("--only", default="unet,decode,train", help="comma-separated: unet, decode, train")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size / 8)")
    p.add_argument("--pairs", type=int, default=6, help="timed pairs per component (after one warm-up pair)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--preset", default="sd-1", help="SD plugin preset (tiny: a smoke run)")
    args = p.parse_args()
    paths = {s.strip() for s in args.paths.split(",") if s.strip()}
    unknown = paths - set(cpu_paths.PATHS)
    if unknown:
        p.error(f"unknown CPU paths {sorted(unknown)}; the paths are {', '.join(cpu_paths.PATHS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    cpu_paths.select()
    print(f"CPU: {cpu_description()}; {args.preset} at {args.size}x{args.size}; {args.pairs} pairs; "
          f"off: {', '.join(sorted(paths))}", flush=True)
    rows = []
    for name, fn in components(args.preset, args.size, set(args.only.split(","))).items():
        ratios = paired_ratios(fn, with_paths_off(paths, fn), pairs=args.pairs)
        rows.append((name, *median_interval(ratios)))
        print(f"  {name}: " + " ".join(f"{r:.3f}" for r in ratios), flush=True)
    print("\n| component | on / off (median) | 95% interval |\n|---|---|---|")
    for name, med, low, high in rows:
        print(f"| {name} | {med:.2f} | {low:.2f}-{high:.2f} |")


if __name__ == "__main__":
    main()
