"""`mergeedit extract-lora`: the difference between a model and its base, written as a PEFT LoRA adapter.

Every tensor that changed is a 2-D weight W (out, in); its delta D = MODEL - BASE, in float64, is decomposed by a
truncated SVD, D ~ U_r S_r Vh_r, the best rank-r approximation in Frobenius norm (Eckart-Young): the error is
sqrt(sum of the dropped squared singular values). The adapter stores lora_A = sqrt(S_r) Vh_r (r, in) and
lora_B = U_r sqrt(S_r) (out, r) with lora_alpha = r, so PEFT's scale alpha / r is 1 and B @ A is the approximation.

A tensor's SVD needs all of it, so tensors are the unit of work: as many are read and decomposed side by side as the
memory budget (each charged what its SVD holds) and the thread count allow, each on a worker pinned to one thread,
and the results are taken in tensor order. The factors are spilled to disk as they come, so memory does not grow
with the adapter. The bytes depend on nothing but the two checkpoints and the options: each SVD is of the whole
tensor, in float64, on one thread (MKL's multithreaded SVD returns different low bits for different thread counts),
every singular pair gets a fixed sign (the largest entry of u positive, the first one on ties), and the factors are
rounded once to the output dtype. GPT-2's Conv1D weights, stored (in, out), are decomposed transposed and the adapter
says fan_in_fan_out, as peft expects.

What is refused, with one line each: a base whose tensor names or shapes differ, a changed tensor that is not a 2-D
weight (norms, biases: PEFT would keep them whole in modules_to_save, which neither mergeedit's `path+lora` nor a
LoRA product can express), a changed token embedding or output head (left out on purpose: extracting them as LoRA
changes every token's row; leave them out with --skip), a rank larger than a changed tensor allows, and a model with
no changed tensor at all.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..core.errors import MergeEditError
from ..core.memory import default_budget, peak_rss, total_ram
from ..core.units import format_size
from ..io.architecture import is_pre_weight
from ..io.dtypes import parse_user_dtype
from ..io.integrity import OutputLock, check_free_space, write_errors_named, write_manifest
from ..io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..io.model_source import ModelSource, open_model
from ..io.output_dir import AtomicOutputDir, check_output_location, write_json
from ..io.safetensors_header import TensorInfo
from ..io.shard_writer import OutputEntry, Shard, ShardWriter
from ..io.tensor_reader import TensorReader

REPORT_FILE = "extract_lora.json"
_SPILL = ".factors.spill"
_HEAD_NAMES = ("lm_head", "embed_out", "output.weight")
# Architectures whose projections are transformers' Conv1D, stored (in, out): decomposed transposed, fan_in_fan_out.
CONV1D_MODEL_TYPES = frozenset({"gpt2"})


@dataclass
class ExtractOptions:
    """How ranks are chosen and where the bytes go. A module's rank: the first --rank-for rule whose regex matches its
    name (re.search), else --rank; with sv_energy, the smallest rank keeping that share of the delta's squared singular
    values, capped by the former when given."""

    rank: Optional[int] = None
    rank_for: list[tuple[str, int]] = field(default_factory=list)
    sv_energy: Optional[float] = None
    skip: list[str] = field(default_factory=list)  # regexes (re.search) of tensors left out of the adapter
    dtype: str = "float32"
    memory_budget: Optional[int] = None  # None: the default, raised to what the largest tensor needs if RAM allows
    overwrite: bool = False

    def check(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise MergeEditError(f"--rank {self.rank}: a rank must be at least 1")
        if self.sv_energy is not None and not 0 < self.sv_energy <= 1:
            raise MergeEditError(f"--sv-energy {self.sv_energy}: give a share of the squared singular values in (0, 1], e.g. 0.99")
        if self.rank is None and self.sv_energy is None:
            raise MergeEditError("extract-lora: give --rank R (the adapter's rank) or --sv-energy E (the smallest rank keeping share E of each delta's energy)")
        for pattern, r in self.rank_for:
            if r < 1:
                raise MergeEditError(f"--rank-for '{pattern}={r}': a rank must be at least 1; leave tensors out with --skip REGEX")
        parse_user_dtype(self.dtype, "--dtype")

    def cap_for(self, module: str) -> Optional[int]:
        for pattern, r in self.rank_for:
            if re.search(pattern, module):
                return r
        return self.rank


def parse_rank_rules(texts: list[str], what: str = "--rank-for") -> list[tuple[str, int]]:
    """`REGEX=R` strings (the last '=' splits) -> (regex, rank), each regex compiled once to name a bad one."""
    rules = []
    for text in texts:
        pattern, sep, value = str(text).rpartition("=")
        if not sep or not pattern or not value.strip().isdigit():
            raise MergeEditError(f"{what} '{text}': expected REGEX=RANK, e.g. 'down_proj=16'")
        check_regex(pattern, what)
        rules.append((pattern, int(value)))
    return rules


def check_regex(pattern: str, what: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise MergeEditError(f"{what} '{pattern}': not a valid regular expression ({exc})") from None
    return pattern


# -- the decomposition --------------------------------------------------------------------------------------------
_ONE_THREAD = threading.Lock()
_PINNED = threading.local()  # set on the SVD pool's threads, which run on one thread each


@contextmanager
def one_thread() -> Iterator[None]:
    """torch (and MKL) on one thread for the block: the SVD's bits then do not depend on the thread count."""
    if getattr(_PINNED, "value", False):
        yield
        return
    with _ONE_THREAD:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def _pin_this_thread() -> None:
    torch.set_num_threads(1)  # in a fresh thread this sets its own OpenMP thread count (and MKL's) to one
    _PINNED.value = True


@contextmanager
def _svd_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """`workers` threads, each pinned to one thread, for SVDs that run side by side with the same bits as one alone
    (checked: MKL in an unpinned worker thread gives other bits). The caller's thread count is restored after."""
    before = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max(1, workers), initializer=_pin_this_thread, thread_name_prefix="svd") as pool:
            yield pool
    finally:
        torch.set_num_threads(before)


@dataclass
class Factors:
    a: torch.Tensor  # (r, in), float64
    b: torch.Tensor  # (out, r), float64
    singular_values: torch.Tensor  # all of them, float64, descending

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def dropped_error(self) -> float:
        """||D - B A||_F of the exact factors: sqrt of the sum of the dropped squared singular values."""
        return math.sqrt(float((self.singular_values[self.rank :] ** 2).sum()))


def energy_rank(singular_values: torch.Tensor, share: float) -> int:
    """The smallest k whose first k squared singular values hold at least `share` of their sum (at least 1)."""
    energy = singular_values.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(energy, 0)
    return max(1, min(int((kept < share * total).sum()) + 1, energy.numel()))


def decompose(delta: torch.Tensor, rank: Optional[int], sv_energy: Optional[float] = None) -> Factors:
    """Truncated SVD of a 2-D delta in float64: rank `rank` (None: full), or with `sv_energy` the energy rank capped by
    `rank`. Signs fixed so the largest-magnitude entry of each left singular vector is positive (first on ties)."""
    d = delta.to(torch.float64)
    with one_thread():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = s.numel()
    r = k if rank is None else min(rank, k)
    if sv_energy is not None:
        r = min(r, energy_rank(s, sv_energy))
    u, vh = u[:, :r], vh[:r]
    pivot = u.abs().argmax(dim=0)
    sign = torch.where(u[pivot, torch.arange(r)] < 0, -1.0, 1.0).to(torch.float64)
    root = s[:r].sqrt() * sign  # the sign goes into both factors: B A is unchanged, and the factors become unique
    a = vh * root[:, None]
    b = u * root[None, :]
    return Factors(a.contiguous(), b.contiguous(), s)


def svd_bytes(info_out: int, info_in: int, input_bytes: int) -> int:
    """Memory one tensor's decomposition holds at once: both inputs as stored, the float64 delta and LAPACK's copy of
    it, U, S, Vh, and the divide-and-conquer workspace (about 5 k^2 doubles: a 4096x1536 SVD grew the RSS by 260 MB, this
    says 265 MB)."""
    m, n = info_out, info_in
    k = min(m, n)
    return input_bytes + 8 * (2 * m * n + m * k + k * n + 5 * k * k + 8 * max(m, n))


# -- the extraction -----------------------------------------------------------------------------------------------
@dataclass
class ModuleReport:
    module: str
    shape: tuple[int, int]
    rank: int
    delta_norm: float  # ||D||_F
    error: float  # ||D - B A||_F of the exact (float64) factors
    energy_kept: float  # share of the squared singular values the rank keeps

    @property
    def relative_error(self) -> float:
        return self.error / self.delta_norm if self.delta_norm else 0.0


@dataclass
class ExtractReport:
    out_dir: Path
    modules: list[ModuleReport]
    unchanged: int
    skipped_changed: list[str]
    adapter_bytes: int
    seconds: float
    budget: int
    peak_rss: int
    dtype: str

    @property
    def relative_error(self) -> float:
        """||D - BA||_F / ||D||_F over every exported tensor together."""
        total = sum(m.delta_norm**2 for m in self.modules)
        return math.sqrt(sum(m.error**2 for m in self.modules) / total) if total else 0.0

    def to_dict(self) -> dict:
        return {
            "modules": {m.module: {"shape": list(m.shape), "rank": m.rank, "delta_norm": m.delta_norm, "error": m.error,
                                   "relative_error": m.relative_error, "energy_kept": m.energy_kept} for m in self.modules},
            "unchanged_tensors": self.unchanged,
            "skipped_changed_tensors": self.skipped_changed,
            "relative_error": self.relative_error,
            "dtype": self.dtype,
        }


def _module_name(tensor: str) -> str:
    return tensor.removesuffix(".weight")


def _is_embedding_or_head(name: str, info: TensorInfo, vocab: Optional[int]) -> bool:
    if any(h in name for h in _HEAD_NAMES) or is_pre_weight(name):
        return True
    return vocab is not None and len(info.shape) == 2 and vocab in info.shape and ".layers." not in name


def _check_pair(model: ModelSource, base: ModelSource) -> None:
    only_model = [n for n in model.tensors if n not in base.tensors]
    if only_model:
        raise MergeEditError(f"{model.ref}: tensor '{only_model[0]}' is not in the base {base.ref}; --base must be the model MODEL was fine-tuned from")
    only_base = [n for n in base.tensors if n not in model.tensors]
    if only_base:
        raise MergeEditError(f"{base.ref}: tensor '{only_base[0]}' is not in {model.ref}; --base must be the model MODEL was fine-tuned from")
    for name, info in model.tensors.items():
        if tuple(info.shape) != tuple(base.tensors[name].shape):
            raise MergeEditError(
                f"{model.ref}: tensor '{name}' is {list(info.shape)} but the base {base.ref} has {list(base.tensors[name].shape)}; "
                "--base must be the model MODEL was fine-tuned from"
            )


class _Reader:
    """Tensors as float64 (an adapter on either side folded in), and whether two tensors differ at all."""

    def __init__(self, reader: TensorReader) -> None:
        self.reader = reader

    def read64(self, src: ModelSource, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        t = self.reader.read(src.tensors[name], rows).to(torch.float64)
        if name in src.lora:
            t += src.lora[name].delta_rows(self.reader.read, rows)
        return t

    def differ(self, model: ModelSource, base: ModelSource, name: str, budget: int) -> bool:
        a, b = model.tensors[name], base.tensors[name]
        shape = a.shape or (1,)
        rows = shape[0] if a.shape else 1
        per_row = max(1, a.numel // max(rows, 1)) * 8 * 2
        step = max(1, min(rows, budget // 4 // per_row))
        raw = a.dtype == b.dtype and name not in model.lora and name not in base.lora
        for lo in range(0, rows, step):
            span = (lo, min(lo + step, rows)) if a.shape else None
            if raw:
                x, y = self.reader.read(a, span), self.reader.read(b, span)
                if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                    return True
            elif not torch.equal(self.read64(model, name, span), self.read64(base, name, span)):
                return True
        return False


def _matrix_job(reader: _Reader, model: ModelSource, base: ModelSource, options: ExtractOptions, skip: list[str], budget: int, transposed: bool, n: str):
    """One matrix, on a pool thread: ("skipped" | "unchanged", None, None) or ("module", factors, report). With
    `transposed` the stored weight is (in, out) (Conv1D) and its transpose, the layer's (out, in), is decomposed."""
    if any(re.search(p, n) for p in skip):
        return ("skipped" if reader.differ(model, base, n, budget) else "unchanged"), None, None
    out, inn = reversed(model.tensors[n].shape) if transposed else model.tensors[n].shape
    module = _module_name(n)
    cap = options.cap_for(module)
    delta = reader.read64(model, n)
    delta -= reader.read64(base, n)
    if transposed:
        delta = delta.t()
    if not bool(torch.isfinite(delta).all()):
        if not reader.differ(model, base, n, budget):
            return "unchanged", None, None
        raise MergeEditError(f"{model.ref}: tensor '{n}' minus the base holds NaN or infinite values; check both checkpoints")
    if not bool(delta.ne(0).any()):
        return "unchanged", None, None
    if cap is not None and cap > min(out, inn):
        which = "--rank-for" if cap != options.rank else "--rank"
        raise MergeEditError(
            f"{model.ref}: tensor '{n}' is {out}x{inn}, so its rank is at most {min(out, inn)}, but {which} asks for {cap}; "
            f"lower it, or set this tensor's rank with --rank-for '{re.escape(module)}={min(out, inn)}'"
        )
    f = decompose(delta, cap, options.sv_energy)
    del delta
    norm = float(torch.linalg.vector_norm(f.singular_values))
    kept = float((f.singular_values[: f.rank] ** 2).sum()) / (norm**2) if norm else 1.0
    return "module", f, ModuleReport(module, (out, inn), f.rank, norm, f.dropped_error, kept)


def open_pair(model_ref: str, base_ref: str) -> tuple[ModelSource, ModelSource]:
    model, base = open_model(model_ref), open_model(base_ref)
    _check_pair(model, base)
    return model, base


def extract_lora(
    model_ref: str, base_ref: str, out_dir: Path, options: ExtractOptions, progress: Optional[Callable[[str, int, int], None]] = None,
    base_name: Optional[str] = None,
) -> ExtractReport:
    """Write the PEFT adapter of MODEL - BASE to `out_dir` (atomically); see the module docstring. `base_name` is what
    the adapter config records as its base (default: `base_ref`), e.g. a hub id or built-in name rather than a cache path."""
    started = time.perf_counter()
    options.check()
    out_dtype = parse_user_dtype(options.dtype, "--dtype")
    skip = [check_regex(p, "--skip") for p in options.skip]
    model, base = open_pair(model_ref, base_ref)
    vocab = (model.config or {}).get("vocab_size") or (base.config or {}).get("vocab_size")
    transposed = (model.config or base.config or {}).get("model_type") in CONV1D_MODEL_TYPES
    names = list(model.tensors)
    matrices = [n for n in names if len(model.tensors[n].shape) == 2 and n.endswith(".weight") and not _is_embedding_or_head(n, model.tensors[n], vocab)]
    kept = set(matrices)
    others = [n for n in names if n not in kept]
    needs = {n: svd_bytes(*model.tensors[n].shape, model.tensors[n].nbytes + base.tensors[n].nbytes) for n in matrices}
    budget = _budget(options, needs)
    check_output_location(out_dir, [model.folder, base.folder], options.overwrite)
    check_free_space(out_dir, 0)
    with write_errors_named(out_dir, "adapter"), OutputLock(out_dir), AtomicOutputDir(out_dir) as tmp, TensorReader(direct=False) as raw:
        reader = _Reader(raw)
        spill_path = tmp / _SPILL
        with open(spill_path, "wb") as spill:
            # Tensors that cannot become LoRA first: one that changed ends the run before any SVD is spent.
            unchanged, skipped = _check_undecomposable(reader, model, base, others, skip, vocab, budget)
            svd = _decompose(reader, model, base, matrices, needs, budget, options, skip, transposed, out_dtype, spill, progress)
        unchanged += svd.unchanged
        skipped += svd.skipped
        modules, entries = svd.modules, svd.entries
        if not modules:
            why = f"all {len(skipped)} changed tensors match --skip" if skipped else "every tensor is identical to the base's"
            raise MergeEditError(f"{model.ref}: no changed weight matrix to export ({why}); check MODEL and --base")
        _write_adapter_file(tmp, spill_path, entries)
        spill_path.unlink()
        write_json(tmp / ADAPTER_CONFIG, adapter_config(modules, base_name or base_ref, fan_in_fan_out=transposed))
        report = ExtractReport(out_dir, modules, unchanged, skipped, (tmp / ADAPTER_WEIGHTS).stat().st_size, 0.0, budget, 0, options.dtype)
        write_json(tmp / REPORT_FILE, {**report.to_dict(), "model": model_ref, "base": base_ref, "options": _options_record(options)})
        (tmp / "README.md").write_text(adapter_card(report, model_ref, base_ref))
        write_manifest(tmp, {})
    report.seconds = time.perf_counter() - started
    report.peak_rss = peak_rss()
    return report


def _budget(options: ExtractOptions, needs: dict[str, int]) -> int:
    """--memory-budget, else the default, raised to the largest tensor's SVD need when that fits in half the RAM."""
    budget = options.memory_budget
    if budget is None:
        budget = default_budget()
        largest = max(needs.values(), default=0)
        if budget < largest <= total_ram() // 2:
            budget = largest
    return budget


def _check_undecomposable(reader, model, base, others: list[str], skip: list[str], vocab, budget: int) -> tuple[int, list[str]]:
    """(unchanged count, skipped names) of the tensors that cannot become LoRA (norms, biases, embeddings); any other
    change among them is refused, so the run ends before any SVD is spent."""
    unchanged = 0
    skipped: list[str] = []
    refused = []
    for n in others:
        if not reader.differ(model, base, n, budget):
            unchanged += 1
        elif any(re.search(p, n) for p in skip):
            skipped.append(n)
        else:
            refused.append(n)
    if refused and len(refused) == len(others) > 2:
        raise MergeEditError(
            f"{model.ref}: every one of its {len(others)} norms, biases and embeddings differs from {base.ref}'s "
            f"(e.g. '{refused[0]}'); BASE does not look like the model MODEL was made from; check --base"
        )
    for n in refused[:1]:
        shape = list(model.tensors[n].shape)
        if len(shape) == 2 and _is_embedding_or_head(n, model.tensors[n], vocab):
            raise MergeEditError(
                f"{model.ref}: tensor '{n}' {shape} (a token embedding or output head) changed; extract-lora does not export "
                f"embedding deltas (every token's row would be approximated); leave it out with --skip '{re.escape(_module_name(n))}' or ship a full checkpoint"
            )
        raise MergeEditError(
            f"{model.ref}: tensor '{n}' {shape} changed, but a LoRA adapter holds only 2-D weight matrices (norms and biases "
            f"would need PEFT's modules_to_save, which extract-lora does not write); leave it out with --skip '{re.escape(n)}' or ship a full checkpoint"
        )
    return unchanged, skipped


@dataclass
class _Decomposed:
    modules: list  # ModuleReport per exported matrix, in tensor order
    entries: list  # (OutputEntry, offset in the spill file) per factor
    unchanged: int = 0
    skipped: list = field(default_factory=list)


def _decompose(reader, model, base, matrices: list[str], needs: dict[str, int], budget: int, options: ExtractOptions, skip: list[str],
               transposed: bool, out_dtype, spill, progress) -> _Decomposed:
    """Every matrix's SVD, each on a pool thread pinned to one thread; as many at once as the budget and the thread
    count allow; results taken in tensor order and their factors appended to `spill`, so the file's bytes depend on
    neither."""
    result = _Decomposed([], [])
    workers = torch.get_num_threads()
    pending: deque = deque()
    charged = done = 0

    def take_oldest() -> None:
        nonlocal charged, done
        n, future, charge = pending.popleft()
        charged -= charge
        kind, f, rec = future.result()
        done += 1
        if progress is not None:
            progress(n, done, len(matrices))
        if kind == "unchanged":
            result.unchanged += 1
        elif kind == "skipped":
            result.skipped.append(n)
        else:
            result.modules.append(rec)
            for part, t in (("lora_A", f.a), ("lora_B", f.b)):
                data = t.to(out_dtype).contiguous()
                result.entries.append((OutputEntry(f"base_model.model.{rec.module}.{part}.weight", out_dtype, tuple(data.shape)), spill.tell()))
                spill.write(memoryview(data.view(-1).view(torch.uint8).numpy()))

    job = functools.partial(_matrix_job, reader, model, base, options, skip, budget, transposed)
    with _svd_pool(workers) as pool:
        try:
            for n in matrices:
                charge = 0 if any(re.search(p, n) for p in skip) else needs[n]
                if charge > budget:
                    out, inn = model.tensors[n].shape
                    raise MergeEditError(
                        f"{model.ref}: tensor '{n}' {[out, inn]} needs about {format_size(charge)} for its SVD (computed on the whole tensor) "
                        f"but the memory budget is {format_size(budget)}; raise --memory-budget to at least {format_size(charge)}"
                    )
                while pending and (len(pending) >= workers or charged + charge > budget):
                    take_oldest()
                pending.append((n, pool.submit(job, n), charge))
                charged += charge
            while pending:
                take_oldest()
        finally:
            for _, future, _ in pending:
                future.cancel()
    return result


def _options_record(options: ExtractOptions) -> dict:
    return {"rank": options.rank, "rank_for": [f"{p}={r}" for p, r in options.rank_for], "sv_energy": options.sv_energy, "skip": options.skip, "dtype": options.dtype}


def _write_adapter_file(tmp: Path, spill_path: Path, entries: list[tuple[OutputEntry, int]]) -> None:
    """adapter_model.safetensors: the spilled factors in name order, streamed through the shard writer."""
    ordered = sorted(entries, key=lambda e: e[0].name)
    writer = ShardWriter(tmp, [Shard(ADAPTER_WEIGHTS, [e for e, _ in ordered])], direct=False)
    fd = os.open(spill_path, os.O_RDONLY)
    try:
        for entry, offset in ordered:
            buf = torch.empty(entry.nbytes, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            done = 0
            while done < entry.nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise OSError(f"{spill_path}: short read")
                done += got
            writer.write(entry.name, buf.view(entry.dtype).reshape(entry.shape))
        writer.finish()
    finally:
        writer.abort()
        os.close(fd)


def pattern_key(module: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT (`(.*\\.)?(KEY)$`) matches to this module and no other."""
    return "^" + re.escape(module)


def adapter_config(modules: list[ModuleReport], base_ref: str, fan_in_fan_out: bool = False) -> dict:
    """PEFT LoraConfig fields: r and lora_alpha equal (scale 1), per-module ranks in rank_pattern/alpha_pattern."""
    ranks = [m.rank for m in modules]
    common = max(set(ranks), key=lambda r: (ranks.count(r), r))
    pattern = {pattern_key(m.module): m.rank for m in modules if m.rank != common}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(m.module for m in modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_card(report: ExtractReport, model_ref: str, base_ref: str) -> str:
    ranks = sorted({m.rank for m in report.modules})
    return (
        "---\nlibrary_name: peft\ntags: [lora, mergeedit]\n---\n"
        f"# LoRA adapter extracted by mergeedit\n\n"
        f"The difference between `{model_ref}` and its base `{base_ref}`, as a LoRA adapter: a truncated SVD of each of the "
        f"{len(report.modules)} changed weight matrices (rank {', '.join(map(str, ranks))}; {report.unchanged} tensors were unchanged).\n\n"
        f"Relative Frobenius error of the adapter's delta: {report.relative_error:.3e} (per module: {REPORT_FILE}).\n\n"
        "Load it with `peft.PeftModel.from_pretrained(base_model, this_folder)`, or fold it into the base with mergeedit "
        "(`model: BASE+this_folder` in a merge config). Check the files with `mergeedit verify`.\n"
    )

