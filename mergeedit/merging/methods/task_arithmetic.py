"""The task-arithmetic family: task_arithmetic, ties, dare_ties, dare_linear.

One algorithm (as in mergekit): delta_i = x_i - base; sparsify each delta (top-k magnitude or a seeded Bernoulli
mask), optionally rescale it to its original L1 norm; weight it; optionally keep only entries agreeing with the
elected sign (sign of the weighted sum); sum; optionally normalize by the weights that contributed; times lambda;
add the base. Sparsification needs whole-tensor numbers (the k-th magnitude, the L1 norms), gathered by
`DeltaStatistics` in streaming passes, so the merge itself is elementwise and runs block by block. Every sparsifier is
an object (`Sparsifier`): top-k magnitude (`TOP_K`) and DARE (`DARE`) here, breadcrumbs and DELLA in sparsify.py, each
with its statistics, its keep rule and what it adds to the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from . import fused, seeded_random
from .ordered import ordered_sum
from .seeded_random import derive_seed
from .selection import KthLargest, TieOrder, float_of_bits, magnitude_bits, tie_order_bytes
from .spec import MergeInputs, MergeMethod, Param, TensorStatistics


class Sparsifier(Protocol):
    """How a delta is sparsified: its whole-tensor statistics, the keep mask of non-base input j and how it is applied,
    plus what it adds to the method: parameters, a plan-time check, randomness, (for row-wise ones, which are not
    elementwise) a wrapper that hands the merge whole rows, and the fused kernel's sparsify step, if it has one."""

    params: tuple[Param, ...]
    elementwise: bool
    randomized: bool
    kernel: Optional[str]  # fused.Variant.sparsify: "magnitude", "mask", or None (eager code only)

    def check(self, shared: dict, per_input: list[dict]) -> None: ...

    def wrap_merge(self, merge: Callable[[MergeInputs], torch.Tensor]) -> Callable[[MergeInputs], torch.Tensor]: ...

    def statistics(self, inputs: MergeInputs, sparse: list[int], rescale: bool) -> Optional[TensorStatistics]:
        """Statistics for the inputs `sparse` (0 < density < 1); the result needs `rescale` and `scale(j)`."""
        ...

    def keep(self, inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor: ...

    def apply(self, inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor:
        """`delta` of non-base input j (0 < density < 1) sparsified, in place where it can be."""
        ...


Sparsify = Optional[Sparsifier]  # None: task arithmetic, every delta kept whole
RESCALE_EPS = 1e-7  # below this L1 norm mergekit leaves a masked delta unscaled


def l1_rescale(before: float, after: float) -> float:
    """mergekit's L1 rescale of a masked delta (DARE, DELLA): its original L1 norm over the kept one, left at 1 when
    either is below RESCALE_EPS. The one rule for every sparsifier's statistics."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


def density_of(inputs: MergeInputs, j: int) -> float:
    return inputs.per_input[inputs.non_base[j]]["density"]


def keep_count(density: float, numel: int) -> int:
    """How many entries top-k magnitude keeps: at least one in a non-empty tensor, as mergekit does."""
    return max(1, int(density * numel))


def task_delta(inputs: MergeInputs, j: int) -> torch.Tensor:
    return inputs.tensors[inputs.non_base[j]] - inputs.tensors[inputs.base]


def _stream(inputs: MergeInputs, j: int) -> int:
    """The seed of non-base input j's DARE mask: the tensor's seed (run seed and name) and the model's index."""
    return derive_seed(inputs.seed, inputs.non_base[j])


def random_keep(inputs: MergeInputs, j: int) -> torch.Tensor:
    """DARE's Bernoulli(density) keep mask for non-base input j, addressed by element position, as float32 1/0.

    A float mask: multiplying by a bool mask converts it first, which cost more than the multiplication."""
    n = inputs.tensors[inputs.base].numel()
    mask = seeded_random.keep_mask(_stream(inputs, j), inputs.offset, n, density_of(inputs, j))
    return mask.view(inputs.tensors[inputs.base].shape)


def _mask_keys(inputs: MergeInputs, js) -> Optional[list[torch.Tensor]]:
    """The fused kernels' form of random_keep for inputs js; None for a block that crosses a key span (a tensor of
    2^32+ elements), left to the eager code."""
    n = inputs.tensors[inputs.base].numel()
    keys = [seeded_random.kernel_key(_stream(inputs, j), inputs.offset, n, density_of(inputs, j)) for j in js]
    return None if any(k is None for k in keys) else keys


def trim_magnitude(d: torch.Tensor, threshold_bits: int) -> torch.Tensor:
    """`d` with entries whose magnitude is below the threshold (given as float32 bits) zeroed.

    float32 takes one hardshrink against the largest float below the threshold (|d| > that  <=>  |d| >= threshold):
    one pass instead of abs, bit view, compare, and a bool-mask multiply. Other dtypes compare float32 bit patterns,
    as the selection saw them."""
    if threshold_bits <= 0:  # threshold 0: everything is kept
        return d
    if d.dtype == torch.float32:
        return torch.nn.functional.hardshrink(d, float_of_bits(threshold_bits - 1))
    return d.mul_(magnitude_bits(d) >= threshold_bits)


def _divisor(weights: list[float]) -> float:
    """What normalize divides a plain sum of weighted deltas by: the weights' sum, or 1 where it is (nearly) zero."""
    total = sum(weights)
    return total if abs(total) >= 1e-8 else 1.0


def _l1(a: torch.Tensor, start: float = 0.0) -> float:
    """start + the block's magnitudes, added in element order in float64 (ordered.py): the same additions however
    the budget cuts the tensor into row chunks and blocks, whatever the threads or the CPU."""
    return ordered_sum(a, start)


@dataclass
class DeltaStatistics:
    """Per sparsified non-base input j: the exact magnitude threshold and, for rescale, the L1 norms before/after.

    The work is a list of phases, one streaming pass each: "high" and "low" (the two radix passes), "band" (a
    sampled band that usually settles the threshold in one pass: see selection.py), "after" (the kept L1 norm, when
    rescaling), or "norms" alone (DARE: the L1 norms before and after its random mask). `prepare` replaces the radix
    passes by ["band"] once a sample of the tensor is at hand; the radix passes come back only for a band that missed.
    `passes` is the number of phases as now known: the executor schedules reads for the radix plan and skips those a
    settled band makes unneeded."""

    sparsifier: "TopKMagnitude | DareBernoulli"
    rescale: bool
    sparse: list[int]
    phases: list[str]
    selectors: dict[int, KthLargest] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.before = {j: 0.0 for j in self.sparse}
        self.after = {j: 0.0 for j in self.sparse}

    @property
    def passes(self) -> int:
        return len(self.phases)

    @property
    def selection_bytes(self) -> int:
        return tie_order_bytes(self.selectors.values())

    def prepare(self, sample: MergeInputs) -> None:
        """Aim each selector's band from a strided sample of the tensor."""
        if self.phases[:2] != ["high", "low"]:
            return
        aimed = [self.selectors[j].aim(magnitude_bits(task_delta(sample, j)), sample.numel) for j in self.sparse]
        if not all(aimed):
            return
        self.phases[:2] = ["band"]

    def observe(self, pass_index: int, block: MergeInputs) -> None:
        if self.phases == ["norms"]:
            self._observe_norms(block)
            return
        phase = self.phases[pass_index]
        first = pass_index == 0
        for j in self.sparse:
            d = task_delta(block, j)
            sel = self.selectors[j]
            if first and self.rescale:
                self.before[j] = _l1(d.abs(), self.before[j])
            if phase == "after":
                keep = sel.keeps(magnitude_bits(d), block.offset).view(d.shape)
                self.after[j] = _l1(d.abs() * keep, self.after[j])
            elif phase == "ties":
                sel.observe_ties(magnitude_bits(d), block.offset)
            elif not sel.done:
                bits = magnitude_bits(d)
                {"band": sel.observe_band, "high": sel.observe_high, "low": sel.observe_low}[phase](bits)

    def _observe_norms(self, block: MergeInputs) -> None:
        """DARE's L1 norms before and after the mask, from the fused kernel when it is compiled (fused.norms)."""
        base = block.tensors[block.base]
        xs = [block.tensors[block.non_base[j]] for j in self.sparse]
        v, kernels = fused.Norms(len(xs)), block.kernels
        keys = _mask_keys(block, self.sparse) if kernels is not None and kernels.serves(v, [base, *xs]) else None
        sums = kernels.run(v, base, xs, keys) if keys is not None else None
        if sums is not None:
            for j, (before, after) in zip(self.sparse, sums.tolist()):
                self.before[j] += before
                self.after[j] += after
            return
        for j in self.sparse:
            a = task_delta(block, j).abs_()
            self.before[j] = _l1(a, self.before[j])
            self.after[j] = _l1(a.mul_(random_keep(block, j)), self.after[j])

    def end_pass(self, pass_index: int) -> None:
        phase = self.phases[pass_index]
        sels = self.selectors.values()
        if phase == "high":
            for sel in sels:
                sel.end_high()
        elif phase == "low":
            for sel in sels:
                sel.end_low()
        elif phase == "band" and not all([sel.end_band() for sel in sels]):
            self.phases[pass_index + 1 : pass_index + 1] = ["high", "low"]  # for the selectors the band missed
        elif phase == "ties":
            for sel in sels:
                sel.end_ties()
        if all(sel.done for sel in sels) and any(sel.needs_cutoff for sel in sels) and "ties" not in self.phases:
            self.phases.insert(pass_index + 1, "ties")  # more values tie at a threshold than the k-th place needs

    def result(self) -> "DeltaStatistics":
        return self

    def scale(self, j: int) -> float:
        return l1_rescale(self.before[j], self.after[j]) if self.rescale else 1.0


class MaskSparsifier:
    """Defaults for a sparsifier (see Sparsifier): elementwise, deterministic, no parameters or checks of its own, the
    keep mask multiplied in, no fused kernel."""

    params: tuple[Param, ...] = ()
    elementwise = True
    randomized = False
    kernel: Optional[str] = None
    check: Optional[Callable[[dict, list[dict]], None]] = None

    @staticmethod
    def wrap_merge(merge: Callable[[MergeInputs], torch.Tensor]) -> Callable[[MergeInputs], torch.Tensor]:
        return merge

    def apply(self, inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor:
        return delta.mul_(self.keep(inputs, j, delta))


class TopKMagnitude(MaskSparsifier):
    """TIES: keep the deltas whose magnitude is at least the k-th largest, k = max(1, int(density * n)), exactly."""

    kernel = "magnitude"

    def statistics(self, inputs: MergeInputs, sparse: list[int], rescale: bool) -> DeltaStatistics:
        selectors = {j: KthLargest(keep_count(density_of(inputs, j), inputs.numel), TieOrder("argsort", inputs.numel)) for j in sparse}
        return DeltaStatistics(self, rescale, sparse, ["high", "low"] + (["after"] if rescale else []), selectors)

    def keep(self, inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor:
        return inputs.stats.selectors[j].keeps(magnitude_bits(delta), inputs.offset).view(delta.shape)

    def apply(self, inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor:
        bits = inputs.stats.selectors[j].block_threshold(inputs.offset, delta.numel())
        if bits is None:
            return delta.mul_(self.keep(inputs, j, delta))  # a block keeping some tied values and not others
        return trim_magnitude(delta, bits)  # one hardshrink: |d| >= the threshold, or (no tie kept here) |d| > it


class DareBernoulli(MaskSparsifier):
    """DARE: keep each delta entry with probability density (a seeded, position-addressed Bernoulli mask)."""

    randomized = True
    kernel = "mask"
    upcasts_float16 = True  # mergekit's Bernoulli runs in float32 on float16 tensors (rescale_factor)

    def statistics(self, inputs: MergeInputs, sparse: list[int], rescale: bool) -> Optional[DeltaStatistics]:
        return DeltaStatistics(self, rescale, sparse, ["norms"]) if rescale else None  # a mask alone needs no whole-tensor numbers

    def keep(self, inputs: MergeInputs, j: int, delta: torch.Tensor) -> torch.Tensor:
        return random_keep(inputs, j)


TOP_K = TopKMagnitude()
DARE = DareBernoulli()


def _statistics_for(sparsify: Sparsify):
    def build(inputs: MergeInputs) -> Optional[TensorStatistics]:
        if sparsify is None or inputs.base is None:
            return None
        sparse = [j for j in range(len(inputs.non_base)) if 0 < density_of(inputs, j) < 1]
        return sparsify.statistics(inputs, sparse, bool(inputs.shared["rescale"])) if sparse else None

    return build


def _sparsified_delta(inputs: MergeInputs, j: int, sparsify: Sparsify) -> torch.Tensor:
    d = task_delta(inputs, j)
    density = density_of(inputs, j)
    if sparsify is None or density >= 1:
        return d
    if density <= 0:
        return d.zero_()
    d = sparsify.apply(inputs, j, d)
    stats = inputs.stats
    if stats is not None and stats.rescale:
        factor = rescale_factor(stats, j, d.dtype, _upcasts_float16(sparsify))
        if factor != 1.0:
            d.mul_(factor)
    return d


def _variant(inputs: MergeInputs, sparsify: Sparsify, consensus: bool) -> Optional[fused.Variant]:
    """The fused kernel variant for these inputs' parameters; None where only the eager code applies (a sparsifier
    without a kernel, a density of 0, a DARE input kept whole)."""
    if (sparsify is not None and sparsify.kernel is None) or inputs.base is None or not inputs.non_base:
        return None
    kind = sparsify.kernel if sparsify is not None else None
    densities = [density_of(inputs, j) for j in range(len(inputs.non_base))]
    if sparsify is not None and (min(densities) <= 0 or (kind == "mask" and max(densities) >= 1)):
        return None
    return fused.Variant(len(inputs.non_base), kind, consensus, bool(inputs.shared["normalize"]))


def _merge_fused(inputs: MergeInputs, v: fused.Variant) -> Optional[torch.Tensor]:
    """The same numbers as `merge` below, from the compiled kernel: scalars rounded to float32 as eager rounds them.
    None if the kernel failed (the caller then computes eagerly)."""
    f32 = fused.as_float32
    stats = inputs.stats
    sparse = lambda j: 0 < density_of(inputs, j) < 1  # noqa: E731
    below = [-1.0] * v.inputs  # no trimming: |d| <= -1 never holds
    masks = []
    if v.sparsify == "magnitude":
        for j in range(v.inputs):
            sel = stats.selectors[j] if sparse(j) else None
            bits = sel.block_threshold(inputs.offset, inputs.tensors[0].numel()) if sel is not None else 0
            if bits is None:
                return None  # a block keeping some tied values and not others: eager
            if bits > 0:  # as trim_magnitude: |d| <= the float just below the threshold is dropped
                below[j] = float_of_bits(bits - 1)
    elif v.sparsify == "mask":
        masks = _mask_keys(inputs, range(v.inputs))
        if masks is None:
            return None
    rescale = stats is not None and stats.rescale
    scale = [f32(stats.scale(j)) if rescale and sparse(j) else 1.0 for j in range(v.inputs)]
    weights = [inputs.per_input[i]["weight"] for i in inputs.non_base]
    xs = [inputs.tensors[i] for i in inputs.non_base]
    base = inputs.tensors[inputs.base]
    return inputs.kernels.run(v, base, xs, masks, below, scale, [f32(w) for w in weights], f32(inputs.shared["lambda"]), f32(_divisor(weights)))


def _fused_ready(inputs: MergeInputs, sparsify: Sparsify, consensus: bool) -> Optional[fused.Variant]:
    if inputs.kernels is None:
        return None
    v = _variant(inputs, sparsify, consensus)
    return v if v is not None and inputs.kernels.serves(v, inputs.tensors) else None


def _warm_up_for(sparsify: Sparsify, consensus: bool):
    def warm_up(probe: MergeInputs) -> None:
        v = _variant(probe, sparsify, consensus)
        if v is None or probe.kernels is None:
            return
        probe.kernels.request(v)
        if v.sparsify == "mask" and probe.shared["rescale"]:  # every DARE input is sparse here (see _variant)
            probe.kernels.request(fused.Norms(v.inputs))

    return warm_up


def _merge_for(sparsify: Sparsify, consensus: bool):
    def merge(inputs: MergeInputs) -> torch.Tensor:
        base = inputs.tensors[inputs.base]
        if not inputs.non_base:
            return base.clone()
        v = _fused_ready(inputs, sparsify, consensus)
        out = _merge_fused(inputs, v) if v is not None else None
        if out is not None:
            return out
        if base.dtype in LOW_PRECISION:
            return _merge_rounded(inputs, sparsify, consensus)
        weights = [inputs.per_input[i]["weight"] for i in inputs.non_base]
        deltas = [_sparsified_delta(inputs, j, sparsify) for j in range(len(weights))]
        deltas = [d.mul_(w) if w != 1 else d for d, w in zip(deltas, weights)]
        normalize = inputs.shared["normalize"]
        if consensus:
            mixed, divisor = _sign_consensus(deltas, weights, normalize)
        else:
            mixed = deltas[0]
            for d in deltas[1:]:
                mixed.add_(d)
            divisor = _divisor(weights)
        if normalize:
            mixed = mixed / divisor
        lam = inputs.shared["lambda"]
        if lam != 1:
            mixed = mixed * lam
        return base + mixed

    return merge


LOW_PRECISION = (torch.bfloat16, torch.float16)


def round_to(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` (round to nearest even), as a Python float."""
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


def _upcasts_float16(sparsify: Sparsify) -> bool:
    """mergekit's random sparsifiers (DARE's Bernoulli, DELLA's) work in float32 on float16 tensors (CPU torch has no
    float16 bernoulli), so their rescale rounds to float32 there; bfloat16 and the magnitude ones stay in the dtype."""
    return bool(getattr(sparsify, "upcasts_float16", False))


def rescale_factor(stats, j: int, dtype: torch.dtype, upcasts_float16: bool = False) -> float:
    """The L1 rescale factor of sparse input j (original norm / kept norm, 1 below RESCALE_EPS) for deltas in `dtype`.

    float32/float64: the exact quotient of the float64 norms. bfloat16/float16: as mergekit computes it in that dtype:
    each norm rounded to the dtype (mergekit's bf16 sum is a float32 accumulation rounded once; ours is the ordered
    float64 sum, so the two agree unless a norm sits within float32 noise of a bf16 rounding boundary), their quotient
    computed in float32 and rounded to the dtype."""
    if dtype not in LOW_PRECISION:
        return stats.scale(j)
    if not stats.rescale:
        return 1.0
    work = torch.float32 if (upcasts_float16 and dtype == torch.float16) else dtype
    before, after = round_to(stats.before[j], work), round_to(stats.after[j], work)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    quotient = torch.tensor(before, dtype=torch.float32) / torch.tensor(after, dtype=torch.float32)
    return quotient.to(work).item()


def _float32_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + ..., accumulated in float32 in model order: what torch's sum over a stacked bfloat16 or
    float16 tensor's first axis computes before it rounds once to the dtype (checked in tests/test_low_precision.py)."""
    total = parts[0].to(torch.float32, copy=True)
    for p in parts[1:]:
        total.add_(p)
    return total


def _merge_rounded(inputs: MergeInputs, sparsify: Sparsify, consensus: bool) -> torch.Tensor:
    """The merge of a bfloat16/float16 block with mergekit's roundings: mergekit computes this family in the config's
    dtype op by op (generalized_task_arithmetic.py), so every intermediate it rounds is rounded here too. Deltas, the
    rescaled deltas and the weighted deltas are in the dtype (each op's exact result rounded once); the weights are
    rounded to the dtype (mergekit builds them as a tensor of that dtype); every sum over the models, the elected sign's
    included, is accumulated in float32 and rounded once; the normalising division, lambda and the final base + delta
    each round once. All of it is elementwise over the models, so it is the same however the tensor is cut."""
    base = inputs.tensors[inputs.base]
    dtype = base.dtype
    weights = [round_to(inputs.per_input[i]["weight"], dtype) for i in inputs.non_base]
    deltas = [_sparsified_delta(inputs, j, sparsify) for j in range(len(weights))]
    deltas = [d.mul_(w) if w != 1 else d for d, w in zip(deltas, weights)]
    normalize = inputs.shared["normalize"]
    if consensus:
        positive = _float32_sum(deltas).to(dtype) >= 0  # mergekit: majority sign +1 where the rounded sum >= 0
        agree = [torch.where(positive, d > 0, d < 0) for d in deltas]  # sign(d) == majority; a zero never agrees
        mixed = _float32_sum([d * a for d, a in zip(deltas, agree)]).to(dtype)
        if normalize:
            divisor = _float32_sum([a.to(dtype) * w for a, w in zip(agree, weights)]).to(dtype)
            divisor.masked_fill_(divisor == 0, 1)
            mixed = mixed / divisor
    else:
        mixed = _float32_sum(deltas).to(dtype)
        if normalize:
            total = torch.tensor(0.0, dtype=torch.float32)
            for w in weights:
                total += w
            divisor = total.to(dtype).item()
            mixed = mixed / (divisor if abs(divisor) >= 1e-8 else 1.0)
    lam = inputs.shared["lambda"]
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def _sign_consensus(deltas: list[torch.Tensor], weights: list[float], normalize: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """TIES' disjoint merge: (sum of the entries agreeing with the elected sign, sum of the weights that contributed).

    The elected sign is that of the weighted sum, >= 0 counting as positive; an entry agrees when d * sign > 0. Written
    without where/masked_fill (each ~10x a plain pass here) and without bool masks: with e = copysign(1, total) the
    agreeing part of d is e * relu(d * e), exactly (multiplying by +-1 only flips signs, and rounding is symmetric).
    copysign differs from `total >= 0` only at total = -0.0, which needs every delta to be zero: nothing agrees either way.
    The divisor (with 0 replaced by 1) is built only when normalizing.
    """
    total = deltas[0] + deltas[1] if len(deltas) > 1 else deltas[0].clone()
    for d in deltas[2:]:
        total.add_(d)
    elected = torch.ones_like(total).copysign_(total)
    divisor = None
    aligned = [d.mul_(elected) for d in deltas]  # |d| where d agrees, <= 0 (or NaN) where it does not
    if normalize:
        agree = torch.empty_like(total)
        for a, w in zip(aligned, weights):
            torch.gt(a, 0, out=agree)
            divisor = agree * w if divisor is None else divisor.add_(agree, alpha=w)
        divisor.add_(torch.eq(divisor, 0, out=agree))  # no contributor: divide by 1
    mixed = aligned[0].relu_()
    for a in aligned[1:]:
        mixed.add_(a.relu_())
    return mixed.mul_(elected), divisor


def task_arithmetic_family(name: str, sparsify: Sparsify, consensus: bool, normalize: bool, rescale: bool, description: str) -> MergeMethod:
    params = (
        Param("int8_mask", bool, "shared", False),  # accepted for mergekit configs; masks here are always compact
        Param("normalize", bool, "shared", normalize),
        Param("rescale", bool, "shared", rescale),
        Param("lambda", float, "shared", 1.0),
        Param("weight", float, "non_base"),
        Param("density", float, "non_base", 1.0, bounds=(0.0, 1.0)),
    )
    merge = _merge_for(sparsify, consensus)
    fusable = sparsify is None or sparsify.kernel is not None
    return MergeMethod(
        name=name,
        params=params + (sparsify.params if sparsify else ()),
        merge=sparsify.wrap_merge(merge) if sparsify else merge,
        base_model="required",
        statistics=_statistics_for(sparsify),
        elementwise=sparsify.elementwise if sparsify else True,
        randomized=sparsify.randomized if sparsify else False,
        description=description,
        warm_up=_warm_up_for(sparsify, consensus) if fusable else None,
        check=sparsify.check if sparsify else None,
        low_precision_compute=True,
    )


TASK_ARITHMETIC = task_arithmetic_family("task_arithmetic", None, False, False, False, "base + lambda * sum of weighted task vectors")
TIES = task_arithmetic_family("ties", TOP_K, True, True, False, "top-k magnitude trim, sign election, disjoint mean (TIES)")
DARE_TIES = task_arithmetic_family("dare_ties", DARE, True, False, True, "random drop with L1 rescale, then sign election (DARE-TIES)")
DARE_LINEAR = task_arithmetic_family("dare_linear", DARE, False, False, True, "random drop with L1 rescale, weighted sum (DARE)")
