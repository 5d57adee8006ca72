"""Reproducible uniform noise addressed by element position, so chunking never changes a random mask.

The flattened tensor is cut into fixed blocks; block b draws from a generator seeded by (seed, b). Any row range can
regenerate exactly its elements, and a tensor merged whole or in chunks under any memory budget gets the same mask.
"""

from __future__ import annotations

import hashlib

import torch

BLOCK = 1 << 18  # the executor's block size (executor.DEFAULT_BLOCK): each executor block draws exactly one noise block


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (the run seed, a tensor name, a model index)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_uniform(seed: int, offset: int, count: int) -> torch.Tensor:
    """Uniform [0, 1) float32 values for flat elements [offset, offset + count) of the stream named by `seed`."""
    gen = torch.Generator()
    if offset % BLOCK == 0 and count <= BLOCK:  # the executor's usual request: one whole or leading part of a block
        gen.manual_seed(derive_seed(seed, offset // BLOCK))
        return torch.rand(count, generator=gen)
    out = torch.empty(count, dtype=torch.float32)
    pos = offset
    end = offset + count
    while pos < end:
        block = pos // BLOCK
        block_start = block * BLOCK
        take_from = pos - block_start
        take = min(BLOCK - take_from, end - pos)
        gen.manual_seed(derive_seed(seed, block))
        values = torch.rand(take_from + take, generator=gen)
        out[pos - offset : pos - offset + take] = values[take_from:]
        pos += take
    return out
