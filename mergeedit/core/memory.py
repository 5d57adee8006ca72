"""Memory facts: the machine's RAM, the default budget, and this process's resident set."""

from __future__ import annotations

import ctypes
import functools
import os
import resource

DEFAULT_BUDGET_CAP = 2 * 1024**3


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 1024**3


def default_budget() -> int:
    """A few GB, never more than a quarter of RAM."""
    return min(DEFAULT_BUDGET_CAP, total_ram() // 4)


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return peak_rss()


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once; None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim(0)``); False where the C
    library has no such call (musl, macOS: nothing to do there).

    Freed tensors below glibc's mmap threshold (which rises, up to 32 MiB, each time a larger mmapped block is freed)
    return to the heap, and free() gives back only free space at its top: between the stages of a run the resident
    set kept about 1 GiB more than the process held (SmolLM2-135M, after an R-SFT stage, benchmarks/README.md)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
