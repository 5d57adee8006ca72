"""torch's CPU softmax over the last axis, reproduced bit for bit by a fixed sequence of IEEE operations.

mergekit's arcee_fusion takes F.softmax of float32 (or bfloat16/float16) rows. torch 2.13 computes it on x86 as
e = exp(x - max) by SLEEF's expf_u10 (a float32 polynomial evaluated with fused multiply-adds), the normaliser by adding
e into one vector of float32 lanes and then folding the lanes in a tree, and e * (1 / normaliser). The lane count is the
CPU's vector width (16 floats with AVX-512, 8 with AVX2), so the order of the float32 additions, and through it the
softmax's bits, follow the processor: mergekit's arcee_fusion kept set differs between the two on 9.6% of a float32
toy model's entries (README "Where we differ").

Here the same operations run elementwise over the row (float32 add, multiply and divide are correctly rounded on every CPU;
the fused multiply-add is computed in float64 and rounded once, exactly: fma32), and the normaliser always follows the
AVX-512 lanes, added in a fixed order that depends only on the row's length: torch's bits on an AVX-512 CPU, the same
bits on any CPU, with any threads and however the tensor is cut into rows. For bfloat16/float16 input torch's kernel
differs in one place: the row's last len % 16 elements take the scalar exp and are added one at a time after the lanes
are folded. That exp is glibc's expf (within 0.502 ulp); here it is the float64 exp rounded once (about 0.5 ulp), so
the two can differ where exp lies within ~0.002 ulp of a float32 halfway point (never in our checks against torch), and
then only by one float32 ulp of a softmax that is rounded to bfloat16/float16. tests/test_softmax.py checks both
against F.softmax where the CPU has AVX-512.
"""

from __future__ import annotations

import torch

LANES = 16  # float32 lanes of an AVX-512 vector: the accumulation order reproduced here


_DROPPED = 0x1FFFFFFF  # the 29 bits of a float64 significand that float32 drops
_HALFWAY = 0x10000000  # those bits when the float64 value lies exactly halfway between two float32 values


def fma32(a: torch.Tensor, b: torch.Tensor | float, c: torch.Tensor | float) -> torch.Tensor:
    """a * b + c of float32 values (given as float32 or float64 tensors holding float32 values, or Python floats that
    are float32 values), rounded once to float32: a fused multiply-add. The product of two float32 values is exact in
    float64; the float64 sum s = RN(p + c) rounds to the same float32 as the exact value unless s lies exactly halfway
    between two float32 values, and there the sign of the float64 rounding error (TwoSum) decides. (Results in float32's
    normal range, as every step of vector_exp's polynomial is; a subnormal result's halfway points are not checked.)"""
    a64, c64 = a.to(torch.float64), c.to(torch.float64) if isinstance(c, torch.Tensor) else c
    b64 = b.to(torch.float64) if isinstance(b, torch.Tensor) else b
    s = a64 * b64
    s += c64
    out = s.to(torch.float32)
    halfway = (s.view(torch.int64) & _DROPPED) == _HALFWAY
    if bool(halfway.any()):
        p = a64 * b64
        c64 = torch.as_tensor(c64, dtype=torch.float64).expand_as(s)
        bb = s - p
        err = (p - (s - bb)) + (c64 - bb)  # the exact error of s (TwoSum)
        nudged = torch.where((err > 0) == (s > 0), s.view(torch.int64) + 1, s.view(torch.int64) - 1).view(torch.float64)
        out = torch.where(halfway & (err != 0), nudged.to(torch.float32), out)
    return out


def _f32(value: float) -> float:
    """value rounded to float32 (as a Python float, exact in float64)."""
    return float(torch.tensor(value, dtype=torch.float32))


# SLEEF's expf_u10 (Boost-licensed; the float32 exp torch's vectorised kernels call): exp(d) = 2^q * exp(s), with
# q = round(d / ln 2), s = d - q * ln 2 in two parts (fused), and exp(s) = 1 + s + s^2 * poly(s).
_R_LN2 = _f32(1.442695040888963407359924681001892137426645954152985934135449406931)
_L2U = _f32(-0.693145751953125)
_L2L = _f32(-1.428606765330187045e-06)
_POLY = [
    _f32(v)
    for v in (
        0.000198527617612853646278381,
        0.00139304355252534151077271,
        0.00833336077630519866943359,
        0.0416664853692054748535156,
        0.166666671633720397949219,
        0.5,
    )
]


PIECE = 1 << 16  # elements per piece: the float64 temporaries stay in the cache (elementwise, so any piece size)


def vector_exp(d: torch.Tensor) -> torch.Tensor:
    """exp of float32 values <= 0 as SLEEF's expf_u10 computes it (within 1 ulp of exp; bit for bit torch's
    Vectorized<float>::exp on x86), worked through in pieces of PIECE elements."""
    flat = d.reshape(-1)
    out = torch.empty_like(flat)
    for a in range(0, flat.numel(), PIECE):
        out[a : a + PIECE] = _vector_exp(flat[a : a + PIECE])
    return out.view(d.shape)


def _vector_exp(d: torch.Tensor) -> torch.Tensor:
    q = torch.round(d * _R_LN2)  # float32 product, rounded half to even as the vector convert does
    s = fma32(q, _L2L, fma32(q, _L2U, d))
    s64 = s.to(torch.float64)
    u = fma32(torch.full_like(s64, _POLY[0]), s64, _POLY[1])
    for coefficient in _POLY[2:]:
        u = fma32(u, s64, coefficient)
    u = fma32(s * s, u, s64).add_(1.0)
    qi = q.to(torch.int32)
    half = qi >> 1  # 2^q as two powers of two, so that results near the underflow round once, as SLEEF does
    u = u * ((half + 127) << 23).view(torch.float32) * ((qi - half + 127) << 23).view(torch.float32)
    return u.masked_fill_(d < -104, 0.0)


def _fold(lanes: torch.Tensor) -> torch.Tensor:
    """The 16 lanes [rows, 16] folded as the AVX-512 reduction does: lane i + lane i + 8, then + 4, + 2, + 1."""
    while lanes.shape[-1] > 1:
        half = lanes.shape[-1] // 2
        lanes = lanes[:, :half] + lanes[:, half:]
    return lanes[:, 0]


def _lanes(e: torch.Tensor) -> torch.Tensor:
    """e [rows, 16 k] added vector by vector into one accumulator of 16 float32 lanes, then folded."""
    acc = torch.zeros(e.shape[0], LANES, dtype=torch.float32)
    for k in range(0, e.shape[1], LANES):
        acc += e[:, k : k + LANES]
    return _fold(acc)


def _one_by_one(total: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    for i in range(e.shape[1]):
        total = total + e[:, i]
    return total


def lane_sum(e: torch.Tensor) -> torch.Tensor:
    """Row sums of float32 [rows, n] in the order of torch's AVX-512 float32 reduction: a row shorter than a vector is
    one partly filled vector whose lanes are added one by one; a longer row is added vector by vector into 16 lanes
    (the last, partial vector into its first n % 16 lanes: zero padding adds 0.0 to the others, which leaves them as
    they are), then the lanes are folded."""
    n = e.shape[1]
    if n < LANES:
        return _one_by_one(e[:, 0], e[:, 1:])
    padded = -(-n // LANES) * LANES
    return _lanes(torch.nn.functional.pad(e, (0, padded - n)) if padded != n else e)


def torch_softmax(x: torch.Tensor, reduced: bool = False) -> torch.Tensor:
    """F.softmax(x, dim=-1) of 2-D float32 rows as torch computes it on an AVX-512 CPU, on any CPU. reduced: x holds
    bfloat16/float16 values (widened to float32) and the result is the float32 softmax that torch rounds to that dtype
    (its kernel for those dtypes takes the last n % 16 elements' exp and sum one at a time)."""
    if x.shape[-1] == 0:
        return x.clone()
    d = x - x.max(dim=-1, keepdim=True).values
    if not reduced:
        e = vector_exp(d)
        return e.mul_(1 / lane_sum(e).unsqueeze(-1))
    full = d.shape[1] - d.shape[1] % LANES
    e = torch.empty_like(d)
    e[:, :full] = vector_exp(d[:, :full])
    e[:, full:] = torch.exp(d[:, full:].to(torch.float64)).to(torch.float32)  # glibc's expf (see the top)
    return e.mul_(1 / _one_by_one(_lanes(e[:, :full]), e[:, full:]).unsqueeze(-1))
