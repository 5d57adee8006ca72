"""Every environment variable mergeedit reads, read here and nowhere else.

| variable                        | effect                                                                        | read            |
|---------------------------------|-------------------------------------------------------------------------------|-----------------|
| MERGEEDIT_DIRECT_READS=0        | merge inputs are read through the page cache (file systems without O_DIRECT)  | once a process  |
| MERGEEDIT_DIRECT_WRITES=0       | merge outputs are written through the page cache                              | once a process  |
| MERGEEDIT_CACHE=DIR             | where converted models live (built-in models, imported pickles)               | when asked      |
| MERGEEDIT_DEBUG=1               | an internal error shows its traceback                                         | when one occurs |
| MERGEEDIT_KILL_AFTER_TENSORS=N  | tests only: the merge kills its own process once N tensors are written        | once a process  |
| MERGEEDIT_KILL_SIGNAL=TERM      | tests only: ... with SIGTERM instead of SIGKILL                               | once a process  |
| HF_HUB_OFFLINE=1                | (huggingface_hub's own) a hub id is looked up in the local cache only         | when asked      |

The merge switches reach the code as MergeOptions fields (merging/merge.py), never as lookups where they act. The
cache folder is looked up when asked because a process (a test) may point it elsewhere between two conversions.
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path
from typing import NamedTuple, Optional


class FaultInjection(NamedTuple):
    """Die at an exact point of a merge: the resume tests kill a merge between shards and mid-shard this way
    instead of racing a timer; the interrupt tests send SIGTERM."""

    after_tensors: int
    signal: int


@functools.cache
def merge_switches() -> dict:
    """The environment's say in a merge: direct reads, direct writes, and the tests' fault injection."""
    kill_after = os.environ.get("MERGEEDIT_KILL_AFTER_TENSORS", "")
    sig = signal.SIGTERM if os.environ.get("MERGEEDIT_KILL_SIGNAL", "").upper() in ("TERM", "SIGTERM") else signal.SIGKILL
    return {
        "direct_reads": os.environ.get("MERGEEDIT_DIRECT_READS", "1") != "0",
        "direct_writes": os.environ.get("MERGEEDIT_DIRECT_WRITES", "1") != "0",
        "fault_injection": FaultInjection(int(kill_after), sig) if kill_after.isdigit() else None,
    }


def fault_injection() -> Optional[FaultInjection]:
    return merge_switches()["fault_injection"]


def cache_root() -> Path:
    """Where mergeedit keeps what it converts once (built-in models, imported pickles): $MERGEEDIT_CACHE or ~/.cache/mergeedit."""
    return Path(os.environ.get("MERGEEDIT_CACHE") or Path.home() / ".cache" / "mergeedit").expanduser()


def debug() -> bool:
    """MERGEEDIT_DEBUG set: an internal error is raised with its traceback instead of one line."""
    return bool(os.environ.get("MERGEEDIT_DEBUG"))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set: huggingface_hub must not reach the network, so a hub id missing from the cache is an error."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
