"""Robust supervised fine-tuning: train until every edit is learned, with three loops and a loss threshold.

    for epoch in 1..max_epochs:                  # loop 1: passes over the edits
        set aside every edit already learned     # with sit_out: measured without gradient, it sits this epoch out
        for batch in shuffled(edits left):       # loop 2: batches of edits
            for step in 1..max_steps_per_batch:  # loop 3: stay on a batch until it is learned
                if no edit of the batch is left: break   # every edit of the batch is learned
                losses = answer-token cross-entropy of each edit still in the batch
                loss = mean(losses); loss.backward(); optimizer.step()
                drop every edit whose loss < loss_threshold from the batch for the rest of the epoch
        if every edit's loss < loss_threshold: break

`schedule: breadth-first` (LocFT-BF) is the same loop with one step per batch: epochs over shuffled mini-batches.
Both schedules share one mechanism (`EpochPool`): a learned edit leaves the pool for the rest of its epoch and gets
no gradient, but the check after every epoch measures every edit again. With `sit_out` (`rsft.sit_out_learned`), an
edit already learned when an epoch starts (measured then, without gradient) sits the whole epoch out: the epoch's
batches are cut from the edits still to learn, so replayed edits that are still known, and edits learned in earlier
epochs, cost a measuring forward, not a step.

`rsft.retain` adds ``weight * KL(base || current)`` on a mini-batch of unrelated text (editing.retain) to every step's
loss, in both schedules and on either forward path (the retain texts always run the model's own full forward).
`rsft.null_space` projects every step's update off the directions those texts' activations use (editing.null_space).

The baselines are the same loop with other settings: FT-L (every layer, one step per batch, no threshold) and FT-M
(one layer's MLP down projection, answer-token loss, one step per batch). Only the chosen parameters get gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import torch

from .collective import Collective, gather, positions, spread, sum_grads, total
from .compute import attention_kernel, compile_choice, compiled_frozen, frozen_in_half, uncompiled
from .forward import masked_modules, position_mask, training_forward, updates_only_at
from .tokens import length_buckets, pad_batch

STEP_MAX_WASTE = 0.5  # a step's (or a measuring chunk's) padded batch may be up to half padding before it is split
STEP_MAX_ROWS = 64  # and holds at most this many examples (one bucket's activations are held at a time)


def step_buckets(lengths: list[int]) -> list[list[int]]:
    """The padded batches one step (or one measuring chunk) runs, by example length. Each batch costs a fixed
    overhead (every layer's kernels launched, forward and backward) plus its cells, so fewer, fuller batches win over
    tight ones: on SmolLM2-135M-Instruct, the shipped recipe's trainable set, 40 edits, bf16, one thread of an Intel
    Xeon, 8 steps took 13.8 s with at most 15% padding per batch (about 3 batches a step), 11.9 s with 50% and 11.5 s
    with one batch a step. 50% keeps most of that gain and splits steps whose lengths differ by more than about 2x."""
    return length_buckets(lengths, max_waste=STEP_MAX_WASTE, max_rows=STEP_MAX_ROWS)


@dataclass(frozen=True)
class TrainingExample:
    case_id: str
    prompt_ids: list[int]
    answer_ids: list[int]
    # positions (in prompt + answer) whose activations may move the trained weights (`rsft.update_positions`); None: all
    update_positions: Optional[tuple[int, ...]] = None


@dataclass
class TrainSettings:
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    batch_size: int = 10
    max_epochs: int = 10
    max_steps_per_batch: int = 25
    loss_threshold: float = 0.05
    seed: int = 0
    schedule: str = "depth-first"  # depth-first: up to max_steps_per_batch steps on a batch; breadth-first: one step
    sit_out: bool = False  # an edit already learned when an epoch starts sits it out (`_EditLoop.sit_out_learned`)


def max_steps(settings: TrainSettings, edits: int) -> int:
    """The most optimizer steps one training call over `edits` edits can take: every epoch cuts the edits still to
    learn into ceil(edits / batch_size) batches, each trained up to `max_steps_per_batch` steps (one breadth-first)."""
    per_batch = 1 if settings.schedule == "breadth-first" else settings.max_steps_per_batch
    return settings.max_epochs * -(-edits // settings.batch_size) * per_batch


@dataclass
class EditOutcome:
    case_id: str
    final_loss: float
    steps: int
    learned: bool


@dataclass
class TrainReport:
    edits: list[EditOutcome]
    steps: int
    epochs: int
    seconds: float
    trainable_tensors: list[str]
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)  # batch loss at every optimizer step
    forward: str = ""  # which forward path ran (frozen-prefix cache or full forward, and why)
    precision: str = "float32"
    compiled: str = "false"  # rsft.compile: whether the frozen modules ran compiled, and for auto why
    tokens: int = 0  # tokens through the trained layers, summed over steps
    profile: dict = field(default_factory=dict)  # seconds in prefix, forward, backward, optimizer, measure
    retain: dict = field(default_factory=dict)  # the retain term (RetainKL.describe) and its unweighted KL at every step
    sat_out: list[int] = field(default_factory=list)  # per epoch: edits already learned at its start (no step in it)
    null_space: dict = field(default_factory=dict)  # the update's projection (NullSpaceProjector.describe), when on
    processes: int = 1  # processes that shared every step (editing.collective); `profile` is the main process's seconds

    @property
    def learned_fraction(self) -> float:
        return sum(e.learned for e in self.edits) / max(len(self.edits), 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["learned_fraction"] = self.learned_fraction
        return d


ProgressFn = Callable[[int, int, float, int], None]  # (edits learned, total edits, last loss, steps)
StepHook = Callable[[int, list[str]], None]  # (step, case ids whose examples contributed to this step's loss)


def _make_optimizer(params, s: TrainSettings):
    """The recipe's optimizer; Adam/AdamW as torch's fused kernel on CPU and CUDA.

    The fused kernel updates each tensor in one pass: on SmolLM2's 90 MLP matrices (80M parameters, 1 thread) a step
    took 0.05 s against 0.68 s for the default multi-tensor ("foreach") path, whose temporaries also added 0.3 GB to
    the peak (benchmarks/edit_throughput.py). Same formula; the last bits may differ from the foreach path.
    """
    params = list(params)
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay, fused=fused or None)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=fused or None)


def mark_trainable(module, trainable: list[str]) -> dict:
    """Only the chosen parameters get gradients (and optimizer state); returns the module's parameters by name."""
    named = dict(module.named_parameters())
    wanted = set(trainable)
    for name, p in named.items():
        p.requires_grad_(name in wanted)
    return named


_PRECISION_CHOICE: dict[str, tuple[str, str]] = {}


def pick_precision(device: torch.device, size: int = 512, repeats: int = 6) -> tuple[str, str]:
    """`rsft.precision: auto`: bfloat16 autocast where this processor/GPU multiplies bf16 clearly faster than float32
    (measured: a float32 vs a bf16 matmul, best of `repeats`), else float32. Returns (choice, why); measured once.

    The choice is per machine, so a bf16 run's numbers are deterministic on one machine but differ across machines.
    """
    key = str(device)
    if key in _PRECISION_CHOICE:
        return _PRECISION_CHOICE[key]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        _PRECISION_CHOICE[key] = ("float32", "the GPU has no bf16 support")
        return _PRECISION_CHOICE[key]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)

    def best(x, y) -> float:
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(4):
                x @ y
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)

    try:
        fp32 = best(a, b)
        bf16 = best(a.bfloat16(), b.bfloat16())
    except RuntimeError as exc:  # no bf16 matmul on this device
        _PRECISION_CHOICE[key] = ("float32", f"bf16 matmul failed ({exc})")
        return _PRECISION_CHOICE[key]
    ratio = fp32 / max(bf16, 1e-12)
    choice = "bfloat16" if ratio >= 1.5 else "float32"
    _PRECISION_CHOICE[key] = (choice, f"a {size}x{size} bf16 matmul ran {ratio:.1f}x the float32 speed on {device.type}")
    return _PRECISION_CHOICE[key]


def agree_precision(device: torch.device, collective: Optional[Collective]) -> None:
    """Under several processes, `precision: auto` must choose alike on all of them (each measures its own matmuls):
    bf16 only where every process measured it faster, else float32 everywhere. Later `pick_precision` calls read it."""
    if collective is None or collective.size == 1:
        return
    choice, why = pick_precision(device)
    votes = total(1.0 if choice == "bfloat16" else 0.0, collective)
    if choice == "bfloat16" and votes < collective.size:
        _PRECISION_CHOICE[str(device)] = ("float32", f"{why}, but not on every process ({int(votes)} of {collective.size}): float32 on all")


class EpochPool:
    """The edits still in play in this epoch: a learned edit (every one of its examples below the threshold) leaves
    for the rest of the epoch and gets no gradient. The one mechanism of both schedules (depth- and breadth-first)."""

    def __init__(self, case_of: list[str], threshold: float) -> None:
        self.case_of = case_of
        self.threshold = threshold
        self.learned: set[str] = set()

    def new_epoch(self) -> None:
        self.learned.clear()

    def training(self, indices: list[int]) -> list[bool]:
        """Whether each of `indices` still trains (its edit has not left the pool this epoch)."""
        return [self.case_of[i] not in self.learned for i in indices]

    def active(self, indices: list[int]) -> list[int]:
        return [i for i, t in zip(indices, self.training(indices)) if t]

    def update(self, indices: list[int], losses: list[float]) -> list[bool]:
        """Record the losses just measured for `indices`; returns which of them still train (their edit is unlearned)."""
        worst: dict[str, float] = {}
        for i, v in zip(indices, losses):
            c = self.case_of[i]
            worst[c] = max(worst.get(c, -math.inf), v)
        if self.threshold > 0:
            self.learned.update(c for c, v in worst.items() if v < self.threshold)
        return self.training(indices)


@dataclass
class _Setup:
    """What `_set_up` made ready for the loops."""

    named: dict  # the module's parameters by name
    optimizer: torch.optim.Optimizer
    precision_note: str  # the report's `precision`: the setting, and for `auto` what it chose and why
    half: Optional[torch.dtype]  # the autocast dtype; None runs in float32
    forward: object  # a FullForward or PrefixForward, prepared for `examples`
    prefix_before: float  # the forward's prefix seconds before this call (a passed-in forward keeps its total)
    modules: list  # the modules owning a trainable tensor inside a decoder layer (outputs masked under `update_positions`)
    compiled: bool  # the frozen modules run compiled (editing.compute.compiled_frozen)
    compile_note: str  # the report's `compiled`: the setting, and for `auto` what it chose and why


def _set_up(model, examples, trainable, settings, *, pad_id, device, precision, forward, compiled) -> _Setup:
    """Seed, mark the trainable parameters, make the optimizer, choose the precision and prepare the forward.

    The frozen-prefix cache is computed here, once, under the same autocast as the steps. A forward passed in keeps its
    cache across calls (chained sequential batches, replayed edits). Under several processes each holds the whole
    cache: a step's share of examples changes from step to step.
    """
    torch.manual_seed(settings.seed)
    named = mark_trainable(model, trainable)
    optimizer = _make_optimizer([named[n] for n in trainable], settings)
    model.train()
    precision_note = precision
    if precision == "auto":
        precision, why = pick_precision(device)
        precision_note = f"auto -> {precision} ({why})"
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    if forward is None:
        forward = training_forward(model, trainable)
    prefix_before = forward.prefix_seconds
    with torch.autocast(device.type, dtype=half, enabled=half is not None):
        forward.prepare(examples, pad_id, device)
    edits = len({e.case_id for e in examples})
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())  # Hugging Face's flag
    on, compile_note = compile_choice(compiled, device, sum(p.numel() for p in named.values()), max_steps(settings, edits), checkpointing)
    return _Setup(named, optimizer, precision_note, half, forward, prefix_before, masked_modules(model, trainable), on, compile_note)


class _EditLoop:
    """The state of one `train_edits` call's loops: the edits by case, the epoch pool, each edit's steps and last
    measured loss, the batch loss of every optimizer step, the seconds per phase and the tokens through the trained
    layers. `run_epoch` is loops 2 and 3 of the module docstring, `end_epoch` the check after every epoch."""

    def __init__(self, model, examples, settings, setup: _Setup, *, pad_id, device, collective, progress, on_step, retain=None, project=None, fresh=frozenset()) -> None:
        self.model, self.examples, self.settings, self.setup = model, examples, settings, setup
        self.fresh = fresh  # edits never trained before this call: the first epoch's sit-out check does not measure them
        self.project = project  # a NullSpaceProjector (editing.null_space) or None
        self.retain, self.retain_kl = retain, []  # a RetainKL (editing.retain) or None; its KL at every step
        self.pad_id, self.device = pad_id, device
        self.collective: Optional[Collective] = collective  # several processes (editing.collective); None: this one alone
        self.progress, self.on_step = progress, on_step
        self.timing = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "measure": 0.0}
        self.tokens = 0
        self.case_ids = list(dict.fromkeys(e.case_id for e in examples))
        self.by_case: dict[str, list[int]] = {c: [] for c in self.case_ids}
        for i, e in enumerate(examples):
            self.by_case[e.case_id].append(i)
        self.steps_per_case = {c: 0 for c in self.case_ids}
        self.last_loss = {c: math.inf for c in self.case_ids}
        self.step_loss = {c: math.inf for c in self.case_ids}  # from the training steps' own forwards
        self.total_steps, self.losses, self.epochs = 0, [], 0
        self.sat_out: list[int] = []  # edits that sat each epoch out, already learned at its start
        self.pool = EpochPool([e.case_id for e in examples], settings.loss_threshold)
        self.steps_per_batch = 1 if settings.schedule == "breadth-first" else settings.max_steps_per_batch

    def length(self, i: int) -> int:
        """Example i's tokens (prompt and answer)."""
        return len(self.examples[i].prompt_ids) + len(self.examples[i].answer_ids)

    def buckets(self, indices: list[int]) -> list[list[int]]:
        """Positions in `indices` grouped by length (`step_buckets`; deterministic)."""
        return step_buckets([self.length(i) for i in indices])

    def bucket_losses(self, chosen: list[int], count: bool = True) -> torch.Tensor:
        """Per-example losses of the examples `chosen`, padded into one batch. With gradients on and examples that
        name their update positions (`rsft.update_positions`: question, subject), only those positions' activations reach the
        trained weights (forward.updates_only_at); the losses are the same either way."""
        examples, half = self.examples, self.setup.half
        with torch.autocast(self.device.type, dtype=half, enabled=half is not None):
            b = pad_batch([(examples[i].prompt_ids, examples[i].answer_ids) for i in chosen], self.pad_id)
            b = {k: v.to(self.device) for k, v in b.items()}
            b["keys"] = [tuple(examples[i].prompt_ids) + tuple(examples[i].answer_ids) for i in chosen]
            self.tokens += int(b["attention_mask"].sum()) if count else 0
            allowed = [examples[i].update_positions for i in chosen]
            width = b["input_ids"].shape[1]
            with attention_kernel(self.model, width, self.device):
                if not torch.is_grad_enabled() or all(p is None for p in allowed):
                    return self.setup.forward.losses(b, chosen)
                mask = position_mask(allowed, [self.length(i) for i in chosen], width)
                with updates_only_at(self.setup.modules, mask.to(self.device)):
                    return self.setup.forward.losses(b, chosen)

    def losses_of(self, indices: list[int], count: bool = True) -> torch.Tensor:
        """Per-example losses of `indices` (in that order)."""
        out: list[Optional[torch.Tensor]] = [None] * len(indices)
        for bucket in self.buckets(indices):
            values = self.bucket_losses([indices[j] for j in bucket], count)
            for r, j in enumerate(bucket):
                out[j] = values[r]
        return torch.stack(out)  # type: ignore[arg-type]

    def measure(self, cases: list[str]) -> tuple[list[int], list[float], dict[str, float]]:
        """The examples of `cases`, their losses measured without training (in chunks of 64), and each case's worst.
        Under several processes each measures its share and every process gets every loss."""
        t = time.perf_counter()
        indices = [i for c in cases for i in self.by_case[c]]
        where = positions(len(indices), self.collective, [self.length(i) for i in indices])
        mine = [indices[j] for j in where]
        self.model.eval()
        values: list[float] = []
        with torch.no_grad():
            for start in range(0, len(mine), 64):
                values += self.losses_of(mine[start : start + 64], count=False).tolist()
        self.model.train()
        values = gather(values, len(indices), where, self.collective)
        worst: dict[str, float] = {}
        for i, v in zip(indices, values):
            c = self.examples[i].case_id
            worst[c] = max(v, worst.get(c, -math.inf))
        self.timing["measure"] += time.perf_counter() - t
        return indices, values, worst

    def measure_all(self) -> None:
        """Each edit's loss: the worst of its examples, measured without training (every edit, learned or not)."""
        self.last_loss.update(self.measure(self.case_ids)[2])

    def learned_count(self) -> int:
        return sum(v < self.settings.loss_threshold for v in self.last_loss.values())

    def sit_out_learned(self) -> None:
        """With `sit_out`, the check at the start of an epoch: an edit already learned sits the epoch out (no step).

        The candidates are the edits whose latest known loss is below the threshold (their last step's loss, or the
        last check's), and in the first epoch every edit, since none is known yet (replayed edits of earlier batches
        usually start learned), less the edits `train_edits` was told are fresh (never trained: a sequential batch's
        new edits, which the model almost never knows yet; one it does know takes one step, and its step's forward
        measures it). Each candidate is measured on the current weights without gradient; those still below
        the threshold leave the pool before the epoch's batches are cut, and their measured loss becomes their known
        loss. A measuring forward costs about 0.4 of a training step's forward and backward, so this pays as soon as
        about half the candidates are confirmed. Off with `sit_out=False` (the default), and without a threshold
        (FT-L, FT-M and LocFT-BF train every edit every epoch).
        """
        threshold = self.settings.loss_threshold
        if threshold <= 0 or not self.settings.sit_out:
            self.sat_out.append(0)
            return
        first = self.epochs == 1
        candidates = [c for c in self.case_ids if (first and c not in self.fresh) or self.step_loss[c] < threshold]
        if candidates:
            indices, values, worst = self.measure(candidates)
            self.step_loss.update(worst)
            self.pool.update(indices, values)
        self.sat_out.append(len(self.pool.learned))

    def run_epoch(self, epoch: int, gen: torch.Generator) -> None:
        """Loop 2: the edits not yet learned (`sit_out_learned`) in a fresh shuffled order, batch by batch, each
        batch trained by `train_batch`."""
        self.epochs = epoch + 1
        self.pool.new_epoch()
        order = torch.randperm(len(self.case_ids), generator=gen).tolist()  # drawn over every edit: one RNG stream
        self.sit_out_learned()
        order = [c for c in order if self.case_ids[c] not in self.pool.learned]
        size = self.settings.batch_size
        for start in range(0, len(order), size):
            # a batch holds batch_size edits with all their training examples (chat and raw forms, paraphrases)
            idx = [i for c in order[start : start + size] for i in self.by_case[self.case_ids[c]]]
            self.train_batch(idx)

    def train_batch(self, idx: list[int]) -> None:
        """Loop 3: up to `steps_per_batch` steps on one batch (one under breadth-first), until it is learned."""
        for _ in range(self.steps_per_batch):
            if not self.step(idx):
                break

    def step(self, idx: list[int]) -> bool:
        """One optimizer step on the batch's examples whose edit is still unlearned; False when none is left.

        Each length bucket is backpropagated as soon as its losses are known, so a step holds one bucket's
        activations, not the whole batch's: the gradient is the same mean over the step's examples (the buckets'
        contributions are summed as autograd sums them in one backward), with the memory of the largest bucket.
        An edit whose loss falls below the threshold in this step's forward leaves the pool for the next steps.
        Under several processes each takes its share of the step's examples (editing.collective) and every process
        gets every loss, so the pool stays the same on all of them.
        """
        live = self.pool.active(idx)
        keep = self.pool.training(live)
        n_keep = torch.tensor(float(sum(keep)), device=self.device)
        if not live or float(n_keep) == 0:
            return False
        scale = 1 / n_keep
        where = positions(len(live), self.collective, [self.length(i) for i in live])
        mine, mine_keep = [live[j] for j in where], [keep[j] for j in where]
        measured: list[float] = [0.0] * len(mine)
        stepped: set[str] = set()
        value = 0.0
        for bucket in self.buckets(mine):
            t = time.perf_counter()
            values = self.bucket_losses([mine[j] for j in bucket])
            weights = torch.tensor([mine_keep[j] for j in bucket], dtype=values.dtype, device=values.device)
            loss = (values * weights).sum() * scale
            for r, j in enumerate(bucket):
                measured[j] = float(values[r].detach())
            value += float(loss.detach())
            self.timing["forward"] += time.perf_counter() - t
            self.backward(loss)
        if self.retain is not None:  # its own backward: the retain forward's activations are held alone too
            self.backward(self.retain_term())
        if self.collective is not None:
            measured, value = self.sum_step(len(live), where, measured, value)
        self.pool.update(live, measured)
        for i, v in zip(live, measured):  # each edit's worst example loss in its latest step (before that update)
            c = self.examples[i].case_id
            self.step_loss[c] = max(v, self.step_loss[c]) if c in stepped else v
            stepped.add(c)
        self.apply()
        self.record_step(live, keep, value)
        return True

    def retain_term(self) -> torch.Tensor:
        """``weight * KL(base || current)`` on this step's retain mini-batch (step s reads mini-batch s mod count),
        under the steps' autocast; the unweighted KL is recorded for the report."""
        t = time.perf_counter()
        half = self.setup.half
        part = (0, 1) if self.collective is None else (self.collective.rank, self.collective.size)
        with torch.autocast(self.device.type, dtype=half, enabled=half is not None), uncompiled():  # as its eager base side
            kl = self.retain.kl(self.model, self.total_steps, part=part)
        self.retain_kl.append(float(kl.detach()))  # this process's part under several (summed in sum_step)
        self.timing["retain"] = self.timing.get("retain", 0.0) + time.perf_counter() - t
        return self.retain.weight * kl

    def backward(self, loss: torch.Tensor) -> None:
        """One bucket's share of the step's gradient (a process's share of the retain rows may be empty: no graph)."""
        t = time.perf_counter()
        if loss.requires_grad:
            loss.backward()
        self.timing["backward"] += time.perf_counter() - t

    def sum_step(self, count: int, where: list[int], measured: list[float], value: float) -> tuple[list[float], float]:
        """Under several processes, in one call: the step's gradients summed (so every process applies the same
        update), every example's loss (`count` of them; this process measured its share), the step's loss and the
        retain KL's parts. The losses are float32 numbers added to zeros, so they arrive exact."""
        t = time.perf_counter()
        c = self.collective
        kl = self.retain_kl[-1] if self.retain is not None else 0.0
        extra = torch.cat([spread(measured, count, where, torch.float32), torch.tensor([value, kl], dtype=torch.float32)])
        summed = sum_grads([p for group in self.setup.optimizer.param_groups for p in group["params"]], c, extra)
        if self.retain is not None:
            self.retain_kl[-1] = float(summed[count + 1])
        self.timing["sync"] = self.timing.get("sync", 0.0) + time.perf_counter() - t
        return summed[:count].tolist(), float(summed[count])

    def apply(self) -> None:
        """The optimizer step; the gradients are dropped right after (no gradient memory between steps)."""
        if self.project is not None:  # the optimizer sees only the directions the update may take (rsft.null_space)
            t = time.perf_counter()
            self.project.project_grads(self.setup.named, self.setup.half)
            self.timing["project"] = self.timing.get("project", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        self.setup.optimizer.step()
        self.setup.optimizer.zero_grad(set_to_none=True)  # no gradient memory held between steps
        self.timing["optimizer"] += time.perf_counter() - t
        if self.project is not None:  # the update leaves the retain text's directions alone (rsft.null_space)
            t = time.perf_counter()
            self.project.project(self.setup.named)
            self.timing["project"] = self.timing.get("project", 0.0) + time.perf_counter() - t

    def record_step(self, live: list[int], keep: list[bool], value: float) -> None:
        """Count the step for every edit that contributed to its loss, then tell `on_step` and `progress`."""
        self.total_steps += 1
        self.losses.append(value)
        trained_cases = list(dict.fromkeys(self.examples[i].case_id for i, k in zip(live, keep) if k))
        for c in trained_cases:
            self.steps_per_case[c] += 1
        if self.on_step:
            self.on_step(self.total_steps, trained_cases)
        if self.progress:
            self.progress(self.learned_count(), len(self.case_ids), value, self.total_steps)

    def end_epoch(self, last: bool) -> bool:
        """The check after every epoch; True when every edit is learned (training stops).

        Every edit's loss was just computed by the steps' own forwards, each before its step's update. Only when those
        say every edit is learned (or after the last epoch) is every edit measured again on the current weights, which
        decides; otherwise an extra forward over all edits could not stop training and is skipped. Under several
        processes every one holds every step loss (gathered at each step), so they all decide alike.
        """
        threshold = self.settings.loss_threshold
        stale_done = threshold > 0 and all(v < threshold for v in self.step_loss.values())
        if last or stale_done:
            self.measure_all()
        else:
            self.last_loss.update(self.step_loss)
        if self.progress:
            self.progress(self.learned_count(), len(self.case_ids), self.losses[-1] if self.losses else 0.0, self.total_steps)
        return threshold > 0 and all(v < threshold for v in self.last_loss.values())

    def report(self, trainable: list[str], started: float) -> TrainReport:
        """Each edit's last measured loss, steps and verdict, with the run's totals, forward path and profile."""
        self.model.eval()
        threshold = self.settings.loss_threshold
        edits = [EditOutcome(c, self.last_loss[c], self.steps_per_case[c], self.last_loss[c] < threshold) for c in self.case_ids]
        s = self.setup
        return TrainReport(
            edits=edits,
            steps=self.total_steps,
            epochs=self.epochs,
            seconds=time.perf_counter() - started,
            trainable_tensors=list(trainable),
            trainable_parameters=sum(s.named[n].numel() for n in trainable),
            losses=self.losses,
            forward=s.forward.describe(),
            precision=s.precision_note,
            compiled=s.compile_note,
            tokens=int(total(float(self.tokens), self.collective)),  # every process's
            profile={"prefix": s.forward.prefix_seconds - s.prefix_before + 0.0, **self.timing},  # this process's seconds
            retain={**self.retain.describe(), "kl": self.retain_kl} if self.retain is not None else {},
            sat_out=self.sat_out,
            null_space=self.project.describe() if self.project is not None else {},
            processes=1 if self.collective is None else self.collective.size,
        )


def train_edits(
    model,
    examples: list[TrainingExample],
    trainable: list[str],
    settings: TrainSettings,
    *,
    pad_id: int,
    device: torch.device,
    progress: Optional[ProgressFn] = None,
    collective: Optional[Collective] = None,
    precision: str = "float32",
    forward=None,
    on_step: Optional[StepHook] = None,
    retain=None,
    project=None,
    fresh: Iterable[str] = (),
    compiled: str = "false",
) -> TrainReport:
    """Fine-tune `trainable` parameters of `model` in place until the edits are learned (or the loops run out).

    `forward` (from `training_forward`) may be passed in to keep its frozen-prefix cache across calls (chained
    sequential batches, replayed edits); it rebuilds itself when a layer below the lowest trained one changed.
    Under `collective` (several processes, editing.collective), every process calls this with the same model and
    examples; each computes its share of every step and their gradients are summed before the update.

    `retain` (a `RetainKL` built from the unedited model before training, editing.retain) adds ``weight * KL(base ||
    current)`` on one retain mini-batch to every step's loss; its KL at every step is in the report's ``retain``.
    None or weight 0: no retain forward at all.

    `project` (a `NullSpaceProjector` built from the unedited model, editing.null_space) projects every step's update
    of each trained matrix off the directions the retain text's inputs use: ``W <- W0 + (W - W0) P``, W0 the weights
    when this call starts.

    `fresh`: case ids of edits never trained before (a sequential batch's new edits, beside replayed ones); with
    `sit_out`, the first epoch's check measures only the others (`_EditLoop.sit_out_learned`).

    `compiled` (`rsft.compile`: "auto", "true" or "false"): whether the frozen modules run compiled while the call
    trains and measures (editing.compute.compiled_frozen); the report's `compiled` says what ran.
    """
    if retain is not None and retain.weight == 0:
        retain = None
    started = time.perf_counter()
    setup = _set_up(model, examples, trainable, settings, pad_id=pad_id, device=device, precision=precision, forward=forward, compiled=compiled)
    loop = _EditLoop(model, examples, settings, setup, pad_id=pad_id, device=device, collective=collective, progress=progress, on_step=on_step, retain=retain, project=project, fresh=frozenset(fresh))
    if project is not None:
        project.start(setup.named)
    gen = torch.Generator().manual_seed(settings.seed)
    try:
        # the frozen layers' weights cast once, not at every use; their elementwise work fused where it pays
        with frozen_in_half(model, trainable, setup.half), compiled_frozen(model, trainable, setup.compiled):
            for epoch in range(settings.max_epochs):  # loop 1
                loop.run_epoch(epoch, gen)
                if loop.end_epoch(last=epoch == settings.max_epochs - 1):
                    break
    finally:
        if project is not None:
            project.finish()
    return loop.report(trainable, started)
