"""Which CPU inference fast paths pay on *this* machine: timed once, cached per machine.

The engine's CPU inference paths (oneDNN float32 dense layers, deep convolution weights packed
into oneDNN's layout, bf16 attention as two batched matmuls) were each measured faster than
PyTorch's own op on one machine. How much they gain depends on the CPU: oneDNN's float32 GEMM ran
about twice as fast as MKL's on an AMD EPYC (docs/benchmarks.md), where an Intel Xeon's MKL is
much closer to it, and packing pays only where the weight reorder it saves is large against the
convolution. So each path is chosen per machine instead of assumed:

* :func:`select` (called by the inference tasks before they run a model on the CPU,
  :func:`t2i_engine.tasks.common.prepare_for_inference`) looks up this machine's choices in a
  cache file; on the first run on a machine it times each path against PyTorch's op on a
  representative SD-sized shape, the two alternating call by call, and keeps the fast path only
  where its median time is below :data:`KEEP_BELOW` of PyTorch's; about 10 s with one thread
  on the Zen 4 of docs/benchmarks.md, once.
* :func:`enabled` answers the dispatchers, per call, from the selected choices (every path is on
  until :func:`select` runs, the behaviour before this module).

The machine's key is the CPU model and the ISA flags the paths depend on (AVX-512, AVX-512 BF16,
AMX), the PyTorch version and the thread count. The cache is ``cpu-paths.json`` under
``T2I_CACHE_DIR`` (default ``$XDG_CACHE_HOME/t2i-engine``, else ``~/.cache/t2i-engine``),
written atomically. ``T2I_CPU_PATHS`` sets the policy:

* ``auto`` (default): the cached choice, timed on first use;
* ``measure``: time again now and replace the cached entry;
* ``fixed``: no timing, every fast path on (the earlier fixed choice);
* ``off``: every fast path off (PyTorch's ops; ``T2I_KERNELS=torch`` does this and more).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2i_engine.errors import T2IError

__all__ = ["CPU_PATHS_ENV", "KEEP_BELOW", "LONG_SCORES", "PATHS", "Choice", "cache_file", "cpu_description", "default_clock", "enabled", "machine_key",
           "measure", "paired_ratios", "reset", "select",
           "unsupported_reason"]

CPU_PATHS_ENV = "T2I_CPU_PATHS"
POLICIES = ("auto", "measure", "fixed", "off")
KEEP_BELOW = 0.95
"""A fast path is kept where its median time is below this fraction of PyTorch's op."""
PAIRS = 7
FORMAT = 2  # 2: the convolution probes pack for their input's shape

PATHS: dict[str, str] = {
    "dense_fp32": "float32 linear and 1x1 convolutions through oneDNN (kernels/dense)",
    "dense_fp32_train": "float32 linear forward through oneDNN in training (kernels/dense OneDNNLinear)",
    "dense_fp32_train_backward": "its two backward GEMMs through oneDNN too, on transposed copies "
                                 "(else torch.mm, which reads the transposes in place)",
    "conv_gemm_train_fp32": "float32 training convolutions at low resolution as unfold + GEMM "
                            "(kernels/dense/gemm_conv.py)",
    "conv_gemm_train_bf16": "the same in bf16 (bf16 tensors, or bf16 CPU autocast)",
    "conv_pack_fp32": "float32 deep convolution weights packed into oneDNN's layout (nn/cpu_inference.py)",
    "conv_pack_bf16": "bf16 deep convolution weights packed into oneDNN's layout (nn/cpu_inference.py)",
    "conv_winograd_fp32": "float32 3x3 inference convolutions with many output pixels as Winograd F(4x4, 3x3) "
                          "(kernels/dense/winograd.py)",
    "conv_winograd_train_fp32": "the same for float32 training convolutions (forward and backward by autograd)",
    "linear_pack_fp32": "float32 linear weights packed into oneDNN's layout (nn/cpu_inference.py)",
    "linear_pack_bf16": "bf16 linear weights packed into oneDNN's layout (nn/cpu_inference.py)",
    "channels_last_bf16": "bf16 autoencoders in channels_last memory format, whose oneDNN convolutions then "
                          "skip the NCHW reorders of their activations (nn/cpu_inference.py)",
    "attention_bf16_short": "bf16 attention as baddbmm-softmax-bmm, up to LONG_SCORES scores per head "
                            "(kernels/attention/cpu.py)",
    "attention_bf16_long": "the same above LONG_SCORES scores per head (SD's 64x64-latent self-attention)",
}
"""The fast paths chosen per machine, by name, with what each is."""

_TRAINING_PATHS = frozenset({"dense_fp32_train", "dense_fp32_train_backward", "conv_gemm_train_fp32",
                             "conv_gemm_train_bf16", "conv_winograd_train_fp32"})
"""The paths whose probes run autograd (the others are timed in ``inference_mode``)."""

LONG_SCORES = 512 * 512
"""Query x key tokens per head from which attention counts as long: on the AMD EPYC (Zen 5) of
docs/benchmarks.md the batched-matmul attention took 0.48x SDPA's time at 256 x 256 tokens and
1.31x at 1024 x 1024, where its score matrix no longer stays in cache."""

_SELECTED: dict[str, Choice] | None = None  # None: not selected in this process (every path on)
_SELECTED_KEY: str | None = None  # the machine key _SELECTED was settled for (threads may change)


class CpuPathsError(T2IError, ValueError):
    """A bad ``T2I_CPU_PATHS`` value."""


@dataclass(frozen=True)
class Choice:
    """One path's decision on this machine: ``ratio`` is its median time over PyTorch's op's
    (None where it was not timed)."""

    path: str
    enabled: bool
    ratio: float | None


def policy() -> str:
    """The ``T2I_CPU_PATHS`` policy (``auto`` when unset)."""
    value = os.environ.get(CPU_PATHS_ENV, "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise CpuPathsError(f"{CPU_PATHS_ENV}={value!r} is not one of {', '.join(POLICIES)}")
    return value


def enabled(path: str) -> bool:
    """Whether the dispatchers may take fast path ``path`` (a key of :data:`PATHS`): never where
    this CPU cannot run it (:func:`unsupported_reason`), whatever the policy."""
    if unsupported_reason(path) is not None:
        return False
    if _SELECTED is None:
        return policy() != "off"
    return _SELECTED[path].enabled


@functools.cache
def unsupported_reason(path: str) -> str | None:
    """Why this CPU cannot run fast path ``path`` at all, or None. oneDNN packs bf16 convolution
    weights only with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2-only CPU (AMD Zen 3) the
    reorder raises, so the bf16 packing paths, and ``channels_last_bf16`` (which needs the same
    bf16 convolution), are tried once on a tiny weight instead of assumed."""
    if path not in PATHS:
        raise KeyError(f"unknown CPU path {path!r}; the paths are {', '.join(PATHS)}")
    if path not in ("conv_pack_bf16", "linear_pack_bf16", "channels_last_bf16"):
        return None
    from t2i_engine.kernels.dense.dispatch import onednn_available, pack_conv_weight, pack_linear_weight, packed_linear

    if not onednn_available():
        return "PyTorch without oneDNN"
    try:
        if path in ("conv_pack_bf16", "channels_last_bf16"):  # both need oneDNN's bf16 convolution
            pack_conv_weight(torch.zeros(8, 8, 3, 3, dtype=torch.bfloat16), stride=(1, 1), padding=(1, 1),
                             dilation=(1, 1), groups=1)
        else:
            with torch.inference_mode():
                packed_linear(torch.zeros(2, 8, dtype=torch.bfloat16),
                              pack_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16)), None)
    except RuntimeError as e:
        return str(e).strip().splitlines()[0]
    return None


def reset() -> None:
    """Forget this process's selection and support checks (tests; a later :func:`select` reads the
    cache again)."""
    global _SELECTED, _SELECTED_KEY
    _SELECTED = _SELECTED_KEY = None
    unsupported_reason.cache_clear()


def cache_file() -> Path:
    """Where the per-machine choices are kept."""
    root = os.environ.get("T2I_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "t2i-engine") if xdg else str(Path.home() / ".cache" / "t2i-engine")
    return Path(root) / "cpu-paths.json"


@functools.cache
def _cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return model, tuple(f for f in wanted if f in flags)


def cpu_description() -> str:
    """This machine's CPU for a report: model name, the ISA flags the paths depend on, logical CPUs."""
    model, flags = _cpu_model_and_flags()
    return f"{model} [{' '.join(flags)}], {os.cpu_count() or '?'} CPUs"


def machine_key(threads: int | None = None) -> str:
    """The cache key: CPU model, the ISA flags the paths depend on, PyTorch version, threads."""
    model, flags = _cpu_model_and_flags()
    threads = torch.get_num_threads() if threads is None else threads
    return f"{model} [{' '.join(flags)}] torch {torch.__version__} threads {threads}"


def default_clock() -> Callable[[], float]:
    """The timer for paired measurements: with one torch thread the process's CPU time, which a
    busy machine does not inflate by descheduling the process (memory-bandwidth contention still
    shows, as it should); with more threads the wall clock, since that is what parallel ops buy."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def paired_ratios(fast: Callable[[], Any], plain: Callable[[], Any], *, pairs: int, warmup: int = 1,
                  clock: Callable[[], float] | None = None) -> list[float]:
    """``pairs`` ratios ``t(fast) / t(plain)``, each from two calls back to back; the order
    alternates pair by pair (``fast`` first on even pairs) so that neither side always runs warm
    and drift of the machine hits both halves of a pair alike. ``clock`` defaults to
    :func:`default_clock`."""
    clock = clock or default_clock()
    for _ in range(warmup):  # first calls allocate and pick kernels
        fast(), plain()
    ratios = []
    for i in range(pairs):
        times = {}
        for name, fn in ((("fast", fast), ("plain", plain)) if i % 2 == 0 else (("plain", plain), ("fast", fast))):
            start = clock()
            fn()
            times[name] = clock() - start
        ratios.append(times["fast"] / max(times["plain"], 1e-9))
    return ratios


def _probes() -> dict[str, Callable[[], tuple[Callable[[], Any], Callable[[], Any]]]]:
    """Per path, a builder of its (fast, plain) callables on SD-1.5-sized shapes (256 px, guidance
    batch of 2); built only for the paths this CPU supports."""
    from t2i_engine.kernels.attention.cpu import bmm_attention
    from t2i_engine.kernels.dense.dispatch import OneDNNLinear, pack_conv_weight, pack_linear_weight, packed_linear
    from t2i_engine.kernels.dense.gemm_conv import gemm_conv2d
    from t2i_engine.kernels.dense.winograd import winograd_conv2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 320, generator=g)
    w = torch.randn(1280, 320, generator=g) / 18
    xc = torch.randn(2, 640, 16, 16, generator=g)
    wc = torch.randn(640, 640, 1, 1, generator=g) / 25

    def dense_fast() -> None:
        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        torch.ops.mkldnn._convolution_pointwise(xc, wc, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")

    def dense_plain() -> None:
        torch.nn.functional.linear(x, w)
        torch.nn.functional.conv2d(xc, wc)

    xt = torch.randn(2048, 320, generator=g, requires_grad=True)
    wt = (torch.randn(1280, 320, generator=g) / 18).requires_grad_()
    bt = torch.zeros(1280, requires_grad=True)

    up = torch.randn(2048, 1280, generator=g)

    def train(onednn_backward: bool | None) -> Callable[[], None]:
        def call() -> None:  # forward and backward of one training linear
            with torch.enable_grad():
                out = (torch.nn.functional.linear(xt, wt, bt) if onednn_backward is None
                       else OneDNNLinear.apply(xt, wt, bt, onednn_backward))
                out.backward(up)
        return call

    def conv_pair(dtype: torch.dtype) -> tuple[Callable[[], Any], Callable[[], Any]]:
        xd = torch.randn(2, 1280, 8, 8, generator=g).to(dtype)
        wd = (torch.randn(1280, 1280, 3, 3, generator=g) / 100).to(dtype)
        packed = pack_conv_weight(wd, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
                                  input_size=tuple(xd.shape))  # as ops.Conv2d repacks for its input
        return (lambda: torch.ops.mkldnn._convolution_pointwise(xd, packed, None, [1, 1], [1, 1], [1, 1], 1,
                                                                "none", [], ""),
                lambda: torch.nn.functional.conv2d(xd, wd, padding=1))

    def winograd_pair(train: bool) -> tuple[Callable[[], Any], Callable[[], Any]]:
        xw = torch.randn(2, 320, 32, 32, generator=g).requires_grad_(train)  # SD's first level at 256 px
        ww = (torch.randn(320, 320, 3, 3, generator=g) / 50).requires_grad_(train)
        uw = torch.randn(2, 320, 32, 32, generator=g)

        def call(conv: Callable[..., Any]) -> Callable[[], None]:
            def run() -> None:  # the forward, and in training the backward
                with torch.enable_grad() if train else contextlib.nullcontext():
                    y = conv(xw, ww)
                    if train:
                        torch.autograd.grad(y, (xw, ww), uw)
            return run
        return call(winograd_conv2d), call(lambda x, w: torch.nn.functional.conv2d(x, w, padding=1))

    def linear_pair(dtype: torch.dtype) -> tuple[Callable[[], Any], Callable[[], Any]]:
        # SD's weight-bound feed-forward linears: 128 rows (16x16 latents) x 640 -> 5120, and 32 rows x 1280 -> 10240
        cases = [(torch.randn(rows, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) / 30).to(dtype))
                 for rows, k, n in ((128, 640, 5120), (32, 1280, 10240))]
        packed = [(xl, pack_linear_weight(wl)) for xl, wl in cases]

        def fast() -> None:
            for xl, pw in packed:
                packed_linear(xl, pw, None)

        def plain() -> None:
            for xl, wl in cases:
                torch.nn.functional.linear(xl, wl)
        return fast, plain

    def gemm_conv_pair(dtype: torch.dtype) -> tuple[Callable[[], Any], Callable[[], Any]]:
        xg = torch.randn(2, 1280, 2, 2, generator=g).to(dtype).requires_grad_()  # SD's 2x2 level
        wg = (torch.randn(1280, 1280, 3, 3, generator=g) / 100).to(dtype).requires_grad_()
        up = torch.randn(2, 1280, 2, 2, generator=g).to(dtype)

        def call(conv: Callable[..., Any]) -> Callable[[], None]:
            def run() -> None:  # forward and backward of one deep training convolution
                with torch.enable_grad():
                    torch.autograd.grad(conv(xg, wg, None, 1, 1), (xg, wg), up)
            return run
        return call(gemm_conv2d), call(torch.nn.functional.conv2d)

    def channels_last_pair() -> tuple[Callable[[], Any], Callable[[], Any]]:
        # a KL decoder block at 256 px (256 channels at 64x64) under bf16 autocast: norm, SiLU, 3x3 conv
        xn = torch.randn(1, 256, 64, 64, generator=g)
        wn = (torch.randn(256, 256, 3, 3, generator=g) / 50).to(torch.bfloat16)
        layouts = [(xn.contiguous(memory_format=m), wn.contiguous(memory_format=m))
                   for m in (torch.channels_last, torch.contiguous_format)]

        def block(xb: torch.Tensor, wb: torch.Tensor) -> Callable[[], None]:
            def run() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    h = torch.nn.functional.silu(torch.nn.functional.group_norm(xb, 32))
                    torch.nn.functional.conv2d(h, wb, padding=1)
            return run
        return block(*layouts[0]), block(*layouts[1])

    def attention_pair(tokens: int, dim: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
        q, k, v = (torch.randn(2, 8, tokens, dim, generator=g).to(torch.bfloat16) for _ in range(3))
        return (lambda: bmm_attention(q, k, v), lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))

    return {
        "dense_fp32": lambda: (dense_fast, dense_plain),
        "dense_fp32_train": lambda: (train(False), train(None)),  # the same backward: the forward's gain
        "dense_fp32_train_backward": lambda: (train(True), train(False)),  # the same forward: the backward's
        "conv_gemm_train_fp32": lambda: gemm_conv_pair(torch.float32),
        "conv_gemm_train_bf16": lambda: gemm_conv_pair(torch.bfloat16),
        "conv_pack_fp32": lambda: conv_pair(torch.float32),
        "conv_pack_bf16": lambda: conv_pair(torch.bfloat16),
        "conv_winograd_fp32": lambda: winograd_pair(False),
        "conv_winograd_train_fp32": lambda: winograd_pair(True),
        "linear_pack_fp32": lambda: linear_pair(torch.float32),
        "linear_pack_bf16": lambda: linear_pair(torch.bfloat16),
        "channels_last_bf16": channels_last_pair,
        "attention_bf16_short": lambda: attention_pair(256, 80),  # SD's 16x16-latent self-attention
        "attention_bf16_long": lambda: attention_pair(1024, 40),  # 32x32 latents: 256 px images
    }


def measure() -> dict[str, Choice]:
    """Time every path against PyTorch's op now (about 10 s with one thread): a :class:`Choice` per path; a
    path this CPU cannot run (:func:`unsupported_reason`) is off and untimed."""
    from t2i_engine.kernels.dense.dispatch import onednn_available

    if not onednn_available():
        return {p: Choice(p, False, None) for p in PATHS}
    choices = {}
    for path, build in _probes().items():
        if unsupported_reason(path) is not None:
            choices[path] = Choice(path, False, None)
            continue
        fast, plain = build()
        with contextlib.nullcontext() if path in _TRAINING_PATHS else torch.inference_mode():
            ratio = statistics.median(paired_ratios(fast, plain, pairs=PAIRS))
        choices[path] = Choice(path, ratio < KEEP_BELOW, round(ratio, 3))
    return choices


def _read_cache(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("format"), int) and data["format"] < FORMAT:
            return {}  # an earlier version's probes: time again, silently
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("machines"), dict):
            raise ValueError("not a cpu-paths cache of this version")
        return data["machines"]
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: unreadable ({e}); the CPU paths are timed again", stacklevel=3)
        return {}


def _write_cache(path: Path, machines: dict[str, Any]) -> None:
    from t2i_engine.checkpoint.io import atomic_write_bytes
    from t2i_engine.errors import StorageError

    data = json.dumps({"format": FORMAT, "machines": machines}, indent=1, sort_keys=True).encode()
    try:
        atomic_write_bytes(str(path), data)
    except StorageError as e:  # a read-only home must not stop a run: the choice holds for this process
        warnings.warn(f"{path}: could not save the CPU path choices ({e})", stacklevel=3)


def _from_entry(entry: Any) -> dict[str, Choice] | None:
    if not isinstance(entry, dict) or set(entry) != set(PATHS):
        return None  # another version's paths: time again
    try:
        return {p: Choice(p, bool(e["enabled"]), e.get("ratio")) for p, e in entry.items()}
    except (KeyError, TypeError):
        return None


def select() -> dict[str, Choice]:
    """Settle this process's CPU paths by the ``T2I_CPU_PATHS`` policy and return them.

    ``auto`` keeps what this process already settled for this machine key, else reads this
    machine's entry in :func:`cache_file`, timing the paths (and saving the entry) when there is
    none; ``measure`` always times; ``fixed`` and ``off`` time nothing.
    """
    global _SELECTED, _SELECTED_KEY
    mode = policy()
    key = None
    if mode in ("fixed", "off"):
        choices = {p: Choice(p, mode == "fixed", None) for p in PATHS}
    else:
        key = machine_key()
        if mode == "auto" and _SELECTED is not None and _SELECTED_KEY == key:
            return dict(_SELECTED)
        file = cache_file()
        machines = _read_cache(file)
        cached = _from_entry(machines.get(key)) if mode == "auto" else None
        if cached is None:
            cached = measure()
            machines[key] = {p: {"enabled": c.enabled, "ratio": c.ratio} for p, c in cached.items()}
            _write_cache(file, machines)
        choices = cached
    _SELECTED, _SELECTED_KEY = dict(choices), key
    return choices
