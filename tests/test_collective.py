"""Several processes training one model (editing/collective.py): the parts of a step add up to the one-process step.

The processes are simulated by threads with an in-memory sum, so the test needs no launcher; the model is float64 and
the losses float32, so one process and several agree to float32 rounding (the accelerate launch itself is tested in test_pipeline.py)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from thread_group import Member, ThreadGroup, run_members
from transformers import LlamaConfig, LlamaForCausalLM

from mergeedit.editing.collective import gather, gather_json, positions, sum_grads
from mergeedit.editing.null_space import NullSpaceProjector
from mergeedit.editing.retain import RetainKL
from mergeedit.editing.rsft import TrainingExample, TrainSettings, train_edits


def test_gather_json_returns_every_members_value_in_rank_order():
    values = [[[0, [5, 6]], [3, "Paris"]], [], [[1, "M\u00fcnchen \"quoted\"\n"], [2, 2.5e-9]]]  # empty share; escapes; a float
    for got in run_members(3, lambda m: gather_json(values[m.rank], m)):
        assert got == values
    assert gather_json({"a": 1}, None) == [{"a": 1}]


def test_positions_deal_by_rank_or_by_size_and_gather_rebuilds_every_value():
    members = [Member(ThreadGroup(3), r) for r in range(3)]
    assert [positions(7, m) for m in members] == [[0, 3, 6], [1, 4], [2, 5]]
    assert positions(7, None) == list(range(7))
    # by size, largest first to the least loaded: 5 -> r0; 4 -> r1; 3 -> r1 (4 < 5); 2 -> r0 (5 < 7); 1 -> r0 (7 = 7: lower rank)
    two = [Member(ThreadGroup(2), r) for r in range(2)]
    assert [positions(5, m, [5, 1, 4, 2, 3]) for m in two] == [[0, 1, 3], [2, 4]]
    # an edit's chat form (long) and raw form (short) side by side: by position one process would take every chat form
    lengths = [30, 12] * 4
    assert [sum(lengths[j] for j in positions(8, m)) for m in two] == [120, 48]
    assert [sum(lengths[j] for j in positions(8, m, lengths)) for m in two] == [84, 84]
    values = [0.5, -1.25, 3.0, 7.0, 1e-9, 2.0, 9.5]
    sizes = [3, 9, 1, 4, 4, 2, 8]
    got = run_members(3, lambda m: gather([values[j] for j in positions(7, m, sizes)], 7, positions(7, m, sizes), m))
    assert got == [values] * 3


def test_sum_grads_adds_every_member_and_keeps_none_where_no_member_had_one():
    def work(m):
        a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
        a.grad = torch.tensor([1.0, 2.0]) * (m.rank + 1)
        b.grad = torch.tensor([10.0, 20.0]) if m.rank == 1 else None  # only member 1 reached b
        sum_grads([a, b, c], m)
        return a.grad, b.grad, c.grad

    for a, b, c in run_members(2, work):
        assert torch.equal(a, torch.tensor([3.0, 6.0])) and torch.equal(b, torch.tensor([10.0, 20.0])) and c is None


_SEEDED = threading.Lock()  # torch's global generator is shared by the threads


def _model():
    with _SEEDED:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.3)
        return LlamaForCausalLM(cfg).double()


RETAIN = [[1, 5, 9, 13, 2], [1, 7, 7, 30, 31, 40, 3], [1, 44], [1, 20, 21, 22], [1, 3, 5, 7, 9, 11, 13, 15]]


@pytest.mark.parametrize("size", [2, 3])
def test_the_retain_parts_add_up_to_the_mean_and_its_gradient(size):
    base = _model()
    retain = RetainKL.from_token_ids(base, RETAIN, top_k=4, batch_size=5)
    split = RetainKL.from_token_ids(base, RETAIN, top_k=4, batch_size=5, parts=size)  # the base side per process share
    assert len(split) == len(retain) == 1 and split.positions == retain.positions == 21
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(0.05)
    w = model.model.layers[1].mlp.up_proj.weight
    whole = retain.kl(model, 0)
    whole.backward()
    expected = w.grad.clone()
    w.grad = None
    parts = [split.kl(model, 0, part=(r, size)) for r in range(size)]
    sum(parts).backward()
    assert whole > 0 and torch.allclose(sum(parts).detach(), whole.detach(), rtol=1e-12)
    assert torch.allclose(w.grad, expected, rtol=1e-10, atol=1e-14)
    assert split.agreement(model) == pytest.approx(retain.agreement(model), rel=1e-12)
    six = RetainKL.from_token_ids(base, RETAIN, top_k=4, batch_size=5, parts=6)
    empty = six.kl(model, 0, part=(5, 6))  # a mini-batch of 5 rows has none for the sixth process
    assert float(empty) == 0.0 and not empty.requires_grad
    with pytest.raises(ValueError, match="built for 1 process"):
        retain.kl(model, 0, part=(0, size))  # a base side built whole is not read in parts


def test_the_retain_kl_is_exactly_zero_before_the_first_step_in_every_part_under_bf16():
    """Each share's base side is computed in the shape its process's steps read (its rows, trimmed to their longest),
    under the same autocast, so the unchanged model scores exactly 0 on every part whatever bf16's rounding does with
    the batch shape."""
    model = _model().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for size in (1, 2, 3):
            retain = RetainKL.from_token_ids(model, RETAIN, top_k=4, batch_size=5, parts=size)
            widths = [g.batch["input_ids"].shape[1] for g in retain.groups if g is not None]
            assert widths == {1: [8], 2: [8, 7], 3: [7, 8, 5]}[size]  # RETAIN sorted by length: [2, 4, 5, 7, 8] tokens
            assert [float(retain.kl(model, 0, part=(r, size)).detach()) for r in range(size)] == [0.0] * size


def _examples():
    out = []
    for k in range(8):
        prompt = [1, 5 + k, 6 + (k % 3), 7]
        out.append(TrainingExample(f"e{k}", prompt, [20 + k, 30 + k], tuple(range(1, len(prompt) + 2))))
        out.append(TrainingExample(f"e{k}", [1, 2, 5 + k], [20 + k, 30 + k]))  # a second form, every position
    return out


def _train(member):
    model = _model()
    base = copy.deepcopy(model)
    trainable = [n for n, _ in model.named_parameters() if ".mlp." in n and ("layers.1." in n or "layers.2." in n)]
    retain = RetainKL.from_token_ids(base, RETAIN, weight=0.5, top_k=4, batch_size=3, parts=1 if member is None else member.size)
    project = NullSpaceProjector.build(model, trainable, retain.batches(), 0.9)
    settings = TrainSettings(lr=3e-2, batch_size=3, max_epochs=6, loss_threshold=0.3, schedule="breadth-first", sit_out=True, optimizer="adam")
    report = train_edits(model, _examples(), trainable, settings, pad_id=0, device=torch.device("cpu"), collective=member, retain=retain, project=project)
    return report, {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}


@pytest.mark.parametrize("size", [2, 3])
def test_several_processes_take_the_steps_one_process_takes(size):
    """With the retain KL, the null space, update positions, sit-out and the frozen-prefix cache all on: the same steps,
    the same learned edits and sat-out counts, and the same weights to rounding, on every member."""
    one, weights = _train(None)
    # preconditions: the controls this must cover are at work
    assert one.forward.startswith("frozen-prefix") and one.retain["kl"][-1] > 0 and one.null_space
    assert any(one.sat_out) and 0 < one.learned_fraction
    assert one.steps < one.epochs * -(-8 // 3)  # learned edits left their epochs: fewer steps than full epochs
    for report, got in run_members(size, _train):
        assert report.steps == one.steps and report.epochs == one.epochs and report.sat_out == one.sat_out
        assert [e.learned for e in report.edits] == [e.learned for e in one.edits]
        assert [e.steps for e in report.edits] == [e.steps for e in one.edits]
        assert report.tokens == one.tokens
        # the losses are float32 (editing.forward.answer_losses) whatever the model's dtype: they agree to its rounding
        assert report.losses == pytest.approx(one.losses, rel=1e-6)
        assert report.retain["kl"] == pytest.approx(one.retain["kl"], rel=1e-6, abs=1e-12)
        assert all(torch.allclose(got[n], weights[n], rtol=0, atol=1e-6) for n in weights)
        assert any(not torch.equal(got[n], _model().state_dict()[n]) for n in weights)  # the weights moved


def test_precision_auto_is_bf16_only_where_every_process_measured_it_faster(monkeypatch):
    from mergeedit.editing import rsft

    measured = {"cpu": ("bfloat16", "bf16 2.1x"), "meta": ("float32", "bf16 1.2x")}  # what each process's matmuls said
    monkeypatch.setattr(rsft, "pick_precision", lambda device: measured[str(device)])
    monkeypatch.setattr(rsft, "_PRECISION_CHOICE", {})
    run_members(2, lambda m: rsft.agree_precision(torch.device(["cpu", "meta"][m.rank]), m))
    assert rsft._PRECISION_CHOICE == {"cpu": ("float32", "bf16 2.1x, but not on every process (1 of 2): float32 on all")}
    measured["meta"] = ("bfloat16", "bf16 2.0x")
    rsft._PRECISION_CHOICE.clear()
    run_members(2, lambda m: rsft.agree_precision(torch.device(["cpu", "meta"][m.rank]), m))
    assert rsft._PRECISION_CHOICE == {}  # both measured bf16 faster: each keeps its own measurement
