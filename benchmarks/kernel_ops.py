"""Benchmark the engine's kernels on Stable Diffusion 1.5 shapes (512 and 1024 px).

Attention: TFLOPS of the Triton flash kernel, torch SDPA restricted to its flash backend, and
eager attention (matmul, softmax, matmul), forward and forward+backward.
GroupNorm+SiLU: GB/s of the fused Triton kernel and eager ``F.silu(F.group_norm(x))``.

    python benchmarks/kernel_ops.py            # full shape list
    python benchmarks/kernel_ops.py --quick    # few repeats (and small shapes on CPU)

On a machine without CUDA it times the PyTorch rows on CPU (float32) and marks the Triton rows
unavailable. Prints a Markdown table; ratios are against SDPA-flash (attention) and eager
(GroupNorm). FLOPs count the matmuls only: 4*B*H*Lq*Lk*D forward, 2.5x that backward. Bytes
count the minimum traffic: read x + write y forward, plus read x, dy + write dx backward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# SD 1.5 UNet at batch 2 (classifier-free guidance): (name, heads, L (image tokens), head_dim).
# Latents are px/8; levels have 320/640/1280 channels with 8 heads (head_dim 40/80/160).
ATTN_LEVELS = {
    512: [("down1", 8, 64 * 64, 40), ("down2", 8, 32 * 32, 80), ("down3", 8, 16 * 16, 160)],
    1024: [("down1", 8, 128 * 128, 40), ("down2", 8, 64 * 64, 80), ("down3", 8, 32 * 32, 160)],
}
SD2_LEVEL = {512: ("sd2-down1", 5, 64 * 64, 64), 1024: ("sd2-down1", 5, 128 * 128, 64)}
TEXT_TOKENS = 77
GN_SHAPES = {  # (B, C, H, W) of the GroupNorm+SiLU inputs, 32 groups
    512: [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)],
    1024: [(2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32)],
}


@dataclass
class Row:
    op: str
    case: str
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    impl: str
    ms: float | None  # None: unavailable
    rate: float | None  # TFLOPS or GB/s
    unit: str
    note: str = ""


def _timer(fn: Callable[[], object], *, device: torch.device, warmup: int, repeat: int) -> float:
    """Median milliseconds of fn() over repeat runs after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _with_backward(fn: Callable[[], torch.Tensor], grad_out: torch.Tensor, inputs: list[torch.Tensor]):
    def run() -> None:
        for t in inputs:
            t.grad = None
        fn().backward(grad_out)

    return run


def _eager_attention(q, k, v):
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _attention_rows(cases, *, device, dtype, warmup, repeat, triton_fn) -> list[Row]:
    rows = []
    for case, B, H, Lq, Lk, D in cases:
        q = torch.randn(B, Lq, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(B, Lk, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        v = torch.randn(B, Lk, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        grad_out = torch.randn(B, H, Lq, D, device=device, dtype=dtype)
        flops = 4.0 * B * H * Lq * Lk * D
        shape = f"B{B} H{H} L{Lq}x{Lk} d{D}"
        impls: list[tuple[str, Callable | None, str]] = [
            ("triton", (lambda: triton_fn(q, k, v)) if triton_fn else None, "unavailable (no CUDA/triton)"),
            ("sdpa-flash", (lambda: _sdpa_flash(q, k, v)) if device.type == "cuda" else None,
             "unavailable (flash needs CUDA)"),
            ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v), ""),
            ("eager", lambda: _eager_attention(q, k, v), ""),
        ]
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            for name, fn, why in impls:
                if fn is None:
                    rows.append(Row("attention", case, shape, mode, name, None, None, "TFLOPS", why))
                    continue
                run = fn if mode == "fwd" else _with_backward(fn, grad_out, [q, k, v])
                try:
                    with torch.set_grad_enabled(mode != "fwd"):
                        ms = _timer(run, device=device, warmup=warmup, repeat=repeat)
                except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. eager out of memory
                    rows.append(Row("attention", case, shape, mode, name, None, None, "TFLOPS", str(e)[:40]))
                    continue
                rows.append(Row("attention", case, shape, mode, name, ms, flops * mult / ms / 1e9, "TFLOPS"))
    return rows


def _group_norm_rows(shapes, *, device, dtype, warmup, repeat, triton_fn) -> list[Row]:
    rows = []
    for B, C, H, W in shapes:
        x = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        impls: list[tuple[str, Callable | None, str]] = [
            ("triton", (lambda: triton_fn(x, 32, w, b, silu=True)) if triton_fn else None,
             "unavailable (no CUDA/triton)"),
            ("eager", lambda: F.silu(F.group_norm(x, 32, w, b)), ""),
        ]
        for mode, traffic in (("fwd", 2), ("fwd+bwd", 5)):
            for name, fn, why in impls:
                shape = f"{B}x{C}x{H}x{W}"
                if fn is None:
                    rows.append(Row("groupnorm+silu", "unet", shape, mode, name, None, None, "GB/s", why))
                    continue
                run = fn if mode == "fwd" else _with_backward(fn, grad_out, [x, w, b])
                with torch.set_grad_enabled(mode != "fwd"):
                    ms = _timer(run, device=device, warmup=warmup, repeat=repeat)
                rows.append(Row("groupnorm+silu", "unet", shape, mode, name, ms, traffic * nbytes / ms / 1e6, "GB/s"))
    return rows


def _ratios(rows: list[Row]) -> dict[int, str]:
    """Speed ratio of each row against the baseline row of the same case and mode."""
    base_impl = {"attention": "sdpa-flash", "groupnorm+silu": "eager"}
    out = {}
    for i, r in enumerate(rows):
        base = next((b for b in rows if (b.op, b.shape, b.mode, b.impl) == (r.op, r.shape, r.mode, base_impl[r.op])), None)
        if base is None or base.ms is None:  # no flash on CPU: compare with plain SDPA
            base = next((b for b in rows if (b.op, b.shape, b.mode, b.impl) == (r.op, r.shape, r.mode, "sdpa")), None)
        out[i] = f"{base.ms / r.ms:.2f}x {base.impl}" if (base and base.ms and r.ms) else "-"
    return out


def _print_table(rows: list[Row], header: str) -> None:
    print(header)
    print()
    print("| op | case | shape | pass | impl | ms | rate | vs |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = _ratios(rows)
    for i, r in enumerate(rows):
        ms = f"{r.ms:.3f}" if r.ms is not None else r.note or "unavailable"
        rate = f"{r.rate:.1f} {r.unit}" if r.rate is not None else "-"
        print(f"| {r.op} | {r.case} | {r.shape} | {r.mode} | {r.impl} | {ms} | {rate} | {ratios[i]} |")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time every case, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (and small shapes on CPU)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024], choices=[512, 1024])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="GPU dtype")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    warmup, repeat = (1, 3) if args.quick else (5, 20)
    if not cuda:
        warmup, repeat = (0, 1) if args.quick else (1, 3)

    attn_triton = gn_triton = None
    if cuda:
        try:
            from t2i_engine.kernels.attention.triton import triton_attention
            from t2i_engine.kernels.group_norm.triton import triton_group_norm

            attn_triton, gn_triton = triton_attention, triton_group_norm
        except ImportError:
            pass

    attn_cases, gn_shapes = [], []
    for res in args.resolutions:
        for name, H, L, D in ATTN_LEVELS[res] + [SD2_LEVEL[res]]:
            attn_cases.append((f"{res}px {name} self", 2, H, L, L, D))
        for name, H, L, D in ATTN_LEVELS[res][:2]:
            attn_cases.append((f"{res}px {name} cross", 2, H, L, TEXT_TOKENS, D))
        gn_shapes += GN_SHAPES[res]
    if not cuda and args.quick:  # keep a CPU run to seconds: the small levels only
        attn_cases = [c for c in attn_cases if c[3] * c[4] <= 1024 * 1024]
        gn_shapes = [s for s in gn_shapes if s[2] * s[3] <= 32 * 32]

    name = torch.cuda.get_device_name() if cuda else "CPU (no CUDA: Triton rows unavailable)"
    rows = _attention_rows(attn_cases, device=device, dtype=dtype, warmup=warmup, repeat=repeat, triton_fn=attn_triton)
    rows += _group_norm_rows(gn_shapes, device=device, dtype=dtype, warmup=warmup, repeat=repeat, triton_fn=gn_triton)
    _print_table(rows, f"## Kernels on {name}, {dtype}, torch {torch.__version__}, median of {repeat}")


if __name__ == "__main__":
    main()
