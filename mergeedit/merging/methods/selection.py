"""Exact top-k magnitude thresholds in O(n), over whole tensors or streamed blocks.

Non-negative float32 values order like their int32 bit patterns, so a two-level radix select (a histogram of the
high 16 bits, then of the low 16 bits inside the one bucket that holds the k-th value) finds the exact k-th largest
magnitude with two cheap counting passes: no sort, and the same answer whether the tensor arrives whole or in blocks.
Small tensors (norms, biases) skip the histograms: their values are kept and selected directly in the first pass.
Keeping |x| >= threshold reproduces a top-k selection up to elements exactly equal to the threshold; when more
values equal it than the k-th place needs (`needs_cutoff`), one more streaming pass finds the position of the last
tied value to keep, counting in element order (`observe_ties`), so exactly k are kept: the tied values at the lowest
positions. That is a fixed rule, the same however the tensor is cut.

mergekit picks the tied values kept with one whole-tensor torch call instead (ties/magnitude: argsort descending,
first k; breadcrumbs: sort ascending, a window; sce: topk), whose choice among equal values depends on the whole
tensor's contents. A selector given a `TieOrder` reproduces that choice for tensors of up to TIE_ORDER_LIMIT elements:
the ties pass gathers the whole tensor's values (float32, the ones mergekit sorts) into one vector, makes mergekit's
call on it and keeps the tied positions the call puts among its k (`kept_ties`, a sorted index tensor). The call sees
the same vector however the merge is cut into chunks and blocks, and torch's 1-D sort and topk on CPU do not depend
on the thread count (checked in tests), so the bytes still do not depend on the budget. Above the limit, and without a
TieOrder, the lowest-position rule stays.

A cheaper route when a sample of the values is at hand: `aim` guesses, from the sample, a narrow band of bit patterns
that holds the k-th largest with overwhelming probability; one pass then counts the values at or above the band and
keeps the few inside it, and the k-th largest is picked from those exactly. A wrong guess is detected (the counts say
the rank lies outside the band) and the two radix passes answer instead, so the result never depends on the sample.
"""

from __future__ import annotations

import math

import torch

_HIGH_BINS = 1 << 15  # the sign bit is always 0 for magnitudes
_LOW_BINS = 1 << 16
SMALL = 1 << 16  # up to this many values, select directly instead of histogramming
BAND_MIN = 1 << 18  # below this many values a band saves too little to be worth a sample
BAND_Z = 5.0  # the band spans this many standard deviations of the sample rank on each side
BAND_SAMPLE_MIN = 1024  # a smaller sample guesses too wide a band


# Tensors up to this many elements get mergekit's tie order (TieOrder). A property of the tensor alone, never of the
# budget: 2^27 covers every matrix of a 7B Llama/Mistral (the largest, 32000 x 4096 embeddings, is 1.31e8) and every
# attention matrix of a 70B; the gathered vector plus the sort's values and indices take about 16 bytes an element,
# at most 2 GiB, and the sort takes seconds. Bigger tensors (large-vocabulary embeddings, 70B MLP matrices) keep the
# lowest-position rule.
TIE_ORDER_LIMIT = 1 << 27
TIE_ORDER_BYTES_PER_ELEMENT = 16  # gathered float32 vector + the sort's float32 values and int64 indices
TIE_ORDER_CALLS = ("argsort", "sort", "topk")


class TieOrder:
    """Which tied values mergekit keeps: the top k positions of one whole-tensor torch call on the gathered values.

    call: "argsort" (mergekit's magnitude: argsort(w, descending=True)[:k]), "sort" (magnitude_outliers:
    sort(w).indices[n - k:], the top k of an ascending sort; breadcrumbs' two selectors share one sort) or "topk"
    (sce: topk(w, k).indices). `dtype` is the dtype the call sees (the gathered float32 values are exact in it): float32
    for the magnitude sparsifiers (mergekit sorts w.float()), the compute dtype for sce's variances. One TieOrder
    serves the selectors of one tensor's one input; it frees its vectors when the last of them has its answer."""

    def __init__(self, call: str, numel: int, dtype: torch.dtype = torch.float32) -> None:
        assert call in TIE_ORDER_CALLS, call
        self.call, self.numel, self.dtype = call, numel, dtype
        self._values: torch.Tensor | None = None  # int32 bit patterns of all numel values, by flat position
        self._last: tuple[int, int] | None = None  # (offset, count) of the last block written
        self._order: torch.Tensor | None = None  # the sort's permutation (sort: ascending), kept for a second selector
        self._users: set[int] = set()

    @property
    def applies(self) -> bool:
        return self.numel <= TIE_ORDER_LIMIT

    @property
    def nbytes(self) -> int:
        """Working memory while the ties pass runs and the call sorts (outside the in-flight budget; see README)."""
        return TIE_ORDER_BYTES_PER_ELEMENT * self.numel if self.applies else 0

    def observe(self, user: object, bits: torch.Tensor, offset: int) -> None:
        flat = bits.reshape(-1)
        self._users.add(id(user))
        if self._values is None:
            self._values = torch.zeros(self.numel, dtype=torch.int32)
        if self._last != (offset, flat.numel()):  # the two selectors of breadcrumbs pass the same block
            self._values[offset : offset + flat.numel()] = flat
            self._last = (offset, flat.numel())

    def top(self, k: int) -> torch.Tensor:
        """The positions mergekit's call puts among its k kept (unsorted)."""
        assert self._values is not None
        w = self._values.view(torch.float32)
        if self.call == "argsort":
            return torch.argsort(w, descending=True)[:k]
        if self.call == "topk":
            return torch.topk(w.to(self.dtype), k=k, largest=True).indices
        if self._order is None:
            self._order = torch.sort(w, descending=False).indices
        return self._order[self.numel - k :]

    def kept_ties(self, user: object, k: int, threshold_bits: int) -> torch.Tensor:
        """Sorted flat positions of the values equal to the threshold that the call keeps among its top k."""
        top = self.top(k)
        assert self._values is not None
        kept = torch.sort(top[self._values[top] == threshold_bits]).values
        self._users.discard(id(user))
        if not self._users:
            self._values = self._order = None
            self._last = None
        return kept


def tie_order_bytes(selectors) -> int:
    """Upper bound of the memory the selectors' tie orders may hold at once, outside the in-flight budget (each
    distinct order counted once; breadcrumbs' two selectors share one)."""
    orders = {id(s.order): s.order for s in selectors if s is not None and s.order is not None}
    return sum(o.nbytes for o in orders.values())


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x| as float32, ordered like the magnitudes."""
    return x.abs().to(torch.float32).contiguous().view(torch.int32)


def float_of_bits(bits: int) -> float:
    """The float32 whose bit pattern is `bits`."""
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def guess_band(sample: torch.Tensor, k: int, n: int, z: float = BAND_Z) -> tuple[int, int]:
    """Bit patterns [lo, hi] between which the k-th largest of n values lies, judged from `sample` (bit patterns of
    values drawn across all n): the sample's order statistics z standard deviations of the binomial rank either side
    of where the k-th largest should fall. lo is at least 1, so exact zeros (often most of an untouched delta) stay out
    of the band; hi is the largest pattern when the band reaches the top."""
    flat = sample.reshape(-1)
    m = flat.numel()
    p = min(max(k / n, 0.0), 1.0)
    expected = p * m  # sample values expected at or above the k-th largest
    spread = z * math.sqrt(m * p * (1 - p)) + 2
    upper_rank = math.floor(expected - spread)  # 1-based rank from the top of the band's upper end
    lower_rank = math.ceil(expected + spread)
    hi = int(torch.kthvalue(flat, m - upper_rank + 1).values) if upper_rank >= 1 else 0x7FFFFFFF
    lo = int(torch.kthvalue(flat, m - lower_rank + 1).values) if lower_rank <= m else 0
    return max(lo, 1), max(hi, 1)


def _kth_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest value, how many values lie in higher bins)."""
    from_top = torch.cumsum(hist.flip(0), 0)
    pos = int(torch.searchsorted(from_top, k))
    above = int(from_top[pos - 1]) if pos > 0 else 0
    return hist.numel() - 1 - pos, above


class KthLargest:
    """Streaming exact k-th largest of non-negative float32 values given as bit patterns (k >= 1)."""

    def __init__(self, k: int, order: TieOrder | None = None) -> None:
        self.k = k
        self.order = order  # mergekit's tie order for a tensor up to TIE_ORDER_LIMIT elements; None: lowest positions
        self.seen = 0
        self._small: list[torch.Tensor] | None = []
        self._high: torch.Tensor | None = None
        self._low: torch.Tensor | None = None
        self.bucket = -1
        self.rank_in_bucket = 0
        self.threshold_bits: int | None = None
        self.band: tuple[int, int] | None = None  # set by aim()
        self._band_seen = 0
        self._at_least_lo = 0
        self._inside: list[torch.Tensor] = []
        self._inside_count = 0
        self._band_cap = 0
        self.greater: int | None = None  # values above the threshold, once settled
        self.equal: int | None = None  # values equal to it
        self._above_high = 0
        self._tie_positions: list[torch.Tensor] = []
        self.cutoff: int | None = None  # tied values at flat positions below this are kept (set by end_ties)
        self.kept_ties: torch.Tensor | None = None  # or (with an applicable order) exactly these tied positions

    @property
    def done(self) -> bool:
        return self.threshold_bits is not None

    def aim(self, sample: torch.Tensor, n: int) -> bool:
        """Guess the band from `sample` (bit patterns drawn across all n values). False, and no band, when n is too
        small for a band to pay off; the radix passes then do the work."""
        if n < BAND_MIN or sample.numel() < BAND_SAMPLE_MIN or not 1 <= self.k <= n:
            return False
        self.band = guess_band(sample, self.k, n)
        self._band_cap = max(1 << 16, n // 16)  # a band holding more than this was a bad guess: give it up
        return True

    def observe_band(self, bits: torch.Tensor) -> None:
        """Count the values at or above the band's lower end and keep those inside it (unless the band was given up)."""
        if self.band is None or self.done:
            return
        flat = bits.reshape(-1)
        self._band_seen += flat.numel()
        lo, hi = self.band
        wide = torch.int64 if flat.numel() >= 1 << 31 else torch.int32
        # int32 0/1 results: comparisons into a bool tensor cost 4x more in this torch build
        at_least = torch.ge(flat, lo, out=torch.empty_like(flat))
        self._at_least_lo += int(at_least.sum(dtype=wide))
        inside = torch.le(flat, hi, out=torch.empty_like(flat)).bitwise_and_(at_least)
        if lo == hi:  # one pattern: the count is all that is needed
            self._inside_count += int(inside.sum(dtype=wide))
            return
        if self._inside_count > self._band_cap:
            return
        values = flat[inside.bool()]
        self._inside_count += values.numel()
        if self._inside_count > self._band_cap:
            self._inside = []
        else:
            self._inside.append(values)

    def end_band(self) -> bool:
        """Settle the threshold from the band if it holds the k-th largest (True); else leave it to the radix passes."""
        if self.band is None or self.done:
            return self.done
        lo, hi = self.band
        k = min(self.k, self._band_seen)
        above = self._at_least_lo - self._inside_count  # values above hi
        settled = None
        if above < k <= self._at_least_lo and (lo == hi or self._inside_count <= self._band_cap):
            if lo == hi:
                settled = lo
                self.greater, self.equal = above, self._inside_count
            else:
                values = self._inside[0] if len(self._inside) == 1 else torch.cat(self._inside)
                self._inside = []  # kthvalue copies `values`: free the pieces first (at small budgets this is the peak)
                settled = int(torch.kthvalue(values, values.numel() - (k - above) + 1).values)
                self.greater = above + int((values > settled).sum())
                self.equal = int((values == settled).sum())
        elif k > self._at_least_lo and lo == 1:  # everything below the band is exactly zero
            settled = 0
            self.greater, self.equal = self._at_least_lo, self._band_seen - self._at_least_lo
        self._inside = []
        self.band = None
        if settled is None:
            return False
        self.threshold_bits = settled
        self._high = self._low = self._small = None
        return True

    def observe_high(self, bits: torch.Tensor) -> None:
        if self.done:
            return
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
        if self.done:
            return
        if self._small is not None:  # everything fit: select exactly now, the low pass has nothing to do
            values = torch.cat(self._small) if self._small else torch.zeros(0, dtype=torch.int32)
            if values.numel() == 0:  # an empty tensor keeps nothing; any threshold will do
                self.threshold_bits = 0
                self._small = None
                return
            k = min(self.k, values.numel())
            self.threshold_bits = int(torch.kthvalue(values, values.numel() - k + 1).values)
            self.greater = int((values > self.threshold_bits).sum())
            self.equal = int((values == self.threshold_bits).sum())
            self._small = None
            return
        self.bucket, above = _kth_from_top(self._high, min(self.k, self.seen))
        self._above_high = above
        self.rank_in_bucket = min(self.k, self.seen) - above
        self._low = torch.zeros(_LOW_BINS, dtype=torch.int64)

    def observe_low(self, bits: torch.Tensor) -> None:
        if self._low is None or self.done:
            return
        # Shift so the bucket's values land on 1..65536 and clamp everything else onto the two end bins, which are
        # dropped: one subtraction and a clamp instead of a boolean gather (nonzero + index) per block.
        shifted = bits.reshape(-1) - ((self.bucket << 16) - 1)
        counts = torch.bincount(shifted.clamp_(0, _LOW_BINS + 1), minlength=_LOW_BINS + 2)
        self._low += counts[1 : _LOW_BINS + 1]

    def end_low(self) -> None:
        if self._low is None or self.done:
            return
        low, above_low = _kth_from_top(self._low, self.rank_in_bucket)
        self.threshold_bits = (self.bucket << 16) | low
        self.greater, self.equal = self._above_high + above_low, int(self._low[low])
        self._low = self._high = None

    # -- exactly k: mergekit's tied values (TieOrder) or the tied values at the lowest positions ----------------------
    @property
    def needs_cutoff(self) -> bool:
        """Settled with more values equal to the threshold than the k-th place needs (a zero threshold never does:
        zeros contribute nothing, kept or not)."""
        return bool(self.threshold_bits) and self.greater is not None and self.greater + self.equal > self.k

    @property
    def _ordered(self) -> bool:
        return self.order is not None and self.order.applies

    @property
    def tie_rule_set(self) -> bool:
        return self.cutoff is not None or self.kept_ties is not None

    def observe_ties(self, bits: torch.Tensor, offset: int) -> None:
        """Gather the block for the tie order, or note the flat positions (block offset + index) of the values equal to
        the threshold."""
        if not self.needs_cutoff or self.tie_rule_set:
            return
        if self._ordered:
            self.order.observe(self, bits, offset)
            return
        self._tie_positions.append(torch.nonzero(bits.reshape(-1) == self.threshold_bits).reshape(-1).add_(offset))

    def end_ties(self) -> None:
        """kept_ties from the tie order; else cutoff = 1 + the position of the (k - greater)-th tied value in element
        order."""
        if not self.needs_cutoff or self.tie_rule_set:
            return
        if self._ordered:
            self.kept_ties = self.order.kept_ties(self, self.k, self.threshold_bits)
            assert self.kept_ties.numel() == self.k - self.greater, "the tie order kept a different count"
            return
        positions = torch.cat(self._tie_positions) if self._tie_positions else torch.zeros(0, dtype=torch.int64)
        self._tie_positions = []
        m = self.k - self.greater
        self.cutoff = int(torch.kthvalue(positions, m).values) + 1

    def block_threshold(self, offset: int, n: int) -> int | None:
        """Bits b such that the block of n values at `offset` keeps exactly |x| >= b (b = threshold + 1: only values
        above it); None when the block keeps some tied values and drops others (use `keeps`)."""
        assert self.threshold_bits is not None
        if self.kept_ties is not None:
            lo, hi = (int(i) for i in torch.searchsorted(self.kept_ties, torch.tensor([offset, offset + n])))
            return self.threshold_bits + 1 if lo == hi else None
        if self.cutoff is None or offset + n <= self.cutoff:
            return self.threshold_bits
        if offset >= self.cutoff:
            return self.threshold_bits + 1
        return None

    def keeps(self, bits: torch.Tensor, offset: int) -> torch.Tensor:
        """Which of a block's values (bit patterns, flat, starting at element `offset`) are among the k kept."""
        flat = bits.reshape(-1)
        n = flat.numel()
        if self.kept_ties is not None:
            kept = flat > self.threshold_bits
            lo, hi = (int(i) for i in torch.searchsorted(self.kept_ties, torch.tensor([offset, offset + n])))
            if hi > lo:
                kept[self.kept_ties[lo:hi] - offset] = True
            return kept
        if self.cutoff is None or offset + n <= self.cutoff:
            return flat >= self.threshold_bits
        if offset >= self.cutoff:
            return flat > self.threshold_bits
        c = self.cutoff - offset
        return torch.cat([flat[:c] >= self.threshold_bits, flat[c:] > self.threshold_bits])

    @property
    def threshold(self) -> float:
        assert self.threshold_bits is not None
        return float_of_bits(self.threshold_bits)


def kth_largest_magnitude(x: torch.Tensor, k: int) -> float:
    """Convenience for one in-memory tensor: the k-th largest |x| (1-based), exactly."""
    bits = magnitude_bits(x)
    sel = KthLargest(k)
    sel.observe_high(bits)
    sel.end_high()
    sel.observe_low(bits)
    sel.end_low()
    return sel.threshold
