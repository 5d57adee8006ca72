"""Memory facts: the machine's RAM, the default budget, and this process's resident set."""

from __future__ import annotations

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
