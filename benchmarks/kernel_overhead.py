"""Host time per call of the Triton kernels at shapes too small for the GPU to matter.

docs/kernels.md records a floor of about 1.1 ms per GroupNorm+SiLU forward+backward on an H200,
whatever the shape. At a tiny shape the GPU finishes each kernel in microseconds, so the wall time
of a long run of calls is what the host spends per call. This script splits that time by layer:

* ``eager``: PyTorch's own op (``F.group_norm`` + ``F.silu``, or SDPA), the yardstick;
* ``launch``: our Python launcher called directly (``group_norm_forward`` / ``attention_forward``:
  buffer allocation and the Triton launches, no dispatcher);
* ``custom op``: ``torch.ops.t2i_engine.*`` (the ``torch.library.custom_op`` wrapper on top);
* ``public``: the user-facing function with ``T2I_KERNELS=triton`` (dispatch checks on top);

each forward only and forward+backward (the backward goes through autograd). Then
``torch.profiler`` lists the top host-side entries of a few forward+backward calls.

    python benchmarks/kernel_overhead.py            # CUDA only
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _per_call_us(fn: Callable[[], object], *, calls: int, rounds: int) -> float:
    """Median over rounds of the wall microseconds per call of ``calls`` back-to-back calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def _fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for t in inputs:
            t.grad = None
        y = fn()
        y.backward(torch.ones_like(y))

    return run


def _group_norm_cases(dtype: torch.dtype) -> tuple[dict, list[torch.Tensor]]:
    from t2i_engine.kernels import group_norm
    from t2i_engine.kernels.group_norm.triton import group_norm_forward

    x = torch.randn(1, 64, 8, 8, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(64, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(64, device="cuda", dtype=dtype, requires_grad=True)
    eager = lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))  # noqa: E731
    launch = lambda: group_norm_forward(x.detach(), w.detach(), b.detach(), 32, 1e-5, True)[0]  # noqa: E731
    op = lambda: torch.ops.t2i_engine.group_norm_fwd(x, w, b, 32, 1e-5, True)[0]  # noqa: E731
    public = lambda: group_norm(x, 32, w, b, activation="silu")  # noqa: E731
    return {"eager": (eager, eager), "launch": (launch, None), "custom op": (op, op), "public": (public, public)}, [x, w, b]


def _attention_cases(dtype: torch.dtype) -> tuple[dict, list[torch.Tensor]]:
    from t2i_engine.kernels import attention
    from t2i_engine.kernels.attention.triton import attention_forward

    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    eager = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    launch = lambda: attention_forward(q.detach(), k.detach(), v.detach(), None, None)[0]  # noqa: E731
    op = lambda: torch.ops.t2i_engine.attention_fwd(q, k, v, None, None)[0]  # noqa: E731
    public = lambda: attention(q, k, v)  # noqa: E731
    return {"eager": (eager, eager), "launch": (launch, None), "custom op": (op, op), "public": (public, public)}, [q, k, v]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_overhead.py needs a CUDA GPU")
    os.environ["T2I_KERNELS"] = "triton"
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}; microseconds per call "
          f"(median of {args.rounds} runs of {args.calls} calls)\n")
    print("| kernel | layer | forward (us) | forward+backward (us) |\n|---|---|---|---|")
    profiled: list[Callable[[], None]] = []
    for name, build in (("group_norm+silu (1,64,8,8)", _group_norm_cases), ("attention (1,2,64,64)", _attention_cases)):
        cases, inputs = build(dtype)
        for layer, (fwd, grad_fn) in cases.items():
            with torch.no_grad():
                t_fwd = _per_call_us(fwd, calls=args.calls, rounds=args.rounds)
            t_bwd = "-"
            if grad_fn is not None:
                t_bwd = f"{_per_call_us(_fwd_bwd(grad_fn, inputs), calls=args.calls, rounds=args.rounds):.1f}"
                if layer == "public":
                    profiled.append(_fwd_bwd(grad_fn, inputs))
            print(f"| {name} | {layer} | {t_fwd:.1f} | {t_bwd} |", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for fn in profiled:
            for _ in range(10):
                fn()
        torch.cuda.synchronize()
    print("\nHost time of 10 forward+backward calls of each public Triton kernel:\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
