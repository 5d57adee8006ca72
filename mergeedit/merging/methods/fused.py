"""Fused kernels (torch.compile) for the task-arithmetic family: the elementwise merge formula and DARE's L1 norms.

Eager, a TIES block costs ~25 torch ops, each a pass through memory (1.7 ms per 2^18-element block with two models
here); compiled into one loop, 0.3 ms. The formula below repeats the eager code's operations in the same order, with
scalars rounded to float32 as eager's kernels round them, so the bytes are identical (tests compare every bit): the
kernel changes speed, never results. Compiling costs seconds (about 6 s cold, 3 s from inductor's disk cache), so it
is requested only for big merges (`request`) and compiled on a background thread while the eager code runs; a merge
switches to the kernel once `ready`. Any failure to compile (no C++ compiler, an unsupported torch) leaves the eager
code in place and is kept in `failure`. Each merge's executor owns a `KernelCompiler` and hands it to the methods with
every block (MergeInputs.kernels); --kernels eager is an executor without one.

DARE's mask is computed inside both kernels from a three-number key (seeded_random), never read from memory. The
norms kernel's float64 sums add in another order than eager's: the two agree to ~1e-16 relative, and the rescale
factor is rounded to float32 before use, so they give the same bytes unless the exact ratio lies within that distance
of a float32 rounding boundary (odds of order 1e-9 per tensor).
"""

from __future__ import annotations

import queue
import threading
import types
from typing import NamedTuple, Optional

import torch

from ...core.compiler import inductor_options
from .seeded_random import derive_seed, keep_from_key, keep_limit, key

MIN_BLOCK = 16  # smaller blocks stay eager (sizes 0 and 1 would make the compiled code specialise and recompile)


def _alias(x: torch.Tensor) -> torch.Tensor:
    """The same elements as a tensor of its own rather than a view: torch.compile guards a view's base too (its
    offset, its identity), and the executor's blocks are views of views of pooled buffers."""
    return torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), x.storage_offset(), x.size(), x.stride())


def fits(tensors: list[torch.Tensor]) -> bool:
    """Whether the compiled code takes these inputs as they are. torch.compile specialises a storage offset of 0 or 1
    (and a size of 0 or 1) and would recompile, seconds on the merge's thread, for blocks that start a buffer: those
    few blocks (one per chunk) stay eager."""
    return all(t.dtype == torch.float32 and t.dim() == 1 and t.numel() >= MIN_BLOCK and t.storage_offset() >= 2 and t.stride(0) == 1 for t in tensors)


class Variant(NamedTuple):
    """What changes the compiled merge formula: the number of non-base inputs and the formula's static choices."""

    inputs: int
    sparsify: Optional[str]  # "magnitude" (trim below a threshold), "mask" (DARE's keep mask, from a key) or None
    consensus: bool
    normalize: bool

    def kernel(self):
        return formula

    def probe(self, n: int) -> tuple:
        """Arguments after (base, xs) for the warm-up run on n elements, which also checks the compiled code's bits
        against the eager formula's (see `_warm`): DARE keys at density 1/2, a magnitude threshold that trims some
        entries, rescale factors, weights of both signs (one 1.0), a lambda and a divisor that round in float32."""
        masks = [key(derive_seed("warm-up", j), 0, keep_limit(0.5)) for j in range(self.inputs)] if self.sparsify == "mask" else []
        below = [0.004 * (j + 1) if self.sparsify == "magnitude" else -1.0 for j in range(self.inputs)]
        weight = [[1.0, -0.4, 0.7][j % 3] for j in range(self.inputs)]
        return masks, below, [as_float32(1.7 + j) for j in range(self.inputs)], [as_float32(w) for w in weight], as_float32(1.3), as_float32(0.9)


class Norms(NamedTuple):
    """DARE's rescale statistics for `inputs` non-base inputs: L1 norms of the delta before and after the mask."""

    inputs: int

    def kernel(self):
        return norms

    def probe(self, n: int) -> tuple:
        return ([key(derive_seed("warm-up", j), 0, keep_limit(0.5)) for j in range(self.inputs)],)


def formula(base, xs: list, masks: list, below: list, scale: list, weight: list, lam: float, divisor: float, v: Variant):
    """base + lam * (the TIES / DARE / task-arithmetic mix of xs - base), exactly as task_arithmetic.py computes it."""
    deltas = []
    for j in range(v.inputs):
        d = xs[j] - base
        if v.sparsify == "magnitude":
            d = torch.where(d.abs() <= below[j], 0.0, d)  # hardshrink(d, below[j]), NaN kept as hardshrink keeps it
        elif v.sparsify == "mask":
            d = d * keep_from_key(d.shape[0], masks[j])
        deltas.append(d * scale[j] * weight[j])  # multiplying by 1.0 is exact: no need to skip it as eager does
    if v.consensus:
        total = deltas[0] + deltas[1] if v.inputs > 1 else deltas[0]
        for d in deltas[2:]:
            total = total + d
        elected = torch.ones_like(total).copysign(total)
        aligned = [d * elected for d in deltas]
        mixed = torch.relu(aligned[0])
        for a in aligned[1:]:
            mixed = mixed + torch.relu(a)
        mixed = mixed * elected
        if v.normalize:
            count = None
            for a, w in zip(aligned, weight):
                agree = (a > 0).to(a.dtype) * w
                count = agree if count is None else count + agree
            mixed = mixed / (count + (count == 0).to(count.dtype))
    else:
        mixed = deltas[0]
        for d in deltas[1:]:
            mixed = mixed + d
        if v.normalize:
            mixed = mixed / divisor
    return base + mixed * lam


def norms(base, xs: list, keys: list, v: Norms):
    """(inputs, 2) float64: per input, sum |x - base| and the same sum over DARE's kept entries, as
    DeltaStatistics sums them eagerly (the mask from `keys`, see seeded_random.key)."""
    rows = []
    for x, k in zip(xs, keys):
        a = (x - base).abs()
        rows.append(torch.stack([a.sum(dtype=torch.float64), (a * keep_from_key(a.shape[0], k)).sum(dtype=torch.float64)]))
    return torch.stack(rows)


def as_float32(x: float) -> float:
    """x rounded to float32, as eager kernels round a Python scalar before multiplying a float32 tensor."""
    return torch.tensor(x, dtype=torch.float32).item()


# Compiled code is the process's, as torch.compile's own caches are: a variant compiled (and run once, for a thread
# count) by one merge's compiler is ready at once for the next merge's. Everything else is the owning merge's.
_CODE: dict = {}  # variant -> its compiled function
_WARM: set = set()  # (variant, torch's thread count) whose compiled code has run: guards in place for those threads
_CODE_LOCK = threading.Lock()  # one compile at a time in the process


class KernelCompiler:
    """One merge's compiled kernels: the variants it requested, compiled one at a time on a daemon thread, the blocks
    they computed, and why compiling or running one failed. Owned by the executor, which hands it to the methods in
    each block's MergeInputs (`kernels`); a block without one is computed eagerly."""

    def __init__(self) -> None:
        # (variant, torch's thread count): compiled code is guarded on the thread count, which a merge sets
        self._ready: set[tuple[Variant | Norms, int]] = set()
        self._requested: set[tuple[Variant | Norms, int]] = set()
        self._queue: queue.Queue[Optional[tuple[Variant | Norms, int]]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.failure: Optional[str] = None
        self.blocks = 0  # blocks computed by a compiled kernel, for the merge's summary

    def request(self, v: "Variant | Norms") -> None:
        """Compile `v` for torch's present thread count (a merge sets it before asking)."""
        with self._lock:
            key = (v, torch.get_num_threads())
            if key in self._requested or self.failure:
                return
            self._requested.add(key)
            if key in _WARM:  # compiled by an earlier merge of this process
                self._ready.add(key)
                return
            self._queue.put(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="mergeedit-compile", daemon=True)
                self._thread.start()

    def ready(self, v: "Variant | Norms") -> bool:
        return (v, torch.get_num_threads()) in self._ready

    def serves(self, v, tensors: list[torch.Tensor]) -> bool:
        """Whether `v`'s kernel is ready and takes these blocks as they are (see `fits`; no autograd)."""
        return fits(tensors) and not any(t.requires_grad for t in tensors) and self.ready(v)

    def wait(self) -> bool:
        """Block until every requested variant is compiled or compiling failed (tests, benchmarks). True if all ready."""
        self._queue.join()
        return not self.failure and {v for v, _ in self._requested} <= {v for v, _ in self._ready}

    def close(self) -> None:
        """The merge is over: its compile thread ends after the variant it is compiling, if any."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread = None

    def run(self, v: "Variant | Norms", base: torch.Tensor, xs: list[torch.Tensor], *args) -> Optional[torch.Tensor]:
        """The kernel's result, or None (the caller computes eagerly) if it failed: it is then not used again."""
        try:
            with torch.no_grad():
                out = _CODE[v](_alias(base), [_alias(x) for x in xs], *args, v)
            self.blocks += 1
            return out
        except Exception as exc:  # noqa: BLE001 - e.g. a recompile beyond dynamo's limit: stay eager
            key = (v, torch.get_num_threads())
            self._ready.discard(key)
            _WARM.discard(key)
            self.failure = _describe(exc)
            return None

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            try:
                if key is None:
                    return
                v, threads = key
                if self.failure is None:
                    if torch.get_num_threads() != threads:  # a thread's own setting (OpenMP), like the merge thread's
                        torch.set_num_threads(threads)
                    with _CODE_LOCK:
                        if v not in _CODE:
                            _CODE[v] = _compile(_own_code(v.kernel(), len(_CODE)))
                        if key not in _WARM:
                            _warm(v)
                            _WARM.add(key)
                    self._ready.add(key)
            except Exception as exc:  # noqa: BLE001 - any failure means: stay eager
                self.failure = _describe(exc)
            finally:
                self._queue.task_done()


def _compile(fn):
    """torch.compile with the vector width named in inductor's config (core.compiler.inductor_options: the FX graph
    cache would otherwise serve one ISA's code to another)."""
    return torch.compile(fn, dynamic=True, fullgraph=True, options=inductor_options())


class KernelMismatch(RuntimeError):
    """The compiled kernel's result differs from the eager formula's on the warm-up's planted inputs."""


def _planted(n: int, count: int) -> torch.Tensor:
    """`count` rows of n float32 values: base, then inputs near it, with the cases a merge formula must keep exact:
    signs of zero, exact zero deltas, deltas that cancel exactly, deltas at the trim thresholds of Variant.probe."""
    g = torch.Generator().manual_seed(14)
    rows = torch.randn(count, n, generator=g)
    base = rows[0]
    base[::11] = -0.0
    for j in range(1, count):
        rows[j] = base + rows[j] * 0.01
        rows[j][j::13] = base[j::13] + 0.004 * j  # exactly at (or around, after rounding) input j's threshold
    rows[1][::7] = base[::7]
    if count > 2:
        rows[2][::5] = 2 * base[::5] - rows[1][::5]
    return rows


def _warm(v) -> None:
    """Compile by running the variant once on small tensors laid out as the blocks it will serve are (inputs: views at
    an offset into a buffer, see `fits`), so they hit it without a guard failing; then check its result against the
    same formula run eagerly on those planted inputs. A merge uses the kernel only if the bits agree (the float64 L1
    norms, summed in another order, to 1e-12 relative): a kernel that gives other numbers on this machine (another
    ISA's code, a compiler that contracts a multiply-add) raises, and the merge stays eager."""
    n = 1024
    pool = torch.zeros(n * (v.inputs + 2))
    view = lambda i: pool[n * i + 8 : n * (i + 1) + 8]  # noqa: E731
    base, *xs = [view(i) for i in range(v.inputs + 1)]  # run() makes them aliases, as it does the real blocks
    rows = _planted(n, v.inputs + 1)
    for i, t in enumerate([base, *xs]):
        t.copy_(rows[i])
    args = v.probe(n)
    with torch.no_grad():  # not run(): a failure here must reach _work
        fast = _CODE[v](_alias(base), [_alias(x) for x in xs], *args, v)
        eager = v.kernel()(base, xs, *args, v)
    if isinstance(v, Norms):
        same = torch.allclose(fast, eager, rtol=1e-12, atol=0)
        differ = int((fast != eager).sum())
    else:
        differ = int((fast.view(torch.int32) != eager.view(torch.int32)).sum())
        same = differ == 0
    if not same:
        raise KernelMismatch(f"the compiled {type(v).__name__} kernel gave other bits than the eager code on {differ} of {eager.numel()} planted values")


def _describe(exc: Exception) -> str:
    """One line for the merge's summary: the exception's type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _own_code(fn, n: int):
    """A copy of `fn` with a code object of its own: torch.compile caches (and caps, at 8) compiled versions per code
    object, so each variant gets its own cache instead of crowding one."""
    return types.FunctionType(fn.__code__.replace(co_name=f"{fn.__name__}_{n}"), fn.__globals__, f"{fn.__name__}_{n}")
