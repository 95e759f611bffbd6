"""Process settings that decide whether moving large messages runs at memory speed.

Three things, measured on this project's hot path (a 40 MB push into a server, 16 frames):

* **Freed memory is kept for reuse.** By default glibc returns a freed multi-megabyte buffer to the
  kernel (a large allocation gets its own mmap, a heap top above 128 KiB is trimmed, and a per-thread
  heap of 64 MiB that empties is unmapped), so every received frame lands in fresh pages and the
  process takes one page fault per 4 KiB: 9,100 faults per 40 MB push in the server, 10,700 per
  100 MB push, about half the push's time on a 2-core machine. `keep_freed_memory()` raises glibc's
  mmap threshold to its maximum (32 MiB, above the protocol's 24 MiB chunks), stops trimming and keeps
  one arena (ZeroMQ's I/O thread allocates in the main heap, which is never unmapped), so the next
  message reuses the pages of the last one: under 1 fault per push in the server. The process's peak
  memory is unchanged (the pages were in use at the peak anyway); what changes is that they are not
  handed back between messages. Bursts of temporary memory (a checkpoint copies theta and the
  optimizer state) are handed back by `release_free_memory()` (malloc_trim) right after them.
* **torch threads.** An OpenMP region waits for all its threads; on a machine with more busy
  processes than cores (a cluster of workers and a server on one host), one descheduled thread
  stalls the others: the same in-place add took 2.5 ms and 125 ms on a loaded 2-core machine with
  2 threads, and 3-4 ms with 1. `set_threads(n)` sets torch's intra-op threads (0: leave torch's
  default, one per core).
* **OpenMP threads spin briefly.** `short_openmp_spin()` (before torch is imported) sets libgomp's spin
  count so that the threads of one tensor's region go straight into the next tensor's, then sleep.

The first two are called once at the start of a server or worker process (`paramserver server`,
`paramserver worker`); they are process-wide and harmless where they do not apply (no glibc: nothing).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("common.tuning")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): allocations up to it come from the heap
MMAP_THRESHOLD_MAX = 32 << 20
_TRIM_NEVER = 2**31 - 1

_done = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed buffers (up to 32 MiB each) for reuse instead of returning them to the kernel.
    Returns whether it took effect (False where the C library has no glibc mallopt)."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):   # musl has a mallopt that does nothing
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # one arena from now on (threads started earlier keep theirs: call this before ZeroMQ's context exists,
    # as `paramserver server` and `paramserver worker` do)
    ok = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) == 1
          and mallopt(_M_ARENA_MAX, 1) == 1)
    _done = ok
    if not ok:
        log.debug("mallopt refused the settings; freed buffers go back to the kernel")
    return ok


def release_free_memory() -> bool:
    """Give the free pages of the heap back to the system now (glibc malloc_trim): after a burst of
    temporary allocations, e.g. a checkpoint's copies of theta and the optimizer state, which
    `keep_freed_memory` would otherwise keep for good. Messages received after it fault their pages in
    once more. Returns whether anything was released."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


#: iterations an idle OpenMP thread spins before it sleeps (libgomp's GOMP_SPINCOUNT; its default is 300000)
OPENMP_SPIN = "10000"


def short_openmp_spin() -> None:
    """torch's apply runs on OpenMP threads. libgomp's default has them spin for a long while after every
    parallel region, which starves ZeroMQ's I/O thread on a busy machine (measured: fused Adam 10x slower
    with 2 threads on 2 loaded cores); never spinning (OMP_WAIT_POLICY=PASSIVE) pays a sleep and a wake-up
    per region instead, i.e. per tensor of every check and update (a 10M-value SGD push took 8.2-8.8 ms in
    the server, against 6.3-6.7 ms with a short spin). A short spin covers the gap between one tensor's
    region and the next and then lets the core go. Must be set before torch is imported; an explicit
    OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)


def set_threads(n: int) -> int:
    """torch intra-op threads (0: keep torch's default). Returns the number in effect."""
    import torch
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


class ReusedBuffers:
    """Byte buffers handed out again once nothing refers to them any more, instead of a fresh allocation each
    time: above glibc's 32 MiB mmap threshold every allocation is a fresh mmap whose pages fault in one by one
    (a 154 MB tensor: 38,000 page faults per message). Whoever gets a buffer uses views of it; while any view
    is alive (a sync step holding a gradient, a caller keeping a pulled theta) its reference count says so and
    another buffer is used. Buffers are kept per (key, size), a key being e.g. a tensor's name, so that a
    message of many same-size tensors reuses one buffer for each: at most `keep` per (key, size) (in use or
    free); beyond that a buffer is allocated for the one use and freed with it. With `allowed` set (a set of
    (key, size)), only those are kept at all: a server allows its own layout, so that a peer sending made-up
    names or shapes cannot make it keep memory. Not thread-safe: one pool per thread that decodes."""

    def __init__(self, keep: int = 2, allowed: set | None = None):
        self.keep = keep
        self.allowed = allowed
        self.buffers: dict[tuple, list] = {}
        self.allocations = 0

    def get(self, size: int, key=None):
        import sys
        import numpy as np
        slot = (key, size)
        if self.allowed is not None and slot not in self.allowed:
            self.allocations += 1
            return np.empty(size, np.uint8)
        if not getattr(sys, "_is_gil_enabled", lambda: True)():   # reference counts are not exact without the GIL
            self.allocations += 1
            return np.empty(size, np.uint8)
        held = self.buffers.get(slot, [])
        for i in range(len(held)):
            # referrers of a free buffer: this list and getrefcount's argument; a view handed out adds one
            if sys.getrefcount(held[i]) == 2:
                return held[i]
        self.trim()
        self.allocations += 1
        buf = np.empty(size, np.uint8)
        held = self.buffers.setdefault(slot, [])
        if len(held) < self.keep:
            held.append(buf)
        return buf

    def trim(self) -> None:
        """Let go of free buffers beyond `keep` per (key, size), and of every free one no longer `allowed`."""
        import sys
        for slot, held in list(self.buffers.items()):
            keep = 0 if self.allowed is not None and slot not in self.allowed else self.keep
            i = 0
            while len(held) > keep and i < len(held):
                if sys.getrefcount(held[i]) == 2:
                    del held[i]
                else:
                    i += 1
            if not held:
                del self.buffers[slot]

    def clear(self) -> None:
        self.buffers = {}
