"""`layers: auto` (editing/localize.py): the gradient-norm probe finds the one layer that can change the answer, its
scores equal the plain autograd formula, and the window choice is deterministic."""

from __future__ import annotations

import pytest
import torch

from mergeedit.core.errors import MergeEditError
from mergeedit.editing.localize import best_window, choose_layers, probe_layer_scores
from mergeedit.editing.tokens import pad_batch
from mergeedit.models.toy import LlamaShape, build_llama

SHAPE = LlamaShape(hidden=16, intermediate=32, layers=5, heads=2, kv_heads=1, vocab=40)
PAIRS = [([1, 4, 5, 6], [7, 8]), ([1, 9, 10], [11]), ([1, 12, 13, 14, 15], [16, 17, 18])]
DOWN = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(SHAPE.layers)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("probe") / "toy", SHAPE, shards=1)


def load(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(torch.float64).eval()


@pytest.mark.parametrize("planted", [1, 3])
def test_probe_returns_the_only_layer_that_can_change_the_answer(folder, planted):
    model = load(folder)
    # every other layer's MLP has up_proj = 0, so its activation is 0 and its down_proj has no effect on any output:
    # by construction, only layer `planted`'s down_proj has a gradient
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i != planted:
                layer.mlp.up_proj.weight.zero_()
    choice = choose_layers(model, PAIRS, DOWN, width=1, batch_size=2)
    assert choice.window == (planted, planted + 1)
    assert choice.scores[planted] > 0
    assert [s for i, s in enumerate(choice.scores) if i != planted] == [0.0] * (SHAPE.layers - 1)
    assert choice.examples == 3 and choice.to_json()["window"] == [planted, planted + 1]
    assert f"*{planted}:" in choice.describe()
    wide = choose_layers(model, PAIRS, DOWN, width=2)
    assert wide.window == (max(planted - 1, 0), max(planted - 1, 0) + 2)  # earliest window holding it


def test_scores_equal_the_plain_autograd_norms_and_the_model_is_left_as_it_was(folder):
    model = load(folder)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)
    trainable = DOWN + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(SHAPE.layers)]
    scores = probe_layer_scores(model, PAIRS, trainable, batch_size=2)
    relative = probe_layer_scores(model, PAIRS, trainable, score="relative", batch_size=3)

    # reference: one batch, mean over examples of each example's mean answer-token CE, autograd, norm per layer
    named = dict(model.named_parameters())
    params = [named[n].detach().clone().requires_grad_(True) for n in trainable]
    b = pad_batch(PAIRS, 0)
    logits = torch.func.functional_call(model, dict(zip(trainable, params)), (b["input_ids"],), {"attention_mask": b["attention_mask"]}).logits[:, :-1]
    labels = b["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    loss = (ce.sum(1) / (labels != -100).sum(1)).mean()
    grads = torch.autograd.grad(loss, params)
    for i in range(SHAPE.layers):
        g = (grads[i].pow(2).sum() + grads[SHAPE.layers + i].pow(2).sum()).sqrt()
        w = (params[i].detach().pow(2).sum() + params[SHAPE.layers + i].detach().pow(2).sum()).sqrt()
        assert scores[i] == pytest.approx(float(g), rel=1e-9)
        assert relative[i] == pytest.approx(float(g / w), rel=1e-9)
    assert all(p.grad is None for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]


def test_best_window_is_the_largest_sum_earliest_on_ties():
    assert best_window([1.0, 5.0, 2.0, 5.0], 1) == (1, 2)
    assert best_window([1.0, 5.0, 2.0, 5.0], 2) == (1, 3)  # 7 and 7: the earlier
    assert best_window([1.0, 5.0, 1.0, 5.0, 2.0], 2) == (3, 5)
    assert best_window([3.0, 0.0, 0.0, 3.0], 2) == (0, 2)
    assert best_window([1.0, 2.0], 2) == (0, 2)
    with pytest.raises(MergeEditError, match="between 1 and the 2 layers"):
        best_window([1.0, 2.0], 3)


def test_probe_errors_name_the_fix(folder):
    model = load(folder)
    with pytest.raises(MergeEditError, match="not a parameter"):
        probe_layer_scores(model, PAIRS, ["model.layers.0.mlp.nope.weight"])
    with pytest.raises(MergeEditError, match="numbered layers"):
        probe_layer_scores(model, PAIRS, ["lm_head.weight"])
    with pytest.raises(MergeEditError, match="at least one edit"):
        probe_layer_scores(model, [], DOWN)
