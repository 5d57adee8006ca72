"""Exact top-k magnitude thresholds in O(n), over whole tensors or streamed blocks.

Non-negative float32 values order like their int32 bit patterns, so a two-level radix select (a histogram of the
high 16 bits, then of the low 16 bits inside the one bucket that holds the k-th value) finds the exact k-th largest
magnitude with two cheap counting passes: no sort, and the same answer whether the tensor arrives whole or in blocks.
Small tensors (norms, biases) skip the histograms: their values are kept and selected directly in the first pass.
Keeping |x| >= threshold reproduces a top-k selection up to elements exactly equal to the threshold.
"""

from __future__ import annotations

import torch

_HIGH_BINS = 1 << 15  # the sign bit is always 0 for magnitudes
_LOW_BINS = 1 << 16
SMALL = 1 << 16  # up to this many values, select directly instead of histogramming


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x| as float32, ordered like the magnitudes."""
    return x.abs().to(torch.float32).contiguous().view(torch.int32)


def _kth_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest value, how many values lie in higher bins)."""
    from_top = torch.cumsum(hist.flip(0), 0)
    pos = int(torch.searchsorted(from_top, k))
    above = int(from_top[pos - 1]) if pos > 0 else 0
    return hist.numel() - 1 - pos, above


class KthLargest:
    """Streaming exact k-th largest of non-negative float32 values given as bit patterns (k >= 1)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen = 0
        self._small: list[torch.Tensor] | None = []
        self._high: torch.Tensor | None = None
        self._low: torch.Tensor | None = None
        self.bucket = -1
        self.rank_in_bucket = 0
        self.threshold_bits: int | None = None

    def observe_high(self, bits: torch.Tensor) -> None:
        flat = bits.reshape(-1)
        self.seen += flat.numel()
        if self._small is not None and self.seen <= SMALL:
            self._small.append(flat.clone())
            return
        if self._high is None:
            self._high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
            for kept in self._small or []:
                self._high += torch.bincount(kept >> 16, minlength=_HIGH_BINS)
            self._small = None
        self._high += torch.bincount(flat >> 16, minlength=_HIGH_BINS)

    def end_high(self) -> None:
        if self._small is not None:  # everything fit: select exactly now, the low pass has nothing to do
            values = torch.cat(self._small) if self._small else torch.zeros(0, dtype=torch.int32)
            if values.numel() == 0:  # an empty tensor keeps nothing; any threshold will do
                self.threshold_bits = 0
                self._small = None
                return
            k = min(self.k, values.numel())
            self.threshold_bits = int(torch.kthvalue(values, values.numel() - k + 1).values)
            self._small = None
            return
        self.bucket, above = _kth_from_top(self._high, min(self.k, self.seen))
        self.rank_in_bucket = min(self.k, self.seen) - above
        self._low = torch.zeros(_LOW_BINS, dtype=torch.int64)

    def observe_low(self, bits: torch.Tensor) -> None:
        if self._low is None:
            return
        # Shift so the bucket's values land on 1..65536 and clamp everything else onto the two end bins, which are
        # dropped: one subtraction and a clamp instead of a boolean gather (nonzero + index) per block.
        shifted = bits.reshape(-1) - ((self.bucket << 16) - 1)
        counts = torch.bincount(shifted.clamp_(0, _LOW_BINS + 1), minlength=_LOW_BINS + 2)
        self._low += counts[1 : _LOW_BINS + 1]

    def end_low(self) -> None:
        if self._low is None:
            return
        low, _ = _kth_from_top(self._low, self.rank_in_bucket)
        self.threshold_bits = (self.bucket << 16) | low
        self._low = self._high = None

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
