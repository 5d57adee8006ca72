"""How a training forward spends its time under autocast: frozen weights held in the half type, and the attention
kernel chosen by the batch's width. Neither changes what is computed by more than the kernel's rounding.

Frozen weights (`frozen_in_half`). Autocast casts a float32 weight to bf16 at every matrix multiply that uses it and
caches the cast only for tensors that require gradients, so every frozen layer above the lowest trained one was cast
again in every bucket of every step. `frozen_in_half` swaps each frozen `nn.Linear` weight for its half-type copy for
the length of a training call and puts the original float32 tensor back afterwards (the very same tensor object:
nothing is rounded when the model is merged or saved). Autocast casts a tensor already in its type to itself, so
every loss and gradient is bit for bit what the per-call cast gives (tests/test_training_compute.py). Measured on
SmolLM2-135M-Instruct, the shipped sequential recipe's trainable set, bf16, one thread of an Intel Xeon with AMX:
`aten::copy_` was 24% of a training call; holding the frozen weights cut the call from 13.0 s to 10.7 s. It costs
the half-type copies (about 0.2 GB for SmolLM2's layers 4-29 and output layer) while training runs.

Attention (`attention_kernel`). On CPU, PyTorch's fused ("flash") SDPA kernel runs the backward of short sequences
slowly: a forward and backward of 16 rows x 24 tokens (9 heads, GQA, bf16) took 11.1 ms against 3.9 ms for the
unfused math (matmul, softmax, matmul), 102 against 94 ms at 32 x 128, and the unfused form loses beyond that (165
against 76 ms at 16 x 256; its memory grows with the width squared). So a forward that needs gradients over a batch
at most `EAGER_ATTENTION_MAX_WIDTH` tokens wide runs Hugging Face's "eager" attention on CPU (the model's own
`config._attn_implementation`, switched for that forward and put back: no process-wide flag); forwards without
gradients (measuring, evaluation) keep the fused kernel, which is faster there (1.8 against 2.5 ms at 32 x 24,
float32). On the shipped recipe's trainable set (40 edits, 8 steps, bf16, one thread of an Intel Xeon) the training
call took 13.8 s against 17.1 s with the fused kernel. Both compute softmax(QK^T / sqrt(d)) V; they differ by
rounding only (tests/test_training_compute.py). The choice depends on the batch's width alone, never on the
processor or the thread count.

Compiled frozen modules (`compiled_frozen`, `rsft.compile`). What is left of a step after the matrix products is
elementwise work: RMSNorm, rotary embeddings, softmax, SiLU, residual adds, each a pass through memory, forward and
backward. torch.compile (inductor) fuses them into a few C++ loops. For the length of a training call, every
maximal subtree of a decoder layer that holds parameters but no trained one is compiled (a whole layer above the
trained window; the attention and the norms of a trained layer; never a trained module, so the `update_positions`
hooks on those stay eager, and never a lone matrix product, which compiling cannot speed up). One compiled code serves
every layer (dynamo guards on shapes and modes, not on which layer), with dynamic shapes, so bucketed batch widths do
not recompile. The retain KL's forward runs eager (`uncompiled`), as its base side did, so the KL stays exactly 0
before the first step. On SmolLM2-135M-Instruct with the shipped sequential recipe's R-SFT (99 edits, 10 epochs, bf16,
one thread of an Intel Xeon; benchmarks/compiled_training.py) a training call ran 1.11-1.17x as fast compiled,
inductor's compiling included (about 30 s cold, 5 s from its disk cache). Compiled kernels round differently from
eager ones, as any two kernels do; `auto` compiles only where the compile pays for itself (`compile_choice`), and the
report says which ran.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from ..core import compiler
from ..core.errors import MergeEditError

EAGER_ATTENTION_MAX_WIDTH = 128  # the widest batch (tokens) whose training forward runs eager attention on CPU
COMPILE_MIN_PARAMETERS = 10_000_000  # `rsft.compile: auto` compiles models at least this large...
COMPILE_MIN_STEPS = 100  # ...for a training call that may take at least this many steps (editing.rsft.max_steps)


@contextmanager
def attention_kernel(model, width: int, device: torch.device, training: Optional[bool] = None) -> Iterator[bool]:
    """The attention for one forward of `model` over a batch `width` tokens wide (see the module doc): on CPU, for a
    training forward (`training`; None: whether gradients are on) over a batch at most EAGER_ATTENTION_MAX_WIDTH wide,
    a model on PyTorch's SDPA runs Hugging Face's "eager" attention (matmul, float32 softmax, matmul); yields whether
    it did. The retain KL passes training=True for its base side too, so base and steps run one kernel and the KL is
    exactly 0 before the first step. The switch is the model's own config attribute, put back on exit: no
    process-wide flag, so threads and other models are untouched."""
    config = getattr(model, "config", None)
    training = torch.is_grad_enabled() if training is None else training
    if (
        device.type != "cpu" or not training or width > EAGER_ATTENTION_MAX_WIDTH or getattr(config, "_attn_implementation", None) != "sdpa"
        or getattr(model, "dtype", None) == torch.float64  # eager's softmax runs in float32: a float64 model keeps SDPA
    ):
        yield False
        return
    config._attn_implementation = "eager"
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


@contextmanager
def frozen_in_half(model: torch.nn.Module, trainable: Sequence[str], half: Optional[torch.dtype]) -> Iterator[int]:
    """While active, every `nn.Linear` of `model` whose weight is not among `trainable` (nor tied to a trainable
    tensor) holds its weight (and bias) in `half`; yields how many tensors were swapped. The original tensors are put
    back on exit, even after an error. `half` None (float32 training): nothing changes."""
    if half is None:
        yield 0
        return
    named = dict(model.named_parameters())
    training = {id(named[n]) for n in trainable if n in named}
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            for attr in ("weight", "bias"):
                p = getattr(module, attr, None)
                if p is None or id(p) in training or not p.is_floating_point() or p.dtype == half:
                    continue
                swapped.append((module, attr, p))
                setattr(module, attr, torch.nn.Parameter(p.detach().to(half), requires_grad=False))
        yield len(swapped)
    finally:
        for module, attr, p in reversed(swapped):
            setattr(module, attr, p)


def compile_choice(setting: str, device: torch.device, parameters: int, steps: int, checkpointing: bool = False) -> tuple[bool, str]:
    """`rsft.compile`: whether a training call compiles the frozen modules (`compiled_frozen`), and the report's note.
    "true" and "false" are obeyed (true raises where inductor has no C++ compiler for CPU code); "auto" compiles on
    CPU, with a C++ compiler, a model of at least COMPILE_MIN_PARAMETERS and a call that may take COMPILE_MIN_STEPS
    steps or more: compiling costs about 30 s cold (5 s from inductor's disk cache) on SmolLM2-135M and saves about a
    fifth of each step's forward and backward, so a short call or a tiny model would pay more than it gains. With
    gradient checkpointing on (`checkpointing`), auto stays eager: the two have not been measured together."""
    if setting == "false":
        return False, "false"
    missing = compiler.missing_compiler() if device.type == "cpu" else None
    if setting == "true":
        if missing is not None:
            raise MergeEditError(f"rsft.compile: true, but {missing}; install g++ or clang++, or set rsft.compile: auto")
        return True, "true"
    if device.type != "cpu":
        return False, f"auto -> false (measured on CPU only; {device.type}: set rsft.compile: true to try it)"
    if missing is not None:
        return False, f"auto -> false ({missing})"
    if checkpointing:
        return False, "auto -> false (gradient checkpointing is on: not measured with compiled layers)"
    if parameters < COMPILE_MIN_PARAMETERS:
        return False, f"auto -> false ({parameters:,} parameters < {COMPILE_MIN_PARAMETERS:,}: compiling would cost more than it saves)"
    if steps < COMPILE_MIN_STEPS:
        return False, f"auto -> false (at most {steps} steps < {COMPILE_MIN_STEPS}: compiling would cost more than it saves)"
    return True, f"auto -> true ({parameters:,} parameters, up to {steps} steps)"


def frozen_subtrees(model: torch.nn.Module, trainable: Sequence[str]) -> list[torch.nn.Module]:
    """The modules `compiled_frozen` compiles: in each decoder layer (`model.model.layers`; none for other shapes),
    every maximal subtree that holds parameters and no trained one, except a lone `nn.Linear`/`nn.Embedding`."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        return []
    named = dict(model.named_parameters())
    training = {id(named[n]) for n in trainable if n in named}
    chosen: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        params = list(module.parameters())
        if not params:
            return
        if not any(id(p) in training for p in params):
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                chosen.append(module)
            return
        for child in module.children():
            visit(child)

    for layer in layers:
        visit(layer)
    return chosen


@contextmanager
def compiled_frozen(model: torch.nn.Module, trainable: Sequence[str], enabled: bool) -> Iterator[int]:
    """While active, each of `frozen_subtrees(model, trainable)` runs compiled (torch.compile, dynamic shapes, the
    vector width named: core.compiler); yields how many. Every module is put back to eager on exit, even after an
    error. Values differ from eager by kernel rounding only (tests/test_training_compute.py)."""
    modules = frozen_subtrees(model, trainable) if enabled else []
    try:
        for m in modules:
            m._compiled_call_impl = torch.compile(m._call_impl, dynamic=True, options=compiler.inductor_options())
        yield len(modules)
    finally:
        for m in modules:
            m._compiled_call_impl = None


def uncompiled():
    """Within it, compiled modules run eager (the retain KL's forward, which must match its eager base side)."""
    return torch.compiler.set_stance("force_eager")
