"""Host memory settings for XLA on a CPU: keep freed memory for reuse instead of handing it back to the OS.

Why. XLA's CPU runtime allocates each program's buffers on every call through the C allocator. With glibc's
defaults every large block (> 32 MiB at most) is a fresh `mmap` that is unmapped again when freed, so every call
of a training step faults its whole working set back in, page by page, and the kernel zero-fills each page.
Measured on this project's 2-core CPU: one 5 x 128 EGNN forward + backward (batch 64 at 20 atoms) took ~200,000
page faults and 0.27 s of kernel time per call; with freed memory kept, none. `python tools/benchmark.py
--configs qm9-finetune qm9-small --which train denoiser` against the same with `--no-keep-freed-memory`:
training 185 against 141 mol/s (5 x 128) and 700 against 419 mol/s (4 x 64), the process's peak memory 4.1
against 2.7 GiB (README, "Speed").

What. `keep_freed_memory()` sets glibc's `mallopt` so that every thread allocates from the one main heap
(M_ARENA_MAX = 1), nothing is served by `mmap` (M_MMAP_MAX = 0) and the heap is never trimmed (M_TRIM_THRESHOLD
at its maximum): after the first calls of a program its buffers come from memory that is already mapped. The
cost is memory: the process keeps its heap until it exits, and the heap, fragmented by the runtime's many
threads, grows in a few steps over the first calls before it settles (measured: a 2 x 64 EGNN's gradient at
batch 64 x 29 settles at 1.4 GiB of resident memory after ~100 calls and stays there for 400; ~0.7 GiB with
glibc's defaults, re-faulted on every call).

`release_freed_memory()` hands the heap's free pages back to the OS at once (glibc's `malloc_trim`), for the
points of a long run where its working set shrinks: e.g. recipes/progressive_distill.py after every round
(measured without it: 10-12 GB resident from the second probe on, experiments/NOTES.md; the next calls fault
their buffers in once more and settle again).

Call it before JAX starts its CPU backend (the first array created): the recipes do, through `cli.run`. It does
nothing (and says so by returning False) off glibc, e.g. on macOS, or when `SDE_MOL_KEEP_FREED_MEMORY=off`.
The same settings can be given to any process from outside: `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=<large>` in its environment.
"""

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_OFF = ("0", "off", "false", "no")


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # not glibc
    return libc


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS now (`malloc_trim(0)`); True when glibc released some. Nothing
    happens off glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc.malloc_trim(0) == 1


def keep_freed_memory() -> bool:
    """Apply the settings of the module docstring; True when all three were accepted by glibc."""
    if os.environ.get("SDE_MOL_KEEP_FREED_MEMORY", "").lower() in _OFF:
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
