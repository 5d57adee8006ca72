"""breadcrumbs, breadcrumbs_ties, della, della_linear: the task-arithmetic family with two more sparsifiers.

- `MagnitudeBand` (mergekit's magnitude_outliers, Model Breadcrumbs): drop the top `gamma` fraction of |delta| and
  the smallest, keeping int(density * n) entries. Two exact thresholds (two KthLargest selections) keep it
  elementwise. Older mergekit code sliced `sorted[n_bot:-n_top]`, empty when int(gamma * n) is 0, so small tensors
  (norms) lost their whole delta; we count correctly (no outlier dropped, the top int(density * n) kept), as the
  mergekit 0.1.5 installed for the parity checks also does.
- `RankedBernoulli` (mergekit's della_magprune, DELLA): within each row, the entry of magnitude rank r (0 = smallest,
  ties in column order) of c is kept with probability density - epsilon + 2 * epsilon * r / (c - 1). A 1-D tensor is
  one row; a row of a 3-D+ tensor is all of x[i] (mergekit ranks along dim 1 there); a one-column row keeps with p =
  density (mergekit divides 0 by 0). It needs whole rows, so the method is row-wise: the executor hands it row
  chunks, cut here into cache-sized groups of rows so the temporaries stay small. Noise is position-addressed
  (seeded_random), so any chunking gives the same mask.
Rescale (della's default) matches mergekit: the kept delta is scaled so its L1 norm equals the original delta's, not
by 1/p per element; the two L1 norms are gathered in one streaming pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

import torch

from ...core.errors import MergeEditError
from .ordered import ordered_sum
from .seeded_random import derive_seed, seeded_uniform
from .selection import KthLargest, TieOrder, magnitude_bits, tie_order_bytes
from .spec import MergeInputs, Param
from .task_arithmetic import MaskSparsifier, density_of, l1_rescale, task_arithmetic_family, task_delta

ROW_GROUP = 1 << 18  # elements per group of rows a row-wise merge handles at once: its temporaries stay in cache
BreadcrumbCounts = tuple[int, int]  # (largest entries skipped, entries kept after them)


def breadcrumb_counts(density: float, gamma: float, numel: int) -> BreadcrumbCounts:
    """Kept entries are ranks skip+1 .. skip+keep from the top: keep = int(density*n), skip = int(gamma*n) reduced so
    that keep entries remain (mergekit's counts; no minimum of one kept, unlike TIES)."""
    keep = max(0, int(density * numel))
    skip = min(max(0, int(gamma * numel)), numel - keep)
    return skip, keep


def row_length(shape: tuple[int, ...]) -> int:
    """Elements per row for row-wise methods: prod(shape[1:]); a 1-D tensor is one row (as mergekit unsqueezes it)."""
    return math.prod(shape[1:]) if len(shape) >= 2 else max(1, math.prod(shape))


def row_groups(inputs: MergeInputs, max_elems: Optional[int] = None) -> Iterator[MergeInputs]:
    """Cut a chunk of whole rows into flat groups of whole rows of about `max_elems` elements (at least one row)."""
    row = row_length(inputs.shape)
    n = inputs.tensors[0].numel()
    if n % row or inputs.offset % row:
        raise MergeEditError(
            f"tensor '{inputs.name}': a row-wise method got a chunk that cuts a row of {row} elements; "
            "raise --memory-budget so this tensor is merged whole"
        )
    step = row * max(1, (max_elems or ROW_GROUP) // row)
    flat = [x.reshape(-1) for x in inputs.tensors]
    for a in range(0, n, step):
        yield replace(inputs, tensors=[x[a : a + step] for x in flat], offset=inputs.offset + a)


def in_row_groups(merge: Callable[[MergeInputs], torch.Tensor]) -> Callable[[MergeInputs], torch.Tensor]:
    """A merge of whole rows run group by group, so a big row chunk never materialises per-model temporaries."""

    def run(inputs: MergeInputs) -> torch.Tensor:
        parts = [merge(group).reshape(-1) for group in row_groups(inputs)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.view(inputs.tensors[0].shape)

    return run


# ---- statistics shared by both sparsifiers ---------------------------------------------------------------------------
@dataclass
class MaskStatistics:
    """Exact magnitude thresholds (passes 0 and 1, when any selector) and the L1 norms before/after the keep mask
    (one last pass, when rescaling) of each sparsified non-base input j."""

    sparsifier: "MagnitudeBand | RankedBernoulli"
    rescale: bool
    sparse: list[int]
    selectors: dict[int, tuple[Optional[KthLargest], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.selecting = any(s is not None for sel in self.selectors.values() for s in sel)
        # one streaming pass each; "ties" is inserted when a tie group straddles a threshold (selection.py)
        self.phases = (["high", "low"] if self.selecting else []) + (["after"] if self.rescale else [])
        self.before = {j: 0.0 for j in self.sparse}
        self.after = {j: 0.0 for j in self.sparse}

    @property
    def passes(self) -> int:
        return len(self.phases)

    @property
    def selection_bytes(self) -> int:
        return tie_order_bytes(self._selectors())

    def _selectors(self):
        return [s for sels in self.selectors.values() for s in sels if s is not None]

    def observe(self, pass_index: int, block: MergeInputs) -> None:
        phase = self.phases[pass_index]
        parts = [block] if self.sparsifier.elementwise else row_groups(block)
        for part in parts:
            part.stats = self
            for j in self.sparse:
                d = task_delta(part, j)
                if phase != "after":
                    bits = magnitude_bits(d)
                    for sel in self.selectors.get(j, ()):
                        if sel is None:
                            continue
                        if phase == "ties":
                            sel.observe_ties(bits, part.offset)
                        else:
                            (sel.observe_high if phase == "high" else sel.observe_low)(bits)
                    continue
                a = d.abs()
                self.before[j] = ordered_sum(a, self.before[j])  # element order: the same sum however it is cut
                self.after[j] = ordered_sum(a * self.sparsifier.keep(part, j, d), self.after[j])

    def end_pass(self, pass_index: int) -> None:
        phase = self.phases[pass_index]
        sels = self._selectors()
        for sel in sels:
            {"high": sel.end_high, "low": sel.end_low, "ties": sel.end_ties}.get(phase, lambda: None)()
        if phase == "low" and any(sel.needs_cutoff for sel in sels):
            self.phases.insert(pass_index + 1, "ties")  # exactly skip / skip + keep entries, ties by position

    def result(self) -> "MaskStatistics":
        return self

    def scale(self, j: int) -> float:
        return l1_rescale(self.before[j], self.after[j]) if self.rescale else 1.0


# ---- breadcrumbs ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MagnitudeBand(MaskSparsifier):
    """Keep the |delta| ranks skip+1 .. skip+keep from the top: the top skip + keep less the top skip, each exactly
    that many (mergekit's sort positions n_bot .. n_bot + keep); tied magnitudes ranked by mergekit's sort (TieOrder),
    above TIE_ORDER_LIMIT elements by position."""

    elementwise = True
    randomized = False
    params = (Param("gamma", float, "non_base", 0.01),)

    @staticmethod
    def counts(inputs: MergeInputs, j: int) -> BreadcrumbCounts:
        return breadcrumb_counts(density_of(inputs, j), inputs.per_input[inputs.non_base[j]]["gamma"], inputs.numel)

    def statistics(self, inputs: MergeInputs, sparse: list[int], rescale: bool) -> Optional[MaskStatistics]:
        selectors = {}
        for j in sparse:
            skip, keep = self.counts(inputs, j)
            if keep:
                order = TieOrder("sort", inputs.numel)  # mergekit: sort(|d|).indices[n_bot : n_bot + keep], one sort for both
                selectors[j] = (KthLargest(skip, order) if skip else None, KthLargest(skip + keep, order))
        stats = MaskStatistics(self, rescale, sparse, selectors)
        return stats if stats.passes else None

    def keep(self, inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor:
        stats: Optional[MaskStatistics] = inputs.stats
        if stats is None or j not in stats.selectors:  # keep = 0 entries
            return torch.zeros_like(delta, dtype=torch.bool)
        upper, lower = stats.selectors[j]
        bits = magnitude_bits(delta)
        kept = lower.keeps(bits, inputs.offset)  # the top skip + keep entries (tied ones as mergekit's sort ranks them)
        if upper is not None:
            kept &= ~upper.keeps(bits, inputs.offset)  # less the top skip
        return kept.view(delta.shape)

    @staticmethod
    def check(shared: dict, per_input: list[dict]) -> None:
        for p in per_input:
            if "gamma" in p and not 0 <= p["gamma"] <= 1:
                raise ValueError(f"gamma {p['gamma']} is not a fraction; use a value between 0 and 1 (default 0.01)")


# ---- della -----------------------------------------------------------------------------------------------------------
def rank_keep_probability(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per row of a (rows, cols) tensor: density - epsilon + 2 * epsilon * rank / (cols - 1), rank 0 = smallest |x|
    (stable: equal magnitudes ranked by column). A one-column row gets p = density (mergekit divides 0 by 0 there)."""
    rows, cols = magnitudes.shape
    if cols == 1:
        return torch.full((rows, 1), density, dtype=torch.float32)
    order = torch.argsort(magnitudes, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(cols).expand(rows, cols))
    return (density - epsilon) + (rank.to(torch.float32) / (cols - 1)) * (2 * epsilon)


@dataclass(frozen=True)
class RankedBernoulli(MaskSparsifier):
    """DELLA's MagPrune: a seeded Bernoulli keep whose probability grows with the entry's magnitude rank in its row."""

    elementwise = False  # ranks are per row: the merge gets whole rows, in groups of about one block
    randomized = True
    upcasts_float16 = True  # mergekit's della_magprune works in float32 on float16 tensors (task_arithmetic.rescale_factor)
    params = (Param("epsilon", float, "non_base", 0.15),)
    wrap_merge = staticmethod(in_row_groups)

    def statistics(self, inputs: MergeInputs, sparse: list[int], rescale: bool) -> Optional[MaskStatistics]:
        return MaskStatistics(self, rescale, sparse) if rescale else None

    def keep(self, inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor:
        params = inputs.per_input[inputs.non_base[j]]
        rows = delta.reshape(-1, row_length(inputs.shape))
        p = rank_keep_probability(rows.abs(), params["density"], params["epsilon"])
        noise = seeded_uniform(derive_seed(inputs.seed, "della", inputs.non_base[j]), inputs.offset, delta.numel())
        return (noise.view_as(p) < p).view(delta.shape)

    @staticmethod
    def check(shared: dict, per_input: list[dict]) -> None:
        for p in per_input:
            if "epsilon" in p and 0 < p["density"] < 1 and (p["density"] + p["epsilon"] >= 1 or p["density"] - p["epsilon"] <= 0):
                raise ValueError(
                    f"keep probabilities density {p['density']} +/- epsilon {p['epsilon']} leave (0, 1); "
                    "lower epsilon so that density - epsilon > 0 and density + epsilon < 1"
                )


BAND = MagnitudeBand()
RANKED = RankedBernoulli()
BREADCRUMBS = task_arithmetic_family("breadcrumbs", BAND, False, False, False, "drop the largest gamma and the smallest deltas, weighted sum (Model Breadcrumbs)")
BREADCRUMBS_TIES = task_arithmetic_family("breadcrumbs_ties", BAND, True, False, False, "breadcrumbs sparsification, then sign election (Breadcrumbs-TIES)")
DELLA = task_arithmetic_family("della", RANKED, True, True, True, "magnitude-ranked random drop with L1 rescale, then sign election (DELLA)")
DELLA_LINEAR = task_arithmetic_family("della_linear", RANKED, False, False, True, "magnitude-ranked random drop with L1 rescale, weighted sum (DELLA)")
