"""Keep freed tensor memory in the process on CPU (glibc's malloc thresholds).

PyTorch's CPU allocator has no cache: every tensor is a ``malloc`` and every free a ``free``.
glibc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB until it adapts) with a fresh ``mmap``
and ``munmap``s them on free, and trims the heap top above ``M_TRIM_THRESHOLD``; memory handed
back this way is zero-filled page by page on its next use. A UNet step allocates and frees
gigabytes (activations, and under bf16 autocast a bf16 copy of every weight), so with those
defaults it spends a third of its time in page faults (SD-1.5 at 256x256 under bf16: about
two million faults and +50 % time over 4 steps, see ``docs/benchmarks.md``). Whether glibc's
dynamic threshold has grown large enough depends on what the process freed earlier (loading
paths differ), which makes the cost look random between processes.

:func:`retain_freed_memory` raises both thresholds once, so that freed blocks stay in the heap
and are reused. Generation calls it on the CPU, and so does the training loop before its first
step (a 32 px Imagen base step: 0.82x the time, a seventh of the page faults; docs/training.md). Peak resident memory is unchanged (the same blocks are reused); memory is given
back to the system only when more than ``trim`` bytes lie free at the heap top. It is a no-op
off glibc, and ``T2I_MALLOC_RETAIN=0`` turns it off.

What the heap keeps can fragment: blocks freed between live ones are kept resident until reused.
:func:`release_free_memory` (glibc's ``malloc_trim``) hands every free page back at once;
generation calls it between the denoising loop and the decoder (whose activations are much larger
than the UNet's) and at its end, so one generation's leftovers never add to the next one's peak.
Pages handed back fault in again on reuse (a few tens of thousands per generation, not millions).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["ENV", "release_free_memory", "retain_freed_memory"]

ENV = "T2I_MALLOC_RETAIN"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MIB = 1 << 20
_done = False
_libc: ctypes.CDLL | bool | None = None  # None: not looked up yet; False: not glibc


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (``mallopt``/``malloc_trim`` semantics), else None."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim"):  # not musl
                    _libc = libc
            except OSError:
                pass
    return _libc or None


def retain_freed_memory(*, mmap_threshold: int = 256 * _MIB, trim: int = 512 * _MIB) -> bool:
    """Raise glibc's ``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD`` (once per process).

    Returns True when the thresholds are set (now or by an earlier call), False where this is
    not glibc or ``T2I_MALLOC_RETAIN`` is ``0``/``false``/``no``/``off``.
    """
    global _done
    if _done:
        return True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
    _done = ok
    return ok


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim(0)``).

    Only after :func:`retain_freed_memory` took effect (otherwise glibc trims on its own); returns
    True when it ran.
    """
    libc = _glibc() if _done else None
    if libc is None:
        return False
    trim = libc.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
