"""Byte sizes as users type them ("5G", "512M") and as people read them."""

from __future__ import annotations

import re

from .errors import MergeEditError

_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse a byte count: K/M/G/T are decimal (5G = 5e9, as Hugging Face and mergekit count), Ki/Mi/Gi/Ti binary."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?))?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise MergeEditError(f"{what}: cannot read '{text}' as a size; write a number of bytes with an optional K, M or G suffix, e.g. 5G")
    unit = (match.group(2) or "").upper()
    scale = _BINARY[unit] if match.group(3) else _DECIMAL[unit]
    value = float(match.group(1)) * scale
    if value < 1:
        raise MergeEditError(f"{what}: '{text}' must be at least one byte")
    return int(value)


def format_size(n: float) -> str:
    """Human-readable binary size: 643.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
