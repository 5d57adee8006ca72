"""Drive a merge method the way the executor does (statistics passes, then blocks with offsets), for method tests.

Every method test module uses these so a method is checked both as one whole tensor and cut into arbitrary blocks.
"""

from __future__ import annotations

import torch

from mergeedit.merging.methods import MergeInputs, MergeMethod
from mergeedit.merging.methods.spec import REQUIRED


def shared_params(method: MergeMethod, **overrides) -> dict:
    """Resolved shared parameters: the method's defaults, then overrides."""
    out = {p.name: p.default for p in method.params if p.scope == "shared"}
    out.update(overrides)
    return out


def per_input_params(n: int, base: int | None, **lists) -> list[dict]:
    """per_input dicts parallel to the tensors; non_base params (weight, density) absent for the base."""
    out = []
    for i in range(n):
        d = {}
        if i != base:
            for name, values in lists.items():
                d[name] = values[i]
        out.append(d)
    return out


def _complete(method: MergeMethod, base, per_input: list[dict]) -> list[dict]:
    """Every declared per-input parameter resolved, defaults included, as the planner hands them over."""
    out = []
    for i, given in enumerate(per_input):
        d = {p.name: p.default for p in method.params if p.scope == "input" or (p.scope == "non_base" and i != base)}
        d = {k: v for k, v in d.items() if k not in given and v is not REQUIRED}
        out.append({**given, **d})
    return out


def _probe(tensors, base, shared, per_input, numel, seed, shape=()) -> MergeInputs:
    """What the executor hands `statistics`: parameters and the compute dtype (the inputs' here), but no data."""
    dtype = tensors[0].dtype if tensors and tensors[0] is not None else None
    return MergeInputs("t", [None] * len(tensors), base, shared, per_input, 0, numel, seed, shape=tuple(shape), dtype=dtype)


def run_whole(method: MergeMethod, tensors, base, shared, per_input, seed: int = 0, name: str = "t", kernels=None) -> torch.Tensor:
    """Merge one whole tensor as a single flattened block (offset 0, numel = total); `kernels`: a fused.KernelCompiler
    the method may use, as the executor hands it one (None: eager)."""
    per_input = _complete(method, base, per_input)
    flat = [x.reshape(-1) for x in tensors]
    numel = flat[0].numel()
    stats = method.statistics(_probe(flat, base, shared, per_input, numel, seed, tensors[0].shape)) if method.statistics else None
    inputs = MergeInputs(name, flat, base, shared, per_input, 0, numel, seed, shape=tuple(tensors[0].shape), kernels=kernels)
    p = 0
    while stats and p < stats.passes:  # a statistic may add passes as it learns (the executor reads it after each)
        stats.observe(p, inputs)
        stats.end_pass(p)
        p += 1
    inputs.stats = stats.result() if stats else None
    return method.merge(inputs).reshape(tensors[0].shape)


def run_blocked(method: MergeMethod, tensors, base, shared, per_input, cuts, seed: int = 0, name: str = "t") -> torch.Tensor:
    """Merge one tensor cut at the flat positions `cuts` into blocks with their offsets, streaming every statistics
    pass over all blocks before the merge pass, as the executor does for chunked tensors."""
    per_input = _complete(method, base, per_input)
    flat = [x.reshape(-1) for x in tensors]
    numel = flat[0].numel()
    bounds = [0, *sorted(cuts), numel]
    blocks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def block_inputs(a, b):
        return MergeInputs(name, [x[a:b] for x in flat], base, shared, per_input, a, numel, seed, shape=tuple(tensors[0].shape))

    stats = method.statistics(_probe(flat, base, shared, per_input, numel, seed, tensors[0].shape)) if method.statistics else None
    p = 0
    while stats and p < stats.passes:
        for a, b in blocks:
            stats.observe(p, block_inputs(a, b))
        stats.end_pass(p)
        p += 1
    result = stats.result() if stats else None
    pieces = []
    for a, b in blocks:
        inp = block_inputs(a, b)
        inp.stats = result
        pieces.append(method.merge(inp).reshape(-1))
    return torch.cat(pieces).reshape(tensors[0].shape)


def observed_statistics(method: MergeMethod, tensors, shared, cuts, dtype):
    """(blocks, statistics) for 1-D tensors (the base first) cut at the flat positions `cuts`, every statistics pass
    streamed over the blocks (the pass count is re-read after each pass: a method may add one); for tests that inspect
    the statistics object itself."""
    n = tensors[0].numel()
    per_input = [{} for _ in tensors]
    bounds = [0, *cuts, n]
    blocks = [MergeInputs("t", [x[s:e] for x in tensors], 0, shared, per_input, s, n, shape=(n,), dtype=dtype) for s, e in zip(bounds[:-1], bounds[1:])]
    stats = method.statistics(MergeInputs("t", [None] * len(tensors), 0, shared, per_input, 0, n, shape=(n,), dtype=dtype))
    p = 0
    while p < stats.passes:
        for block in blocks:
            stats.observe(p, block)
        stats.end_pass(p)
        p += 1
    return blocks, stats


def T(*values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def rand_models(n_models: int, numel: int, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g, dtype=torch.float64)
    out = [base.to(dtype)]
    for _ in range(n_models):
        out.append((base + torch.randn(numel, generator=g, dtype=torch.float64) * 0.5).to(dtype))
    return out


def tie_free_models(n_models: int, numel: int, seed: int) -> list[torch.Tensor]:
    """base on a 2^-8 grid, deltas = random signs times a permutation of distinct multiples of 2^-10: every x - base is
    exact in float32 and no two magnitudes of one delta are equal; with dyadic weights all sums are exact too."""
    g = torch.Generator().manual_seed(seed)
    base = torch.round(torch.randn(numel, generator=g) * 256) / 256
    out = [base]
    for _ in range(n_models):
        mags = (torch.randperm(numel, generator=g) + 1).float() / 1024
        signs = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
        out.append(base + signs * mags)
    return out
