"""methods/norm_order.py: torch's CPU float32 vector 2-norm (what mergekit's karcher takes of every tensor) reproduced
on a streamed tensor. Hand-worked cases pin the lane order and the correctly rounded sqrt on any processor; where the
CPU has AVX-512, torch.linalg.norm itself is the reference (its 8-lane order is the same with AVX2 and without)."""

from __future__ import annotations

import math

import pytest
import torch

from mergeedit.merging.methods.norm_order import LANES, NormSquares, sqrt32, torch_norm

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
HALF_ULP = 2.0**-24  # half a float32 ulp of 1: the square of 2^-12, a float16 value


def _sum_of_squares(x: torch.Tensor, cuts: tuple[int, ...] = ()) -> float:
    flat = x.reshape(-1).float()
    squares = NormSquares(flat.numel())
    bounds = [0, *cuts, flat.numel()]
    for a, b in zip(bounds, bounds[1:]):
        squares.add(flat[a:b].square(), a)
    return float(squares.total())


def test_squares_follow_torchs_eight_lanes_then_the_tail():
    """1 then 15 values whose squares are half an ulp of 1. In 8 lanes: lane 0 holds 1 + 2^-24 = 1 (a tie, to even),
    lanes 1-7 hold 2^-23 each; folded left to right: 1 + 7 * 2^-23. Added one at a time it stays 1; the exact sum
    1 + 7.5 * 2^-23 rounds to 1 + 8 * 2^-23. A 17th element is past the last full vector: it is added after the fold,
    1 + 7 * 2^-23 + 2^-24, a tie that goes to the even 1 + 8 * 2^-23 (in a lane it would have been lost)."""
    x = torch.full((17,), 2.0**-12, dtype=torch.float16)
    x[0] = 1.0
    assert _sum_of_squares(x[:16]) == 1 + 7 * 2.0**-23
    assert _sum_of_squares(x) == 1 + 8 * 2.0**-23
    x[16] = 0.0
    assert _sum_of_squares(x) == 1 + 7 * 2.0**-23


def test_sqrt_is_correctly_rounded():
    """torch.sqrt of this float32 is one ulp low in torch 2.13; the norm kernel's std::sqrt (and sqrt32) is not."""
    total = torch.tensor(219.5627899169922, dtype=torch.float32)
    exact = math.sqrt(float(total))
    below, above = float(sqrt32(total).nextafter(torch.tensor(0.0))), float(sqrt32(total).nextafter(torch.tensor(99.0)))
    assert abs(float(sqrt32(total)) - exact) <= min(abs(below - exact), abs(above - exact))
    assert float(sqrt32(total)) == 14.817651748657227


LENGTHS = (1, 7, 8, 9, 100, 1001, 32_768, 32_775, 40_001, 70_003)


def _planted(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values of several magnitudes, and one large value every 97 elements: the lanes hold sums whose low
    bits the order decides."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-6, 4, (n,), generator=g).float())
    x[::97] = 40.0
    return x.to(dtype)


@pytest.mark.skipif(not AVX512, reason="torch.linalg.norm as the reference where the CPU has AVX-512")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_is_torchs_float32_norm(dtype):
    for n in LENGTHS:
        for seed in range(3):
            x = _planted(n, dtype, n * 10 + seed)
            for shaped in (x, x.reshape(-1, 1) if n % 2 else x.reshape(2, -1)):
                ref = torch.linalg.norm(shaped.float())
                assert torch.equal(torch_norm(shaped), ref), (dtype, n, seed, tuple(shaped.shape))


@pytest.mark.parametrize("threads", [1, 2])
def test_norm_does_not_depend_on_threads_or_cuts(threads):
    """Whole, in blocks cut off the 8-element grid, and in blocks on it: the same float32 sum of squares."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (9, 1001, 40_001, 70_003):
            x = _planted(n, torch.float16, n)
            whole = _sum_of_squares(x)
            assert _sum_of_squares(x, tuple(range(3, n, 1237))) == whole
            assert _sum_of_squares(x, tuple(range(LANES * 5, n, LANES * 611))) == whole
            assert torch.equal(torch_norm(x), sqrt32(torch.tensor(whole, dtype=torch.float32)))
    finally:
        torch.set_num_threads(before)
