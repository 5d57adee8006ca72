"""`rsft.update_positions`: only some token positions move the trained weights (editing.forward.updates_only_at), with
the same losses: `subject`, the subject's and the answer's; `question`, the question's and the answer's. The gradient is the hand formula sum over the kept
positions of (output gradient) x (input)^T; every position kept is the plain step bit for bit, none kept is no update;
the subject's and the question's tokens are found in raw and chat prompts; a recipe that cannot use it is refused with its key."""

from __future__ import annotations

import pytest
import torch
from test_recipe_controls import EDITS, _recipe, _tiny
from transformers import LlamaConfig, LlamaForCausalLM

from mergeedit.editing.forward import FullForward, updates_only_at
from mergeedit.editing.rsft import TrainingExample, TrainSettings, train_edits
from mergeedit.editing.tokens import pad_batch
from mergeedit.pipeline.runner import RecipeRun


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.3)
    return LlamaForCausalLM(cfg)


EXAMPLES = [TrainingExample("a", [1, 5, 6, 7], [8, 9]), TrainingExample("b", [1, 5], [10]), TrainingExample("c", [1, 2, 3, 4, 5, 6], [11, 12])]


def _batch(examples):
    return pad_batch([(e.prompt_ids, e.answer_ids) for e in examples], 0)


def test_the_gradient_is_the_sum_over_the_kept_positions_only():
    """One trained Linear (layer 1's down projection): with positions S kept, dL/dW = sum_{p in S} delta_p x_p^T,
    where x_p is the module's input and delta_p the gradient reaching its output, both from the unmasked pass."""
    model = _model()
    lin = model.model.layers[1].mlp.down_proj
    batch = _batch(EXAMPLES)
    seen = {}
    h1 = lin.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), out=out))
    loss = FullForward(model, "reference").losses(batch, [0, 1, 2]).sum()
    h1.remove()
    seen["out"].retain_grad()
    loss.backward()
    delta, x = seen["out"].grad, seen["x"]
    full = lin.weight.grad.clone()
    mask = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    mask[0, [1, 2, 4]] = True
    mask[2, 3:] = True
    expected = torch.einsum("btk,bti->ki", delta * mask.unsqueeze(-1), x)
    parts = []
    for m in (mask, ~mask):
        model.zero_grad(set_to_none=True)
        with updates_only_at([lin], m):
            masked_loss = FullForward(model, "reference").losses(batch, [0, 1, 2]).sum()
        assert torch.equal(masked_loss.detach(), loss.detach())  # the forward is the same
        masked_loss.backward()
        parts.append(lin.weight.grad.clone())
    assert torch.allclose(parts[0], expected, atol=1e-6) and parts[0].abs().sum() > 0
    assert torch.allclose(parts[0] + parts[1], full, atol=1e-6)  # the two halves add up to the plain gradient


def _train(examples):
    model = _model()
    trainable = [n for n, _ in model.named_parameters() if ".mlp." in n and ("layers.1." in n or "layers.2." in n)]
    settings = TrainSettings(lr=1e-2, batch_size=3, max_epochs=2, max_steps_per_batch=2, loss_threshold=0.0)
    report = train_edits(model, examples, trainable, settings, pad_id=0, device=torch.device("cpu"))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}, report.losses


def test_every_position_kept_is_the_plain_step_and_none_kept_is_no_update():
    plain, plain_losses = _train(EXAMPLES)
    every = [TrainingExample(e.case_id, e.prompt_ids, e.answer_ids, tuple(range(len(e.prompt_ids) + len(e.answer_ids)))) for e in EXAMPLES]
    kept, kept_losses = _train(every)
    assert kept_losses == plain_losses and all(torch.equal(kept[n], plain[n]) for n in plain)
    base = {n: p.detach().clone() for n, p in _model().named_parameters() if n in plain}
    none = [TrainingExample(e.case_id, e.prompt_ids, e.answer_ids, ()) for e in EXAMPLES]
    frozen, frozen_losses = _train(none)
    assert all(torch.equal(frozen[n], base[n]) for n in base)  # zero gradients: Adam moves nothing
    assert frozen_losses[0] == plain_losses[0]  # the first step's loss is computed on the same weights either way
    assert any(not torch.equal(plain[n], base[n]) for n in base)  # precondition: plain training moves the weights


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "where", "did", "ada", "lovelace", "work", "?", "<u>", "<a>", "london"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")


def test_the_subject_and_answer_positions_in_raw_and_chat_prompts():
    from mergeedit.editing.prompts import PromptFormat, text_positions
    from mergeedit.editing.records import EditRecord
    from mergeedit.pipeline.checks import examples_for

    tok = _word_tokenizer()
    rec = EditRecord("e1", "where did ada lovelace work ?", "london", subject="ada lovelace")
    raw = examples_for([rec], tok, PromptFormat("raw"), False, "dataset", update_positions="subject")
    assert [(e.prompt_ids, e.answer_ids, e.update_positions) for e in raw] == [([3, 4, 5, 6, 7, 8], [11], (2, 3, 6))]
    tok.chat_template = "{% for m in messages %}<u> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <a>{% endif %}"
    both = examples_for([rec], tok, PromptFormat("both"), False, "dataset", eos=True, update_positions="subject")
    assert [(e.prompt_ids, e.answer_ids, e.update_positions) for e in both] == [
        ([3, 4, 5, 6, 7, 8], [11, 2], (2, 3, 6, 7)),
        ([9, 3, 4, 5, 6, 7, 8, 10], [11, 2], (3, 4, 8, 9)),  # "<u>" first, the assistant header "<a>" last: neither kept
    ]
    assert [e.update_positions for e in examples_for([rec], tok, PromptFormat("raw"), False, "dataset")] == [None]  # all: no mask
    question = examples_for([rec], tok, PromptFormat("both"), False, "dataset", eos=True, update_positions="question")
    assert [e.update_positions for e in question] == [(0, 1, 2, 3, 4, 5, 6, 7), (1, 2, 3, 4, 5, 6, 8, 9)]  # not "<u>", not "<a>"
    assert text_positions(tok, [3, 4, 5, 6], "lovelace work") is None  # not in the prompt
    with pytest.raises(Exception, match="edit e2 has no subject"):
        examples_for([EditRecord("e2", "where did ada lovelace work ?", "london")], tok, PromptFormat("raw"), False, "dataset", update_positions="subject")
    with pytest.raises(Exception, match="does not spell its subject 'grace hopper'"):
        examples_for([EditRecord("e3", "where did ada lovelace work ?", "london", subject="grace hopper")], tok, PromptFormat("raw"), False, "dataset", update_positions="subject")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny-up") / "model")


def test_a_recipe_trains_with_it_and_a_record_without_a_subject_is_refused(tmp_path, tiny, run_cli):
    edits = [{**e, "subject": e["prompt"].split()[-2]} for e in EDITS]  # "w1", "w2", ...
    # layer 0 trains, so the two attention layers above can carry the subject's new value to the answer's positions
    recipe = _recipe(tmp_path / "subject", tiny, edits=edits, rsft={"update_positions": "subject", "max_epochs": 8, "layers": [0, 1]})
    result = RecipeRun(recipe).run()
    losses = result.train_reports[0]["losses"]
    assert losses[-1] < 0.5 * losses[0]  # the edits are learned from the subject and answer positions alone
    no_subject = _recipe(tmp_path / "nosubject", tiny, rsft={"update_positions": "subject"})
    shown = run_cli("plan", no_subject)
    assert shown.code == 2 and "has no subject, which rsft.update_positions: subject needs" in shown.stderr, shown.stderr


def test_the_default_is_question_for_rsft_and_all_for_the_published_baselines():
    from mergeedit.pipeline.recipe import RsftSection

    assert RsftSection().update_positions == "question"
    assert {m: RsftSection(method=m).update_positions for m in ("ft-l", "ft-m", "locft-bf")} == {"ft-l": "all", "ft-m": "all", "locft-bf": "all"}


def test_tensors_outside_the_layers_learn_from_every_position():
    """The output layer's logits are taken only where an answer token is predicted, so it has no per-position mask:
    trained with `question` positions, it gets exactly the plain gradient, while a layer's module gets less."""
    examples = [TrainingExample(e.case_id, e.prompt_ids, e.answer_ids, (len(e.prompt_ids),)) for e in EXAMPLES]
    grads = {}
    for name, exs in (("plain", EXAMPLES), ("kept", examples)):
        m = _model()
        trainable = ["lm_head.weight", "model.layers.1.mlp.down_proj.weight"]
        settings = TrainSettings(lr=0.0, batch_size=3, max_epochs=1, max_steps_per_batch=1, loss_threshold=0.0, optimizer="sgd")
        seen = {}
        # summed over the step's buckets (each bucket is backpropagated on its own)
        hooks = [p.register_hook(lambda g, n=n, seen=seen: seen.__setitem__(n, seen.get(n, 0) + g)) for n, p in m.named_parameters() if n in trainable]
        train_edits(m, exs, trainable, settings, pad_id=0, device=torch.device("cpu"))
        for h in hooks:
            h.remove()
        grads[name] = seen
    assert torch.allclose(grads["kept"]["lm_head.weight"], grads["plain"]["lm_head.weight"], atol=1e-7)
    d = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(grads["kept"][d], grads["plain"][d], atol=1e-4)


def test_the_layer_probe_measures_the_gradient_the_masked_step_follows():
    """`rsft.layers: auto` probes with the run's update positions: each layer's score is the norm of exactly the
    gradient the first training step takes (lr 0, SGD, hooks on the parameters), masked the same way; every position
    kept is the unmasked probe, none kept scores 0."""
    from mergeedit.editing.localize import probe_layer_scores

    kept = [TrainingExample(e.case_id, e.prompt_ids, e.answer_ids, (0, len(e.prompt_ids) - 1, len(e.prompt_ids))) for e in EXAMPLES]
    trainable = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(3) for p in ("up", "down")]
    pairs = [(e.prompt_ids, e.answer_ids) for e in kept]
    model = _model()
    probed = probe_layer_scores(model, pairs, trainable, positions=[e.update_positions for e in kept])
    seen: dict = {}
    hooks = [p.register_hook(lambda g, n=n: seen.__setitem__(n, seen.get(n, 0) + g)) for n, p in model.named_parameters() if n in trainable]
    settings = TrainSettings(lr=0.0, batch_size=3, max_epochs=1, max_steps_per_batch=1, loss_threshold=0.0, optimizer="sgd")
    train_edits(model, kept, trainable, settings, pad_id=0, device=torch.device("cpu"))
    for h in hooks:
        h.remove()
    stepped = [sum(float(seen[f"model.layers.{i}.mlp.{p}_proj.weight"].double().pow(2).sum()) for p in ("up", "down")) ** 0.5 for i in range(3)]
    assert probed == pytest.approx(stepped, rel=1e-5)
    plain = probe_layer_scores(_model(), pairs, trainable)
    # precondition: the mask changes the lower layers' scores; the top layer's gradient comes only from the positions
    # that predict an answer token (nothing attends to it from above), which the mask keeps, so it is unchanged
    assert all(abs(a - b) > 1e-3 * b for a, b in zip(probed[:2], plain[:2])) and probed[2] == pytest.approx(plain[2], rel=1e-6)
    every = [tuple(range(len(p) + len(a))) for p, a in pairs]
    assert probe_layer_scores(_model(), pairs, trainable, positions=every) == plain
    assert probe_layer_scores(_model(), pairs, trainable, positions=[(), (), ()]) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("mode", ["question", "all"])
def test_a_run_probes_its_layers_with_the_positions_it_trains(tmp_path, tiny, monkeypatch, mode):
    """`rsft.layers: auto` in a run: the probe gets each probed example's update positions (None under `all`)."""
    from mergeedit.editing import localize

    real, seen = localize.choose_layers, []

    def spy(model, pairs, trainable, **kw):
        seen.append((len(pairs), kw.get("positions")))
        return real(model, pairs, trainable, **kw)

    monkeypatch.setattr(localize, "choose_layers", spy)
    recipe = _recipe(tmp_path, tiny, rsft={"layers": "auto", "update_positions": mode, "max_epochs": 1})
    RecipeRun(recipe).run()
    (count, positions), = seen
    assert count == len(positions) > 0
    if mode == "all":
        assert all(p is None for p in positions)
    else:  # the question's and the answer's tokens
        assert all(p is not None and len(p) > 0 for p in positions)
