"""Exact order statistics of signed float32 values, streamed in two counting passes.

Like the magnitude selection in selection.py, but for values of either sign and several ranks at once: each float32
maps to an int32 key that orders like the value (negative values below -0.0 below +0.0 below positive values), a
histogram of the keys' high 16 bits finds the bucket that holds each wanted rank, and a histogram of the low 16 bits
inside that bucket pins the exact value. Whole tensor or any blocking of it gives the same answer. Up to SMALL values
are kept and sorted directly in the first pass.
"""

from __future__ import annotations

import torch

SMALL = 1 << 16
_BINS = 1 << 16
_HALF = 1 << 15


def _flip_negatives(bits: torch.Tensor) -> torch.Tensor:
    """Reverse the order of negative floats' bit patterns (its own inverse): float order becomes int32 order."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys that order like the float32 values of x."""
    return _flip_negatives(x.to(torch.float32).contiguous().view(torch.int32).reshape(-1))


def _high(keys: torch.Tensor) -> torch.Tensor:
    """Bucket of each key: its high 16 bits, shifted to 0..65535."""
    return (keys >> 16) + _HALF


def key_to_value(key: int) -> float:
    return _flip_negatives(torch.tensor([key], dtype=torch.int32)).view(torch.float32).item()


class ExactOrderStatistics:
    """The values at 0-based ascending positions `ranks` of `n` float32 values seen in two streaming passes."""

    def __init__(self, n: int, ranks: list[int]) -> None:
        if any(not 0 <= r < n for r in ranks):
            raise ValueError(f"ranks {ranks} outside 0..{n - 1}")
        self.n = n
        self.ranks = list(ranks)
        self._kept: list[torch.Tensor] | None = [] if n <= SMALL else None
        self._high = torch.zeros(_BINS, dtype=torch.int64) if self._kept is None else None
        self._buckets: list[int] = []
        self._below: list[int] = []  # values in lower buckets, per rank
        self._low: list[torch.Tensor] = []
        self._values: list[float] | None = None

    def observe_first(self, x: torch.Tensor) -> None:
        if self._kept is not None:
            self._kept.append(x.to(torch.float32).reshape(-1).clone())
        else:
            self._high += torch.bincount(_high(order_keys(x)), minlength=_BINS)

    def end_first(self) -> None:
        if self._kept is not None:
            ordered = torch.sort(torch.cat(self._kept)).values
            self._values = [float(ordered[r]) for r in self.ranks]
            self._kept = None
            return
        cumulative = torch.cumsum(self._high, 0)
        for r in self.ranks:
            bucket = int(torch.searchsorted(cumulative, r, right=True))
            self._buckets.append(bucket)
            self._below.append(int(cumulative[bucket - 1]) if bucket else 0)
            self._low.append(torch.zeros(_BINS, dtype=torch.int64))
        self._high = None

    def observe_second(self, x: torch.Tensor) -> None:
        if self._values is not None:
            return
        keys = order_keys(x)
        high = _high(keys)
        for bucket, low in zip(self._buckets, self._low):
            inside = keys[high == bucket]
            if inside.numel():
                low += torch.bincount(inside & 0xFFFF, minlength=_BINS)

    def end_second(self) -> None:
        if self._values is not None:
            return
        self._values = []
        for r, bucket, below, low in zip(self.ranks, self._buckets, self._below, self._low):
            slot = int(torch.searchsorted(torch.cumsum(low, 0), r - below, right=True))
            self._values.append(key_to_value(((bucket - _HALF) << 16) | slot))
        self._low = []

    @property
    def values(self) -> list[float]:
        assert self._values is not None, "both passes must end first"
        return self._values
