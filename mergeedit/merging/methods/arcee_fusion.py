"""arcee_fusion: take the other model's change only where it matters most, judged against the base.

importance = |x - base| * KL(softmax(x) || softmax(base)), the KL taken row by row over the last dimension (a 1-D tensor
is one row) with 1e-8 added to both softmaxes, as mergekit does. An entry keeps x where its importance is at least
median + 1.5 * IQR of all importances in the tensor, else it keeps the base: out = base + (x - base) * keep.

Quantiles are those of mergekit's rule (the value at sorted position floor(q * (n - 1))), taken exactly over the whole
tensor by streaming selection. mergekit computes them the same way up to 10^6 elements and on a random sample of 10^6
importances above that, so on big tensors its threshold (and kept fraction) moves with its RNG while ours is exact and
needs no seed.

Softmax rows must be whole, so the method is not elementwise: it sees whole tensors or row chunks, and works through
them a group of rows at a time so temporaries stay bounded (tens of MB). Pass 1 stores one KL per row (4 bytes a row, the only
state that grows with the tensor) and feeds the importances to the selection; pass 2 finishes the selection. The KL of
a row depends only on that row, so chunked and whole agree bit for bit.

The same bytes on every CPU: mergekit's KL is torch's softmax and float32 row sum. torch adds the softmax's float32
normaliser in vector lanes whose count follows the processor (16 with AVX-512, 8 with AVX2), and for rows of small
changes the KL is a tiny difference of nearly equal terms that a few ulp of normaliser move a lot: mergekit's output
with AVX2 kernels differs from its AVX-512 output on 9.6% of a float32 toy model's entries. Here each softmax is torch's as an
AVX-512 CPU computes it, reproduced by elementwise IEEE ops in a fixed order (softmax.py), and the KL's row sum is
added in float64 in element order and rounded once (the rule of lowp.py for every reduction): mergekit's bits on an
AVX-512 CPU in tools/mergekit_parity.py's configs, the same bytes on every CPU.

In bfloat16/float16 (a config's `dtype`) mergekit computes the importances in the dtype: both softmaxes, the added
1e-8, p / q, its log, p * log, the row sum, |x - base| and the product each rounded to it, and the threshold
median + 1.5 * (q3 - q1) by three rounded ops. The low-precision path runs those ops on the same dtype (each softmax
torch's float32 softmax for that dtype, reproduced as above, rounded once to it; the row sum added in float64 in element
order and rounded as torch rounds its float32 total: lowp.py). mergekit's result, base + (x - base) * mask
with a float32 mask, is float32 there; here it is that float32 value rounded once to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from ...core.errors import MergeEditError
from .lowp import is_low_precision, round_total
from .ordered import ordered_row_sums
from .quantiles import ExactOrderStatistics
from .softmax import torch_softmax
from .spec import MergeInputs, MergeMethod

SOFTMAX_EPS = 1e-8  # mergekit adds this to both softmaxes before the log
IQR_FACTOR = 1.5
GROUP = 1 << 22  # elements per group of rows worked on at once (smaller groups measured several times slower)


def row_length(shape: tuple[int, ...]) -> int:
    """Elements per softmax row: the last dimension (a 0-D tensor is one row of one)."""
    return shape[-1] if shape else 1


def quantile_ranks(n: int) -> list[int]:
    """Sorted positions mergekit reads q1, median and q3 from: floor(q * (n - 1))."""
    return [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]


def row_kl(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) + eps || softmax(base) + eps) per row of 2-D float32 inputs: mergekit's float32 ops, torch's
    softmax reproduced in a fixed order (softmax.py), the row sum added in float64 in element order, rounded once."""
    p = torch_softmax(x).add_(SOFTMAX_EPS)
    q = torch_softmax(base).add_(SOFTMAX_EPS)
    return round_total(ordered_row_sums(p * torch.log(p / q)), torch.float32)


def low_precision_row_kl(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """row_kl as mergekit computes it on bfloat16/float16 rows: every op rounded to their dtype (returned in it); each
    softmax is torch's float32 softmax for that dtype (softmax.py) rounded once to it, as torch rounds it."""
    p = torch_softmax(x.to(torch.float32), reduced=True).to(x.dtype) + SOFTMAX_EPS
    q = torch_softmax(base.to(torch.float32), reduced=True).to(x.dtype) + SOFTMAX_EPS
    return round_total(ordered_row_sums(p * torch.log(p / q)), x.dtype)


@dataclass
class _Rows:
    """One block seen as whole softmax rows: (rows, C) views in the compute dtype."""

    x: torch.Tensor
    base: torch.Tensor
    first_row: int


def _rows(inputs: MergeInputs) -> _Rows:
    c = row_length(inputs.shape)
    n = inputs.tensors[inputs.base].numel()
    if inputs.offset % c or n % c:
        raise MergeEditError(
            f"tensor '{inputs.name}': arcee_fusion needs whole rows of {c} elements but got elements {inputs.offset}..{inputs.offset + n}; "
            "raise --memory-budget so the tensor is not cut inside a row"
        )
    x = inputs.tensors[inputs.non_base[0]].reshape(-1, c)
    base = inputs.tensors[inputs.base].reshape(-1, c)
    return _Rows(x, base, inputs.offset // c)


def _groups(rows: _Rows) -> Iterator[tuple[int, int]]:
    step = max(1, GROUP // max(1, rows.x.shape[1]))
    for a in range(0, rows.x.shape[0], step):
        yield a, min(a + step, rows.x.shape[0])


def _importance(rows: _Rows, kl: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """|x - base| * row KL in float32 (the selection works on float32 values; float64 inputs are rounded for it). For
    bfloat16/float16 rows: computed in their dtype (kl holds its values), then widened exactly to float32."""
    if is_low_precision(rows.x.dtype):
        delta = (rows.x[a:b] - rows.base[a:b]).abs()
        return delta.mul_(kl[rows.first_row + a : rows.first_row + b, None].to(delta.dtype)).to(torch.float32)
    delta = rows.x[a:b].to(torch.float32) - rows.base[a:b].to(torch.float32)
    return delta.abs_().mul_(kl[rows.first_row + a : rows.first_row + b, None])


@dataclass
class FusionStatistics:
    """Pass 1: per-row KL and the first selection pass over the importances; pass 2: the exact quantiles."""

    numel: int
    n_rows: int
    passes: int = 2
    kl: torch.Tensor = field(init=False)
    order: ExactOrderStatistics = field(init=False)
    threshold: Optional[float] = None
    dtype: torch.dtype = torch.float32  # the dtype the importances and the threshold are computed in

    def __post_init__(self) -> None:
        self.kl = torch.zeros(self.n_rows, dtype=torch.float32)
        self.order = ExactOrderStatistics(self.numel, quantile_ranks(self.numel))

    def observe(self, pass_index: int, block: MergeInputs) -> None:
        rows = _rows(block)
        for a, b in _groups(rows):
            if pass_index == 0 and is_low_precision(rows.x.dtype):
                self.dtype = rows.x.dtype
                self.kl[rows.first_row + a : rows.first_row + b] = low_precision_row_kl(rows.x[a:b], rows.base[a:b])
                self.order.observe_first(_importance(rows, self.kl, a, b))
            elif pass_index == 0:
                self.kl[rows.first_row + a : rows.first_row + b] = row_kl(rows.x[a:b].to(torch.float32), rows.base[a:b].to(torch.float32))
                self.order.observe_first(_importance(rows, self.kl, a, b))
            else:
                self.order.observe_second(_importance(rows, self.kl, a, b))

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            self.order.end_first()
            return
        self.order.end_second()
        q1, median, q3 = (torch.tensor(v, dtype=self.dtype) for v in self.order.values)
        self.threshold = float(median + IQR_FACTOR * (q3 - q1))  # in the importances' dtype, as mergekit's

    def result(self) -> "FusionStatistics":
        return self


def _statistics(inputs: MergeInputs) -> Optional[FusionStatistics]:
    if inputs.numel == 0:
        return None
    return FusionStatistics(inputs.numel, inputs.numel // row_length(inputs.shape))


def arcee_fusion_merge(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.tensors[inputs.base]
    stats: Optional[FusionStatistics] = inputs.stats
    if stats is None:  # an empty tensor
        return base.clone()
    rows = _rows(inputs)
    low = is_low_precision(rows.base.dtype)
    out = torch.empty_like(rows.base, dtype=torch.float32 if low else None)
    for a, b in _groups(rows):
        keep = _importance(rows, stats.kl, a, b) >= stats.threshold
        if low:  # mergekit: base + (x - base) * float32 mask, a float32 result
            keep = keep.to(torch.float32)
        out[a:b] = rows.base[a:b] + (rows.x[a:b] - rows.base[a:b]) * keep
    return out.view(base.shape)


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    params=(),
    merge=arcee_fusion_merge,
    base_model="required",
    min_inputs=2,
    max_inputs=2,
    statistics=_statistics,
    elementwise=False,
    description="keep the other model's changes whose |delta| * row KL is an upper outlier (median + 1.5 IQR)",
    low_precision_compute=True,  # mergekit computes the importances in the dtype; see the module docstring
)
