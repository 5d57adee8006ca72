"""Exact top-k magnitude thresholds in O(n), over whole tensors or streamed row chunks.

Non-negative float32 values order like their int32 bit patterns, so a two-level radix select (a histogram of the
high 16 bits, then of the low 16 bits inside the one bucket that holds the k-th value) finds the exact k-th largest
magnitude with two cheap counting passes: no sort, and the same answer whether the tensor arrives whole or in chunks.
Keeping |x| >= threshold reproduces a top-k selection up to elements exactly equal to the threshold.
"""

from __future__ import annotations

import torch

_HIGH_BINS = 1 << 15  # sign bit is always 0 for magnitudes
_LOW_BINS = 1 << 16


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x| as float32, ordered like the magnitudes."""
    return x.abs().to(torch.float32).contiguous().view(torch.int32)


class KthLargest:
    """Streaming exact k-th largest of non-negative float32 values given as bit patterns."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
        self.low = torch.zeros(_LOW_BINS, dtype=torch.int64)
        self.bucket = -1
        self.rank_in_bucket = 0
        self.threshold_bits: int | None = None

    def observe_high(self, bits: torch.Tensor) -> None:
        self.high += torch.bincount((bits >> 16).view(-1), minlength=_HIGH_BINS)

    def end_high(self) -> None:
        above = torch.flip(torch.cumsum(torch.flip(self.high, [0]), 0), [0])  # above[b] = count with high >= b
        # the bucket holding the k-th largest: the highest b with count(high >= b) >= k
        candidates = torch.nonzero(above >= self.k)
        self.bucket = int(candidates[-1]) if len(candidates) else 0
        strictly_above = int(above[self.bucket + 1]) if self.bucket + 1 < _HIGH_BINS else 0
        self.rank_in_bucket = self.k - strictly_above

    def observe_low(self, bits: torch.Tensor) -> None:
        flat = bits.view(-1)
        inside = flat[(flat >> 16) == self.bucket]
        if inside.numel():
            self.low += torch.bincount(inside & 0xFFFF, minlength=_LOW_BINS)

    def end_low(self) -> None:
        above = torch.flip(torch.cumsum(torch.flip(self.low, [0]), 0), [0])
        candidates = torch.nonzero(above >= self.rank_in_bucket)
        low = int(candidates[-1]) if len(candidates) else 0
        self.threshold_bits = (self.bucket << 16) | low

    @property
    def threshold(self) -> float:
        assert self.threshold_bits is not None
        return torch.tensor([self.threshold_bits], dtype=torch.int32).view(torch.float32).item()


def kth_largest_magnitude(x: torch.Tensor, k: int) -> float:
    """Convenience for one in-memory tensor: the k-th largest |x| (1-based), exactly."""
    bits = magnitude_bits(x)
    sel = KthLargest(k)
    sel.observe_high(bits)
    sel.end_high()
    sel.observe_low(bits)
    sel.end_low()
    return sel.threshold
