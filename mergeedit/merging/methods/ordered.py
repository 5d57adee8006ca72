"""Sums whose bits do not depend on how a tensor is cut: added one element at a time, in element order, in float64.

A whole-tensor statistic (an L1 norm, a sum of squares, a Gram entry) is gathered block by block, and the executor's
blocks start wherever a row chunk starts, which moves with the memory budget. torch's own reductions add in an order
that depends on the block's length, the thread count (a full reduction is split between threads) and the CPU's vector
width, so adding up per-block sums would make the statistic, and through it the merged bytes, depend on the budget.
Instead every statistic is the running total start + v[0] + v[1] + ..., each addition rounded to float64, carried from
block to block: the same sequence of IEEE additions however the tensor is cut, on any processor. torch.cumsum on a 1-D
float64 tensor is exactly that sequential scan (tests/test_split_invariance.py checks it against a Python loop, with 1
and 2 threads). It costs about a float64 pass over the block, small next to reading the inputs.
"""

from __future__ import annotations

import torch


def ordered_sum(values: torch.Tensor, start: float = 0.0) -> float:
    """start + values[0] + values[1] + ... (flattened), each addition in float64, in element order."""
    flat = values.reshape(-1)
    if flat.numel() == 0:
        return float(start)
    scan = flat.to(torch.float64, copy=True)
    scan[0] += start
    return float(scan.cumsum_(0)[-1])


def ordered_row_sums(values: torch.Tensor) -> torch.Tensor:
    """Per row (last axis), values[..., 0] + values[..., 1] + ... in float64, in element order: a row's sum depends
    only on that row, not on how many rows come with it or the threads."""
    if values.shape[-1] == 0:
        return torch.zeros(values.shape[:-1], dtype=torch.float64)
    return values.to(torch.float64, copy=True).cumsum_(-1)[..., -1].contiguous()
