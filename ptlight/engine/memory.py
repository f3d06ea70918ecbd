"""Opt-in host-memory hygiene (``malloc_mmap_threshold=131072``): keep glibc from hoarding
freed tensor memory, at a price in speed.

glibc's ``malloc`` serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB at start) with ``mmap``
and returns them to the system on ``free``. But the threshold is *dynamic*: the first time a
large mmapped block is freed, glibc raises the threshold to that block's size (up to 32 MiB),
so from then on tensors of up to 32 MiB come from the heap, and a freed heap block is only
reused, rarely returned. A training step allocates and frees hundreds of MB of activations
and gradients in blocks of 1–30 MB, so the heap keeps the high-water mark of every pattern it
has seen: on the DPO benchmark (``scripts/bench_dpo.py``, a 50 M-parameter LFM2) peak RSS was
1846 MB with an 8 MiB threshold and 1580 MB with it pinned, for the same tensors.

The price is speed: every large tensor of a step is then mapped and page-faulted in fresh
(~400 k minor faults a step on that benchmark, steps 25-50% slower), and a small model's many
short steps pay more (the default SFT -> DPO job about twice as long; docs/performance.md).
So it is off by default.

:func:`pin_mmap_threshold` pins it (at 128 KiB, glibc's own starting value, by default),
which turns the dynamic adjustment off. Nothing else changes: same allocations, same numbers.
It is a process-wide setting, applied by :func:`ptlight.train.train_stage` before any weights
load when the root config's ``malloc_mmap_threshold`` is set.

glibc's own variable, ``MALLOC_MMAP_THRESHOLD_=<bytes>`` in the environment, does the same
from process start; when it is set this leaves it alone (see ``man mallopt``). Non-glibc
platforms (macOS, musl) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # <malloc.h>
DEFAULT_THRESHOLD = 128 * 1024
ENV = "MALLOC_MMAP_THRESHOLD_"

_pinned: int | None = None


def pin_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> int | None:
    """Pin glibc's mmap threshold (bytes); returns the value in effect, or None when this
    process's allocator is not glibc's or the user set ``MALLOC_MMAP_THRESHOLD_``."""
    global _pinned
    if _pinned is not None:
        return _pinned
    if not sys.platform.startswith("linux") or ENV in os.environ:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return None
    _pinned = int(threshold)
    return _pinned
