"""#16: frozen weights held in the half type give the per-call casts' numbers bit for bit and come back untouched; the
attention kernel is chosen by the batch's width and computes the same function; the frozen modules compiled compute
the eager losses and gradients, and `rsft.compile: auto` compiles only where it pays."""

import pytest
import torch
from test_rsft_speed import EXAMPLES, _batch, _model

from mergeedit.core import compiler
from mergeedit.core.compiler import missing_compiler
from mergeedit.core.errors import MergeEditError
from mergeedit.editing import compute
from mergeedit.editing.compute import (
    EAGER_ATTENTION_MAX_WIDTH,
    attention_kernel,
    compile_choice,
    compiled_frozen,
    frozen_in_half,
    frozen_subtrees,
)
from mergeedit.editing.forward import FullForward, PrefixForward
from mergeedit.editing.retain import RetainKL
from mergeedit.editing.rsft import TrainSettings, train_edits

CPU = torch.device("cpu")


def _tied_model():
    return _model(initializer_range=0.3, tied=True)


def _losses_and_grads(model, forward, trainable):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = forward.losses(_batch(EXAMPLES), [0, 1, 2])
    losses.sum().backward()
    named = dict(model.named_parameters())
    return losses.detach(), {n: named[n].grad.clone() for n in trainable}


def test_frozen_weights_in_bf16_give_the_per_call_casts_losses_and_gradients_bit_for_bit():
    model = _tied_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # precondition: the output layer is tied
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    named = dict(model.named_parameters())
    for n, p in named.items():
        p.requires_grad_(n in trainable)
    before = {n: (p, p.detach().clone()) for n, p in named.items()}
    for forward in (FullForward(model, "reference"), PrefixForward(model, 2)):
        forward.prepare(EXAMPLES, 0, CPU)
        ref_losses, ref_grads = _losses_and_grads(model, forward, trainable)
        with frozen_in_half(model, trainable, torch.bfloat16) as swapped:
            # 4 layers x 7 projections, less the 3 trained ones, and the output layer (tied to a frozen embedding)
            assert swapped == 4 * 7 - 3 + 1
            assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
            assert model.model.embed_tokens.weight.dtype == torch.float32  # the embedding lookup stays float32
            assert model.model.layers[2].mlp.up_proj.weight.dtype == torch.float32  # trained: autocast casts it
            losses, grads = _losses_and_grads(model, forward, trainable)
        assert torch.equal(losses, ref_losses)
        assert all(torch.equal(grads[n], ref_grads[n]) for n in trainable)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, (p, value) in before.items():
        assert after[n] is p and p.dtype == torch.float32 and torch.equal(p.detach(), value)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again


def test_float32_training_swaps_nothing_and_an_error_inside_still_restores_the_weights():
    model = _tied_model()
    with frozen_in_half(model, [], None) as swapped:
        assert swapped == 0
    weight = model.model.layers[1].mlp.down_proj.weight
    try:
        with frozen_in_half(model, [], torch.bfloat16):
            assert model.model.layers[1].mlp.down_proj.weight is not weight
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert model.model.layers[1].mlp.down_proj.weight is weight and weight.dtype == torch.float32


def test_bf16_training_leaves_every_frozen_weight_the_same_float32_tensor_and_trains_the_rest():
    model = _tied_model()
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    settings = TrainSettings(lr=1e-2, batch_size=3, max_epochs=2, max_steps_per_batch=3, loss_threshold=0.0)
    report = train_edits(model, EXAMPLES, trainable, settings, pad_id=0, device=CPU, precision="bfloat16")
    assert report.steps == 6 and report.precision == "bfloat16"
    after = dict(model.named_parameters())
    for n, (p, value) in before.items():
        assert after[n] is p and p.dtype == torch.float32
        assert torch.equal(p.detach(), value) != (n in trainable)  # the trained tensors moved, nothing else did


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()


def test_training_batches_up_to_the_width_bound_run_eager_attention_on_cpu_and_nothing_global_changes():
    model = _tied_model()
    config = model.config
    assert config._attn_implementation == "sdpa"  # precondition: the model runs PyTorch's SDPA
    flags = _flags()
    with attention_kernel(model, EAGER_ATTENTION_MAX_WIDTH, CPU) as switched:
        assert switched and config._attn_implementation == "eager" and _flags() == flags
    assert config._attn_implementation == "sdpa"
    with attention_kernel(model, EAGER_ATTENTION_MAX_WIDTH + 1, CPU) as switched:
        assert not switched and config._attn_implementation == "sdpa"
    with torch.no_grad(), attention_kernel(model, 8, CPU) as switched:  # measuring and evaluation keep the fused kernel
        assert not switched and config._attn_implementation == "sdpa"
    with attention_kernel(model, 8, torch.device("cuda")) as switched:  # measured on CPU only
        assert not switched
    try:
        with attention_kernel(model, 8, CPU):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert config._attn_implementation == "sdpa"
    other = _tied_model()
    with attention_kernel(model, 8, CPU):
        assert other.config._attn_implementation == "sdpa"  # another model (another thread's) is untouched
    with attention_kernel(other.double(), 8, CPU) as switched:  # eager's softmax is float32: not for a float64 model
        assert not switched
    with torch.no_grad(), attention_kernel(model, 8, CPU, training=True) as switched:  # the retain KL's base side
        assert switched


def test_eager_and_fused_attention_compute_the_same_losses_and_gradients(monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.models.llama import modeling_llama

    eager_calls = []
    original = modeling_llama.eager_attention_forward
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", lambda *a, **k: eager_calls.append(1) or original(*a, **k))
    model = _tied_model()
    trainable = [n for n, _ in model.named_parameters() if "layers.2" in n]
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    forward = FullForward(model, "reference")
    results = []
    for eager in (False, True):
        model.zero_grad(set_to_none=True)
        eager_calls.clear()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), attention_kernel(model, 8 if eager else 10**6, CPU) as switched:
            assert switched == eager
            losses = forward.losses(_batch(EXAMPLES), [0, 1, 2])
            losses.sum().backward()
        assert len(eager_calls) == (4 if eager else 0)  # precondition: each of the 4 layers ran the chosen kernel
        results.append((losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if n in trainable}))
    (fused, g_fused), (eager, g_eager) = results
    assert torch.allclose(fused, eager, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(g_fused[n], g_eager[n], rtol=1e-4, atol=1e-6) for n in trainable)


# -- compiled frozen modules (rsft.compile) -------------------------------------------------------------------------
def test_compile_auto_compiles_only_a_large_model_on_cpu_for_a_long_call_and_true_needs_a_compiler(monkeypatch):
    big, many = compute.COMPILE_MIN_PARAMETERS, compute.COMPILE_MIN_STEPS
    monkeypatch.setattr(compiler, "missing_compiler", lambda: None)
    assert compile_choice("false", CPU, big, many) == (False, "false")
    assert compile_choice("true", CPU, 10, 1) == (True, "true")  # obeyed, however small
    assert compile_choice("auto", CPU, big, many) == (True, f"auto -> true ({big:,} parameters, up to {many} steps)")
    assert compile_choice("auto", CPU, big - 1, many)[0] is False
    on, note = compile_choice("auto", CPU, big, many - 1)
    assert not on and note.startswith(f"auto -> false (at most {many - 1} steps")
    assert compile_choice("auto", CPU, big, many, checkpointing=True) == (False, "auto -> false (gradient checkpointing is on: not measured with compiled layers)")
    on, note = compile_choice("auto", torch.device("cuda"), big, many)
    assert not on and "measured on CPU only" in note
    monkeypatch.setattr(compiler, "missing_compiler", lambda: "no C++ compiler for torch.compile (here)")
    assert compile_choice("auto", CPU, big, many) == (False, "auto -> false (no C++ compiler for torch.compile (here))")
    with pytest.raises(MergeEditError, match=r"rsft.compile: true, but no C\+\+ compiler .* set rsft.compile: auto"):
        compile_choice("true", CPU, big, many)


def test_the_compiled_modules_are_the_frozen_subtrees_of_each_layer_never_a_trained_module_or_a_lone_matrix():
    model = _tied_model()
    layers = model.model.layers
    mlp = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    attn2 = layers[2]
    assert frozen_subtrees(model, mlp) == [layers[0], layers[1], attn2.self_attn, attn2.input_layernorm, attn2.post_attention_layernorm, layers[3]]
    # only the down projection trains: its siblings are lone matrices (nothing to fuse), the activation has no weights
    assert frozen_subtrees(model, ["model.layers.2.mlp.down_proj.weight"]) == [layers[0], layers[1], attn2.self_attn, attn2.input_layernorm, attn2.post_attention_layernorm, layers[3]]
    assert frozen_subtrees(model, []) == list(layers)
    assert frozen_subtrees(torch.nn.Linear(2, 2), []) == []  # not a decoder: nothing
    with compiled_frozen(model, mlp, False) as n:
        assert n == 0 and all(m._compiled_call_impl is None for m in model.modules())


@pytest.mark.skipif(missing_compiler() is not None, reason="needs a C++ compiler for torch.compile")
def test_compiled_frozen_modules_give_the_eager_losses_and_gradients_and_go_back_to_eager():
    """On the frozen-prefix path training takes (layers 2-3 per step; layer 3 whole, layer 2's attention and norms
    compiled), under the eager attention a training batch runs: the eager losses and gradients within rounding."""
    model = _tied_model()
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    chosen = frozen_subtrees(model, trainable)
    forward = PrefixForward(model, 2)
    forward.prepare(EXAMPLES, 0, CPU)
    results = []
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        with attention_kernel(model, 8, CPU), compiled_frozen(model, trainable, enabled) as n:
            assert n == (len(chosen) if enabled else 0) and all((m._compiled_call_impl is not None) == enabled for m in chosen)
            losses = forward.losses(_batch(EXAMPLES), [0, 1, 2])
            losses.sum().backward()
        results.append((losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if n in trainable}))
        assert all(m._compiled_call_impl is None for m in model.modules())  # back to eager
    (ref, ref_grads), (got, grads) = results
    assert len(chosen) == 6 and torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6) for n in trainable)
    try:
        with compiled_frozen(model, trainable, True):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert all(m._compiled_call_impl is None for m in model.modules())


@pytest.mark.skipif(missing_compiler() is not None, reason="needs a C++ compiler for torch.compile")
def test_a_compiled_training_call_keeps_the_retain_kl_exactly_zero_at_its_first_step_and_reports_it():
    """The retain forward runs eager inside a compiled call, as its base side did: KL 0.0 before the first update."""
    model = _tied_model()
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    retain = RetainKL.from_token_ids(model, [[1, 5, 9, 13, 2], [1, 7, 7, 30, 31, 40, 3], [1, 44, 3]], weight=1.0, top_k=None, batch_size=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(lr=1e-2, batch_size=3, max_epochs=2, max_steps_per_batch=1, loss_threshold=0.0)
    report = train_edits(model, EXAMPLES, trainable, settings, pad_id=0, device=CPU, retain=retain, compiled="true")
    assert report.compiled == "true" and report.steps == 2
    assert report.retain["kl"][0] == 0.0 and report.retain["kl"][1] > 0.0
    assert all(m._compiled_call_impl is None for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) != (n in trainable)
