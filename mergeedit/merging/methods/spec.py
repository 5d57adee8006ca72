"""What a merge method is: a pure function over tensors plus the parameters it reads.

The executor knows methods only through this interface: it resolves the declared parameters per tensor, hands each
block of elements to `merge`, and, for methods that need whole-tensor statistics (a TIES threshold, a DARE rescale),
streams the blocks through a `TensorStatistics` first. An elementwise method sees cache-sized 1-D blocks of the
flattened tensor (many small passes in cache beat a few passes through memory); `offset` says where a block starts,
so position-addressed randomness gives the same answer however the tensor is cut. A method must not modify its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Protocol

import torch

REQUIRED = object()

Scope = Literal["shared", "input", "non_base"]
"""shared: one value per tensor (global/slice); input: one per input model, base included; non_base: one per
input model except the base (mergekit's NON_BASE)."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float or bool
    scope: Scope
    default: Any = REQUIRED
    bounds: Optional[tuple[float, float]] = None  # closed range a float must lie in, where mergekit's semantics define one

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
        elif self.kind is float:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    pass
            if number is not None:
                return self._in_range(number)
        raise ValueError(f"expected a {self.kind.__name__}, got {value!r}")


    def _in_range(self, number: float) -> float:
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {number}")
        if self.bounds is not None and not self.bounds[0] <= number <= self.bounds[1]:
            low, high = self.bounds
            raise ValueError(f"must be between {low:g} and {high:g}, got {number:g}")
        return number


@dataclass
class MergeInputs:
    """One block of one output tensor: the same elements of every input, in model order."""

    name: str  # output tensor name
    tensors: list[torch.Tensor]  # compute dtype, identical shapes (1-D blocks for elementwise methods)
    base: Optional[int]  # index of the base model's tensor in `tensors`
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]  # parallel to tensors; non_base params absent for the base
    offset: int = 0  # element offset of this block in the flattened tensor
    numel: int = 0  # elements in the whole tensor
    seed: int = 0  # derived from --random-seed and the tensor name
    stats: Any = None  # TensorStatistics.result(), when the method has statistics
    shape: tuple[int, ...] = ()  # shape of the whole output tensor (row-wise statistics: row = offset // prod(shape[1:]))
    kernels: Any = None  # the merge's fused.KernelCompiler: faster kernels a method may request and use; None: eager
    dtype: Optional[torch.dtype] = None  # the compute dtype the blocks come in (set for statistics' data-less probe)

    @property
    def non_base(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base]


class TensorStatistics(Protocol):
    """Whole-tensor statistics gathered over every block in `passes` streaming passes before merging.

    `passes` may change as the statistic learns: the executor schedules reads for the value it has when built and
    reads it again after every pass. An optional `prepare(sample: MergeInputs)` is called with a strided sample of
    the tensor before the first pass (a TIES threshold aims a narrow band with it). An optional `selection_bytes`
    bounds the working memory the statistic may hold outside the in-flight budget (mergekit's tie order: see
    selection.TieOrder); the plan estimate reports the largest."""

    passes: int

    def observe(self, pass_index: int, block: MergeInputs) -> None: ...

    def end_pass(self, pass_index: int) -> None: ...

    def result(self) -> Any: ...


@dataclass(frozen=True)
class MergeMethod:
    name: str
    params: tuple[Param, ...]
    merge: Callable[[MergeInputs], torch.Tensor]
    base_model: Literal["required", "optional"] = "optional"
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    # Build the statistics a tensor needs before its chunks can merge independently; None when not needed.
    statistics: Optional[Callable[[MergeInputs], Optional[TensorStatistics]]] = None
    # False for methods that need a whole tensor (or whole rows) at once: they get row chunks, never 1-D blocks.
    elementwise: bool = True
    randomized: bool = False
    description: str = ""
    # Prepare a faster way to compute blocks like `probe`'s (a compiled kernel, built in the background) for a big
    # merge; `merge` switches to it once ready, with identical results. None when the method has none.
    warm_up: Optional[Callable[[MergeInputs], None]] = None
    # Plan-time check of one tensor's resolved parameters; raises ValueError with a user-facing reason.
    check: Optional[Callable[[dict, list[dict]], None]] = None
    # True when mergekit computes this method in the inputs' own dtype (a config's `dtype: bfloat16`), rounding to it
    # after every operation, and `merge` reproduces those roundings for bfloat16/float16 blocks: the planner then hands
    # it blocks in that dtype. False: it computes in float32 and the result is rounded once (as mergekit does for
    # methods that upcast, and for every method under --float32-compute).
    low_precision_compute: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)
