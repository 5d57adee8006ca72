"""Reproducible uniform noise addressed by element position: a counter-based generator.

Element p of the stream named by `seed` is an integer hash of p: triple32 (C. Wellons' three-round 32-bit mix, a
bijection with low bias) of (p mod 2^32) XOR a 32-bit key drawn from (seed, p // 2^32). Its top 24 bits are the
uniform value, the 24 bits torch.rand puts in a float32. Any row range regenerates exactly its own elements, so a
tensor merged whole or in chunks under any memory budget gets the same mask, and a compiled kernel computes the mask
inline from a three-number key instead of reading noise from memory.

Why not torch.rand: its mt19937 stream is sequential (2.4 ns per element here, drawn twice per DARE input: once for
the L1 rescale, once for the merge) and cannot run inside a fused kernel. Eager, the hash costs the same 2.5 ns;
compiled together with the rescale sums it is 1.2 ns per element for both.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch

SPAN = 1 << 32  # positions per key: position p hashes p % SPAN under the key of p // SPAN
_MULTIPLIERS = (0xED5AD4BB, 0xAC4C1B51, 0x31848BAB)
_SHIFTS = (17, 11, 15, 14)
UNIFORM_BITS = 24


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (the run seed, a tensor name, a model index)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _int32(v: int) -> int:
    """v mod 2^32 as a signed 32-bit value (torch has no uint32 arithmetic on CPU; int32 wraps the same way)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


_MULTS32 = tuple(_int32(m) for m in _MULTIPLIERS)


def keep_limit(density: float) -> int:
    """Keep an element when its 24-bit value m < this: u = m / 2^24 < density, exactly, with no float rounding."""
    return min(1 << UNIFORM_BITS, max(0, math.ceil(density * (1 << UNIFORM_BITS))))


def key(seed: int, offset: int, limit: int = 0) -> torch.Tensor:
    """What a kernel needs to regenerate positions offset.. of stream `seed` (within one SPAN): an int32 tensor
    [offset mod 2^32, the span's key, the keep limit]. A tensor, not Python ints: torch.compile would specialise on
    int arguments (an offset of 0 or 1) and recompile."""
    return torch.tensor([_int32(offset % SPAN), _int32(derive_seed(seed, offset // SPAN)), limit], dtype=torch.int32)


def kernel_key(seed: int, offset: int, count: int, density: float) -> Optional[torch.Tensor]:
    """key() of keep_mask(seed, offset, count, density) for a kernel; None when the range crosses a SPAN."""
    pieces = list(_pieces(offset, count))
    return key(seed, offset, keep_limit(density)) if len(pieces) <= 1 else None


def hashed(count: int, k: torch.Tensor) -> torch.Tensor:
    """The top 24 bits of triple32(position XOR key) for `count` positions from k[0], as non-negative int32.

    Plain torch ops, written in place (half the time of allocating ones eager), the same function eager and inside
    a compiled kernel; int32 arithmetic wraps as uint32 does, and right shifts are masked to be logical."""
    x = torch.arange(count, dtype=torch.int32)
    x.add_(k[0]).bitwise_xor_(k[1])
    t = torch.empty_like(x)
    for shift, mult in zip(_SHIFTS, (*_MULTS32, None)):
        torch.bitwise_right_shift(x, shift, out=t).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(t)
        if mult is not None:
            x.mul_(mult)
    x.bitwise_right_shift_(32 - UNIFORM_BITS)
    return x.bitwise_and_((1 << UNIFORM_BITS) - 1)


def keep_from_key(count: int, k: torch.Tensor) -> torch.Tensor:
    """Float32 1/0 keep mask for `count` positions: hashed value < k[2] (see keep_limit)."""
    return torch.lt(hashed(count, k), k[2], out=torch.empty(count, dtype=torch.float32))


def _pieces(offset: int, count: int):
    """(start, length) pieces of [offset, offset + count) that stay within one SPAN each."""
    pos, end = offset, offset + count
    while pos < end:
        take = min(end, (pos // SPAN + 1) * SPAN) - pos
        yield pos, take
        pos += take


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32)


def seeded_uniform(seed: int, offset: int, count: int) -> torch.Tensor:
    """Uniform [0, 1) float32 values (multiples of 2^-24) for flat elements [offset, offset + count) of stream `seed`."""
    parts = [hashed(n, key(seed, start)).to(torch.float32).mul_(2.0**-UNIFORM_BITS) for start, n in _pieces(offset, count)]
    return _concat(parts)


def keep_mask(seed: int, offset: int, count: int, density: float) -> torch.Tensor:
    """Float32 1/0 mask, 1 where seeded_uniform(seed, offset, count) < density: DARE's Bernoulli(density) keep."""
    limit = keep_limit(density)
    return _concat([keep_from_key(n, key(seed, start, limit)) for start, n in _pieces(offset, count)])
