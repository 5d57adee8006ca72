"""methods/softmax.py: torch's CPU softmax reproduced by elementwise IEEE operations in a fixed order, so arcee_fusion
gets mergekit's softmax bits (as an AVX-512 CPU computes them) on every CPU. Hand-worked cases pin the fused
multiply-add and the lane order on any processor; where the CPU has AVX-512, F.softmax itself is the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mergeedit.merging.methods.softmax import fma32, lane_sum, torch_softmax, vector_exp

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def test_fma32_rounds_the_exact_value_once():
    """(1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 lies exactly halfway between the float32 values 1 + 2^-11 and 1 + 2^-11 + 2^-23.
    Adding c = +-2^-80 moves the exact value off the tie; float64 cannot hold it (the sum rounds back to the tie), so
    rounding the float64 sum to float32 would give the even neighbour both times. One rounding gives the nearer one."""
    a = torch.tensor([1 + 2.0**-12] * 3, dtype=torch.float32)
    c = torch.tensor([2.0**-80, -(2.0**-80), 0.0], dtype=torch.float32)
    low, high = 1 + 2.0**-11, 1 + 2.0**-11 + 2.0**-23
    assert float(a[0]) ** 2 + 2.0**-80 == float(a[0]) ** 2  # the precondition: float64 loses c
    assert fma32(a, a, c).tolist() == [high, low, low]  # the tie itself (c = 0) goes to the even one, 1 + 2^-11
    assert (a.double() * a.double() + c.double()).float().tolist() == [low, low, low]  # two roundings


def test_lane_sum_follows_the_avx512_lanes():
    """A row of 1 then 31 values of 2^-24 (half an ulp of 1). In 16 lanes: lane 0 holds 1 + 2^-24 = 1 (a tie, to
    even), lanes 1-15 hold 2^-23 each; folding (i + 8, + 4, + 2, + 1) gives 1 + 2^-23, + 2^-22, + 2^-21, + 2^-20 =
    1 + 15 * 2^-23. Added one at a time it is 1; exactly, 1 + 15.5 * 2^-23, rounded 1 + 16 * 2^-23. Rows shorter than
    16 add one at a time: 1 and 7 halves of an ulp stay 1."""
    row = torch.full((1, 32), 2.0**-24)
    row[0, 0] = 1.0
    assert lane_sum(row).tolist() == [1 + 15 * 2.0**-23]
    assert lane_sum(row[:, :8]).tolist() == [1.0]
    # a partial last vector adds into its first lanes only: 33 elements put the 33rd into lane 0 (1 + 2^-24 = 1 again)
    longer = torch.cat([row, torch.full((1, 1), 2.0**-24)], 1)
    assert lane_sum(longer).tolist() == [1 + 15 * 2.0**-23]


def test_vector_exp_is_within_one_ulp_and_underflows_as_sleef():
    d = -torch.linspace(0, 87, 200_001)
    e = vector_exp(d)
    exact = torch.exp(d.double())
    ulp = torch.nextafter(exact.float(), torch.tensor(float("inf"))).double() - exact.float().double()
    assert float(((e.double() - exact).abs() / ulp).max()) < 1.0
    assert vector_exp(torch.tensor([0.0, -104.5, -200.0])).tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_do_not_depend_on_threads_or_neighbours(threads):
    """Rows of 40,001 (over torch's 32,768-element grain, so elementwise ops are split between threads)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40_001, generator=g) * 0.05
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for reduced in (False, True):
            whole = torch_softmax(x, reduced)
            assert torch.equal(torch_softmax(x[1:2], reduced), whole[1:2])
            torch.set_num_threads(1)
            assert torch.equal(torch_softmax(x, reduced), whole)
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not AVX512, reason="F.softmax's bits are the AVX-512 kernel's only on a CPU with AVX-512")
@pytest.mark.parametrize("scale", [0.02, 3.0, 60.0])
def test_torch_softmax_is_torchs_own_on_avx512(scale):
    """Every row length class (shorter than a vector, whole vectors, a partial last vector, long rows), small and
    large logits (60: exps near the float32 underflow), float32 and bfloat16/float16 input."""
    g = torch.Generator().manual_seed(int(scale * 100))
    for n in (1, 2, 3, 15, 16, 17, 31, 33, 64, 100, 172, 777, 4096, 34_000):
        x = torch.randn(max(1, 20_000 // n), n, generator=g) * scale
        assert torch.equal(torch_softmax(x), F.softmax(x, dim=-1)), n
        for dtype in (torch.bfloat16, torch.float16):
            low = x.to(dtype)
            assert torch.equal(torch_softmax(low.float(), reduced=True).to(dtype), F.softmax(low, dim=-1)), (n, dtype)
