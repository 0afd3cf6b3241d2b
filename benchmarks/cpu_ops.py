"""The engine's CPU inference paths against PyTorch's defaults, op by op, at SD-1.5 shapes.

Prints one table: milliseconds per call for PyTorch's op and the engine's, and their ratio, for

* float32 linear (GEGLU, attention and feed-forward shapes at 256 px): ``F.linear`` (MKL) against
  ``t2i_engine.kernels.linear`` (oneDNN);
* float32 1x1 convolution: ``F.conv2d`` against ``t2i_engine.kernels.conv2d``;
* 3x3 convolutions of the UNet's deep levels, float32 and bf16: a plain weight against one packed
  by ``t2i_engine.nn.cpu_inference`` (``kernels.dense.dispatch.pack_conv_weight``);
* bf16 attention: ``F.scaled_dot_product_attention`` against ``t2i_engine.kernels.attention``.

Everything runs under ``torch.inference_mode`` with freed memory retained
(``retain_freed_memory``), as generation does.

    python benchmarks/cpu_ops.py [--threads 1] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from t2i_engine.kernels import attention, conv2d, linear
from t2i_engine.kernels.dense.dispatch import pack_conv_weight, packed_conv2d
from t2i_engine.utils.cpu_memory import retain_freed_memory


def _ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best * 1e3


def _rows(repeats: int) -> list[tuple[str, float, float]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for m, k, n in [(2048, 320, 2560), (2048, 1280, 320), (2048, 320, 320), (512, 640, 5120), (154, 768, 320)]:
        x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        rows.append((f"linear fp32 {m}x{k} -> {n}", _ms(lambda: F.linear(x, w, b), repeats),
                     _ms(lambda: linear(x, w, b), repeats)))
    for c_in, c_out, s in [(320, 320, 32), (640, 320, 32), (1280, 1280, 8)]:
        x, w = torch.randn(2, c_in, s, s, generator=g), torch.randn(c_out, c_in, 1, 1, generator=g)
        rows.append((f"conv1x1 fp32 2x{c_in}x{s}x{s} -> {c_out}", _ms(lambda: F.conv2d(x, w), repeats),
                     _ms(lambda: conv2d(x, w), repeats)))
    for dtype in (torch.float32, torch.bfloat16):
        for c_in, c_out, s in [(1280, 1280, 4), (2560, 1280, 4), (1280, 1280, 8), (640, 640, 16)]:
            x = torch.randn(2, c_in, s, s, generator=g).to(dtype)
            w, b = (torch.randn(c_out, c_in, 3, 3, generator=g) * 0.01).to(dtype), torch.randn(c_out, generator=g).to(dtype)
            packed = pack_conv_weight(w, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
            name = f"conv3x3 {str(dtype)[6:]} 2x{c_in}x{s}x{s} -> {c_out}, packed"
            rows.append((name, _ms(lambda: F.conv2d(x, w, b, padding=1), repeats),
                         _ms(lambda: packed_conv2d(x, packed, b, (1, 1), (1, 1), (1, 1), 1), repeats)))
    for lq, lk, d in [(1024, 1024, 40), (1024, 77, 40), (256, 256, 80), (64, 64, 160)]:
        q, k, v = (torch.randn(2, 8, n, d, generator=g).bfloat16() for n in (lq, lk, lk))
        rows.append((f"attention bf16 16 heads {lq}x{lk}, d {d}", _ms(lambda: F.scaled_dot_product_attention(q, k, v),
                                                                       repeats),
                     _ms(lambda: attention(q, k, v), repeats)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=10, help="calls per timing (best of 3 timings)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), oneDNN "
          f"{'on' if torch.backends.mkldnn.is_available() else 'missing'}")
    with torch.inference_mode():
        rows = _rows(args.repeats)
    print("\n| op | PyTorch (ms) | engine (ms) | engine / PyTorch |\n|---|---:|---:|---:|")
    for name, ref, ours in rows:
        print(f"| {name} | {ref:.2f} | {ours:.2f} | {ours / ref:.2f}x |")


if __name__ == "__main__":
    main()
