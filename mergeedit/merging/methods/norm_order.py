"""torch's CPU float32 vector 2-norm of a whole tensor, reproduced bit for bit on a streamed tensor.

mergekit's karcher takes torch.linalg.norm(t.float()) of whole tensors. On the CPU torch 2.13 computes the 2-norm of a
contiguous float32 tensor reduced to one number in norm_kernel_tensor_iterator_impl's `is_reduce_lastdim` path
(aten/src/ATen/native/cpu/ReduceOpsKernel.cpp): one Vectorized<float> accumulator, `acc += x * x` vector by vector over
the first n - n % LANES elements (flat element order), the lanes stored and folded left to right (lane 0 + lane 1 +
... + lane 7), then the last n % LANES squares added one at a time, then std::sqrt (sqrt32). The reduction has a single
output, so binary_kernel_reduce_lastdim runs it on one thread. LANES is 8 on every x86 build: measured on an AVX-512
CPU, torch.linalg.norm gives the 8-lane bits with ATEN_CPU_CAPABILITY=avx512, avx2 and default, 1 and 2 threads, 1-D and
2-D (tests/test_norm_order.py checks the avx512 case against torch; the bits depend only on the tensor's length).

Here the terms are given as exact float32 squares (of bfloat16/float16 values widened to float32, whose squares need
at most 22 significant bits), so torch's product, fused or not, is the same number. Each lane is a running float32
sum in element order: index_add_ into a 1-D float32 tensor is a sequential scalar loop (the dim <= 1 branch of
index_add_cpu_), so the lanes carried from block to block are the same additions however the tensor is cut into
blocks, with any threads.
"""

from __future__ import annotations

import torch

LANES = 8  # float32 lanes of the accumulator torch's vector norm uses on x86 (AVX-512, AVX2 and default builds)


_PATTERN = torch.zeros(0, dtype=torch.int64)  # 0, 1, ..., 7, 0, 1, ...: lane ids, sliced (not rebuilt) per block


def _lane_ids(phase: int, n: int) -> torch.Tensor:
    """The lanes of n consecutive elements, the first in lane `phase`."""
    global _PATTERN
    pattern = _PATTERN  # one read: another thread may replace the cache meanwhile, never mutate it
    if pattern.numel() < phase + n:
        pattern = torch.arange(max(phase + n, 2 * pattern.numel()), dtype=torch.int64).remainder_(LANES)
        _PATTERN = pattern
    return pattern[phase : phase + n]


class NormSquares:
    """The float32 sum of squares torch.linalg.norm takes the sqrt of, fed block by block in flat element order.

    add(squares, offset) takes the exact float32 squares of the elements [offset, offset + len) of a tensor of `numel`
    elements; total() returns the float32 sum (a 0-dim float32 tensor)."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.full = numel - numel % LANES  # elements that go through the lanes; the rest are added one by one
        self.lanes = torch.zeros(LANES, dtype=torch.float32)
        self.tail: list[torch.Tensor] = []

    def add(self, squares: torch.Tensor, offset: int) -> None:
        flat = squares.reshape(-1).to(torch.float32)
        head = max(0, min(flat.numel(), self.full - offset))
        if head:
            self.lanes.index_add_(0, _lane_ids(offset % LANES, head), flat[:head])
        if head < flat.numel():
            self.tail.append(flat[head:].clone())

    def total(self) -> torch.Tensor:
        total = self.lanes[0].clone()
        for j in range(1, LANES):
            total += self.lanes[j]
        for part in self.tail:
            for value in part:
                total += value
        return total


def sqrt32(total: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 sqrt of float32 values, as the kernel's std::sqrt returns it (the float64 sqrt
    rounded once is correctly rounded: 53 >= 2 * 24 + 2). torch.sqrt of a float32 tensor is not always: in torch 2.13
    torch.tensor(219.5627899169922).sqrt() is 14.81765079498291, one float32 ulp below the correctly rounded
    14.817651748657227 that torch.linalg.norm returns for a tensor with that sum of squares."""
    return total.to(torch.float64).sqrt().to(torch.float32)


def torch_norm(x: torch.Tensor) -> torch.Tensor:
    """torch.linalg.norm(x.float()) of a bfloat16/float16 (or float32-held) tensor, as torch computes it on the CPU."""
    flat = x.reshape(-1).to(torch.float32)
    squares = NormSquares(flat.numel())
    squares.add(flat.square(), 0)
    return sqrt32(squares.total())
