"""Per-step overhead of our samplers against diffusers' ``scheduler.step`` on the same tensors.

The model is a near-free function, so the time is the sampler's own bookkeeping and tensor
arithmetic. Run: ``python benchmarks/sampler_overhead.py [--steps 50] [--shape 1 4 64 64]``.
Prints a table of microseconds per step and the ratio ours / diffusers (lower is better).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    import diffusers

    from t2i_engine.diffusion import samplers as S
    from t2i_engine.diffusion.schedules import DiscreteSchedule, sampling_sigmas

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--shape", type=int, nargs="+", default=[1, 4, 64, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    sd = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
              beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    x_init = torch.randn(*args.shape, generator=torch.Generator().manual_seed(0)).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cases = [
        ("euler", S.sample_euler, diffusers.EulerDiscreteScheduler, {}),
        ("euler_ancestral", S.sample_euler_ancestral, diffusers.EulerAncestralDiscreteScheduler, {}),
        ("heun", S.sample_heun, diffusers.HeunDiscreteScheduler, {}),
        ("lms", S.sample_lms, diffusers.LMSDiscreteScheduler, {}),
        ("ddim", S.sample_ddim, diffusers.DDIMScheduler, {"set_alpha_to_one": True}),
        ("plms", S.sample_plms, diffusers.PNDMScheduler, {"skip_prk_steps": True}),
        ("dpmpp_2m", S.sample_dpmpp_2m, diffusers.DPMSolverMultistepScheduler, {}),
    ]
    print(f"device={dev} shape={tuple(args.shape)} steps={args.steps}")
    print(f"{'sampler':<16}{'ours us/step':>14}{'diffusers us/step':>19}{'ratio':>8}")
    for name, fn, cls, extra in cases:
        ref = cls(**sd, **extra)
        schedule = DiscreteSchedule(ref.alphas_cumprod, steps_offset=1)

        def ours() -> None:
            sigmas = sampling_sigmas(schedule, args.steps, device=dev)  # as set_timesteps below
            fn(lambda x, s: x * 0.9, x_init, sigmas, generator=torch.Generator(dev).manual_seed(0))
            sync()

        def theirs() -> None:
            ref.set_timesteps(args.steps, device=dev)
            lat = x_init
            g = torch.Generator(dev).manual_seed(0)
            kw = {"generator": g} if "generator" in ref.step.__code__.co_varnames else {}
            for t in ref.timesteps:
                lat = ref.step(ref.scale_model_input(lat, t) * 0.1, t, lat, **kw).prev_sample
            sync()

        a, b = _time(ours, args.repeats), _time(theirs, args.repeats)
        print(f"{name:<16}{a / args.steps * 1e6:>14.1f}{b / args.steps * 1e6:>19.1f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
