"""#16: the frozen-prefix forward is exact, bucketing keeps examples apart, learned edits leave, no system prompt."""

import pytest
import torch
from test_pipeline import tiny_model  # noqa: F401  (a fixture)
from transformers import LlamaConfig, LlamaForCausalLM

from mergeedit.editing.forward import FullForward, PrefixForward
from mergeedit.editing.rsft import EpochPool, TrainingExample, TrainSettings, step_buckets, train_edits
from mergeedit.editing.tokens import length_buckets, pad_batch

EXAMPLES = [TrainingExample("a", [1, 5, 6, 7], [8, 9]), TrainingExample("b", [1, 5], [10]), TrainingExample("c", [1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13])]


def _model(initializer_range: float = 0.02, tied: bool = False):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, initializer_range=initializer_range)
    return LlamaForCausalLM(cfg)


def _batch(examples):
    b = pad_batch([(e.prompt_ids, e.answer_ids) for e in examples], 0)
    b["keys"] = [tuple(e.prompt_ids + e.answer_ids) for e in examples]
    return b


def test_prefix_losses_equal_full_forward_for_every_split_padded_and_not():
    model = _model()
    for examples in (EXAMPLES, EXAMPLES[:1]):  # padded, and one unpadded row
        ref = FullForward(model, "reference").losses(_batch(examples), list(range(len(examples))))
        for lowest in range(5):
            pf = PrefixForward(model, lowest)
            pf.prepare(examples, 0, torch.device("cpu"))
            assert torch.allclose(pf.losses(_batch(examples), list(range(len(examples)))), ref, atol=1e-5)


def test_buckets_cover_each_example_once_and_rows_hold_one_answer():
    lengths = [3, 9, 4, 10, 3, 30]
    groups = length_buckets(lengths)
    assert sorted(i for g in groups for i in g) == list(range(6))
    pairs = [([1] * (n - 1), [100 + i]) for i, n in enumerate(lengths)]
    for g in groups:
        b = pad_batch([pairs[i] for i in g], 0)
        for r, i in enumerate(g):
            assert b["labels"][r][b["labels"][r] != -100].tolist() == [100 + i]


def test_learned_edit_gets_no_gradient_for_the_rest_of_its_epoch():
    pool = EpochPool(["a", "a", "b"], 0.5)
    assert pool.update([0, 1, 2], [0.1, 0.2, 3.0]) == [False, False, True]
    assert pool.active([0, 1, 2]) == [2]
    pool.new_epoch()
    assert pool.active([0, 1, 2]) == [0, 1, 2]
    model = _model(initializer_range=0.3)  # logits wide enough for the losses to reach the threshold
    seen = []
    settings = TrainSettings(lr=1e-2, batch_size=3, max_epochs=2, max_steps_per_batch=30, loss_threshold=0.5)
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    train_edits(model, EXAMPLES, trainable, settings, pad_id=0, device=torch.device("cpu"), on_step=lambda step, cases: seen.append(cases))
    # within the first epoch, once an edit drops out of the trained set it never returns
    first = seen[: next((k for k in range(1, len(seen)) if len(seen[k]) > len(seen[k - 1])), len(seen))]
    assert len(first[-1]) < len(first[0])  # precondition, by construction: some edit was learned and left mid-epoch
    for k in range(1, len(first)):
        assert set(first[k]) <= set(first[k - 1])


def _knows_abc():
    """A tiny model whose layer-2 MLP was trained until edits a, b and c are learned (threshold 0.5), its trainable
    tensors, and an edit d it was never trained on."""
    model = _model(initializer_range=0.3)
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    easy = TrainSettings(lr=1e-2, batch_size=3, max_epochs=20, max_steps_per_batch=30, loss_threshold=0.5)
    assert train_edits(model, EXAMPLES, trainable, easy, pad_id=0, device=torch.device("cpu")).learned_fraction == 1.0
    return model, trainable, TrainingExample("d", [1, 3, 4], [14, 15])


@pytest.mark.parametrize("schedule", ["depth-first", "breadth-first"])
def test_an_edit_learned_when_its_epoch_starts_sits_the_epoch_out(schedule):
    """Replayed edits the model still knows cost a measuring forward, not a step: the epoch's batches are cut from the
    edits still to learn, and the report counts the edits that sat each epoch out."""
    model, trainable, new = _knows_abc()
    model.eval()
    with torch.no_grad():
        before = FullForward(model, "reference").losses(_batch(EXAMPLES + [new]), [0, 1, 2, 3])
    assert (before[:3] < 0.5).all() and before[3] > 0.5  # precondition: a, b, c learned, d not
    seen = []
    one = TrainSettings(lr=1e-2, batch_size=1, max_epochs=1, max_steps_per_batch=30, loss_threshold=0.5, schedule=schedule, sit_out=True)
    report = train_edits(model, EXAMPLES + [new], trainable, one, pad_id=0, device=torch.device("cpu"), on_step=lambda step, cases: seen.append(cases))
    assert report.sat_out == [3]
    assert seen and all(cases == ["d"] for cases in seen)  # batches of one edit: only d's was cut
    assert len(seen) == (1 if schedule == "breadth-first" else report.steps)
    assert {e.case_id: e.steps for e in report.edits} == {"a": 0, "b": 0, "c": 0, "d": len(seen)}
    assert [e.case_id for e in report.edits] == ["a", "b", "c", "d"]  # the sat-out edits are still measured and reported


def test_fresh_edits_are_not_measured_when_the_first_epoch_starts(monkeypatch):
    """A sequential batch's new edits (`fresh`) skip the first epoch's sit-out check: only the others (replayed ones)
    are measured. A fresh edit the model already knows takes that epoch's step; its step's forward measures it."""
    from mergeedit.editing import rsft

    model, trainable, new = _knows_abc()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    measured: list[list[str]] = []
    real = rsft._EditLoop.measure
    monkeypatch.setattr(rsft._EditLoop, "measure", lambda self, cases: measured.append(list(cases)) or real(self, cases))
    one = TrainSettings(lr=1e-2, batch_size=1, max_epochs=1, max_steps_per_batch=1, loss_threshold=0.5, schedule="breadth-first", sit_out=True)
    reports = {}
    for fresh in ((), ("d",), ("a", "d")):
        model.load_state_dict(state)
        measured.clear()
        reports[fresh] = train_edits(model, EXAMPLES + [new], trainable, one, pad_id=0, device=torch.device("cpu"), fresh=fresh)
        assert measured[0] == [c for c in "abcd" if c not in fresh] and measured[1:] == [list("abcd")]  # then the final check
    assert reports[()].sat_out == reports[("d",)].sat_out == [3]  # a, b and c known: d unlearned (the precondition of the test above)
    assert {e.case_id: e.steps for e in reports[("d",)].edits} == {"a": 0, "b": 0, "c": 0, "d": 1}
    assert reports[("a", "d")].sat_out == [2] and {e.case_id: e.steps for e in reports[("a", "d")].edits} == {"a": 1, "b": 0, "c": 0, "d": 1}


def test_no_threshold_or_sit_out_off_means_every_edit_trains_every_epoch():
    model = _model(initializer_range=0.3)
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    ft = TrainSettings(lr=1e-2, batch_size=1, max_epochs=3, max_steps_per_batch=1, loss_threshold=0.0, schedule="breadth-first", sit_out=True)
    report = train_edits(model, EXAMPLES, trainable, ft, pad_id=0, device=torch.device("cpu"))
    assert report.sat_out == [0, 0, 0] and report.steps == 9
    easy = TrainSettings(lr=1e-2, batch_size=3, max_epochs=20, max_steps_per_batch=30, loss_threshold=0.5)
    assert train_edits(model, EXAMPLES, trainable, easy, pad_id=0, device=torch.device("cpu")).learned_fraction == 1.0
    off = TrainSettings(lr=1e-2, batch_size=1, max_epochs=1, max_steps_per_batch=1, loss_threshold=0.5, schedule="breadth-first", sit_out=False)
    seen = []
    report = train_edits(model, EXAMPLES, trainable, off, pad_id=0, device=torch.device("cpu"), on_step=lambda step, cases: seen.append(cases))
    assert report.sat_out == [0] and sorted(c for cases in seen for c in cases) == ["a", "b", "c"]  # learned, yet stepped


def test_sit_out_learned_is_a_recipe_key():
    from mergeedit.pipeline.recipe import Recipe
    from mergeedit.pipeline.runner import train_settings

    base = {"model": {"base": "m"}, "dataset": {"format": "zsre", "path": "d.json"}}
    assert train_settings(Recipe.model_validate(base))[0].sit_out is False
    on = Recipe.model_validate({**base, "rsft": {"sit_out_learned": True}})
    assert train_settings(on)[0].sit_out is True


def test_replay_batches_contain_the_earlier_records():
    from mergeedit.editing.records import EditRecord
    from mergeedit.pipeline.runner import replay_records

    batches = [[EditRecord(f"{b}-{i}", "q", "t") for i in range(4)] for b in range(3)]
    assert replay_records(batches, 2, 1.0, 0) == batches[0] + batches[1]
    half = replay_records(batches, 2, 0.5, 0)
    assert len(half) == 4 and all(r in batches[0] + batches[1] for r in half)
    assert replay_records(batches, 0, 1.0, 0) == []


def test_chat_form_has_no_system_prompt_unless_asked():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mergeedit.editing.prompts import chat_prompt

    tk = Tokenizer(models.WordLevel({"<pad>": 0, "x": 1}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<pad>")
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<sys>DEFAULT SYSTEM</sys>{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_prompt(tok, "Q?") == "<user>Q?</user><assistant>"
    assert chat_prompt(tok, "Q?", "Be brief.") == "<system>Be brief.</system><user>Q?</user><assistant>"


def test_prefix_cache_kept_across_epochs_and_calls_rebuilt_only_when_a_frozen_layer_changes():
    model = _model()
    cpu = torch.device("cpu")
    pf = PrefixForward(model, 2)
    calls = []
    run_prefix = pf._prefix
    pf._prefix = lambda ids, mask: calls.append(ids.shape[0]) or run_prefix(ids, mask)
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n or "layers.3.mlp" in n]
    settings = TrainSettings(lr=1e-2, batch_size=3, max_epochs=3, max_steps_per_batch=2, loss_threshold=0.0)
    train_edits(model, EXAMPLES, trainable, settings, pad_id=0, device=cpu, forward=pf)
    assert sum(calls) == len(EXAMPLES)  # each example's prefix once, for all three epochs
    cached = dict(pf.hidden)
    # a second sequential batch (chained editing): training changed layers 2-3 only, so nothing is recomputed
    train_edits(model, EXAMPLES, trainable, settings, pad_id=0, device=cpu, forward=pf)
    assert sum(calls) == len(EXAMPLES) and all(pf.hidden[k] is v for k, v in cached.items())
    # a merged delta that writes a layer below L (as load_delta does): the cache is rebuilt and matches a fresh one
    below = "model.layers.1.mlp.down_proj.weight"
    model.load_state_dict({below: dict(model.named_parameters())[below].detach() + 0.5}, strict=False)
    pf.prepare(EXAMPLES, 0, cpu)
    assert sum(calls) == 2 * len(EXAMPLES)
    fresh = PrefixForward(model, 2)
    fresh.prepare(EXAMPLES, 0, cpu)
    for k, v in cached.items():
        assert not torch.allclose(pf.hidden[k], v) and torch.equal(pf.hidden[k], fresh.hidden[k])


def test_gradients_are_none_after_every_step():
    model = _model()
    trainable = [n for n, _ in model.named_parameters() if "mlp" in n]
    checked = []

    def no_grads(step, cases):
        checked.append(all(p.grad is None for p in model.parameters()))

    settings = TrainSettings(lr=1e-2, batch_size=2, max_epochs=2, max_steps_per_batch=3, loss_threshold=0.0)
    train_edits(model, EXAMPLES, trainable, settings, pad_id=0, device=torch.device("cpu"), on_step=no_grads)
    assert len(checked) == 2 * 2 * 3 and all(checked)  # two epochs of two batches ({2 edits}, {1 edit}), 3 steps each


def test_generation_is_batched_left_padded_and_reuses_the_kv_cache():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mergeedit.evaluation.metrics import generate_answers

    model = _model()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 50)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<pad>")
    prompts = ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9"]
    seen = []

    def record(module, args, kwargs):
        seen.append((tuple(kwargs["input_ids"].shape), kwargs["attention_mask"].tolist()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        batched = generate_answers(model, tok, prompts, max_new_tokens=4, chat_template=False, batch_size=3)
    finally:
        handle.remove()
    # one batch of 3: the first call reads the left-padded prompts, every later call only the newest token (KV cache)
    assert seen[0] == ((3, 5), [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])  # longest first
    assert len(seen) == 4 and all(shape == (3, 1) for shape, _ in seen[1:])
    single = [generate_answers(model, tok, [p], max_new_tokens=4, chat_template=False, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_free_heap_memory_leaves_the_resident_set_between_stages():
    """glibc keeps freed blocks below its mmap threshold in the heap, and free() returns only free space at the heap's
    top. Built here: 64 MiB of 96 KiB blocks, written (resident), then all but the highest freed: that one pins them
    below the top, and the resident set keeps them. `release_free_memory` gives them back (the run calls it before
    every stage: the next test)."""
    import ctypes

    from mergeedit.core.memory import current_rss, release_free_memory

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim"):
        assert release_free_memory() is False
        pytest.skip("no malloc_trim in this C library (not glibc)")
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    release_free_memory()
    before = current_rss()
    blocks = sorted(libc.malloc(96 << 10) for _ in range(683))  # 64 MiB; 96 KiB is under the mmap threshold's 128 KiB floor
    for b in blocks:
        ctypes.memset(b, 1, 96 << 10)
    pin = blocks.pop()  # the highest: the others' free space is not at the heap's top
    for b in blocks:
        libc.free(b)
    held = current_rss()
    assert held - before > 48 << 20  # precondition: freed, still resident
    assert release_free_memory() is True
    assert held - current_rss() > 48 << 20
    libc.free(pin)


def test_run_summary_shows_each_stage_peak_rss_and_the_evaluation_share(tmp_path, tiny_model, run_cli, monkeypatch):  # noqa: F811
    from test_pipeline import _recipe

    from mergeedit.pipeline import run_dir
    from mergeedit.pipeline.runner import evaluation_share, is_evaluation_stage

    released = []  # the free heap memory goes back to the system before each stage that runs (not a cached one)
    monkeypatch.setattr(run_dir, "release_free_memory", lambda: released.append(1))
    recipe = _recipe(tmp_path, tiny_model, merge=None, rsft={"max_epochs": 1, "max_steps_per_batch": 1})
    got = run_cli("run", recipe)
    assert got.code == 0, got.stderr
    assert len(released) == got.stdout.count("\nstage ") + got.stdout.startswith("stage ") > 0
    stages = ["pre-eval", "rsft-000", "export", "eval"]
    for name in stages:
        line = next(x for x in got.stdout.splitlines() if x.startswith(f"stage {name}: "))
        assert line.endswith(" GiB") and "peak RSS" in line
        assert float(line.split("peak RSS ")[1].split()[0]) > 0  # a measured figure, not a placeholder
    assert [n for n in stages if is_evaluation_stage(n)] == ["pre-eval", "eval"]
    assert "evaluation: " in got.stdout and "training time: prefix" in got.stdout
    steps_line = next(x for x in got.stdout.splitlines() if x.startswith("training steps: "))
    assert int(steps_line.split()[2].rstrip(";")) > 0 and "sat out" in steps_line
    from mergeedit.pipeline.runner import RunResult

    result = RunResult(tmp_path, tmp_path, 1, 1, [], None, None, seconds=10.0, stage_profile={"pre-eval": {"seconds": 1.0}, "rsft-000": {"seconds": 6.0}, "eval": {"seconds": 1.5}, "curve-000": {"seconds": 0.5}})
    assert evaluation_share(result) == (3.0, 0.3)
    from mergeedit.pipeline.runner import outside_stages

    assert outside_stages(result) == 10.0 - 9.0 and "outside the stages (loading the model" in got.stdout


def test_generation_asks_in_the_trained_chat_form_without_the_default_system_prompt():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mergeedit.editing.prompts import chat_pair
    from mergeedit.evaluation.metrics import _generation_inputs

    words = ["<pad>", "SYS", "DEFAULT", "system", "user", "assistant", "x", "brief"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<pad>")
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}SYS DEFAULT {% endif %}"
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant{% endif %}"
    )
    ids = {w: i for i, w in enumerate(words)}
    assert _generation_inputs(tok, ["x"], True) == [[ids["user"], ids["x"], ids["assistant"]]]
    assert _generation_inputs(tok, ["x"], True, "brief") == [[ids["system"], ids["brief"], ids["user"], ids["x"], ids["assistant"]]]
    assert _generation_inputs(tok, ["x"], True) == [chat_pair(tok, "x", "x")[0]]  # the prompt R-SFT trains on


def test_teacher_forced_scoring_runs_the_output_layer_only_from_the_first_scored_position():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mergeedit.evaluation.metrics import teacher_forced_tokens

    model = _model(initializer_range=0.3)
    tk = Tokenizer(models.WordLevel({"<pad>": 0, **{f"w{i}": i for i in range(1, 50)}}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<pad>")
    prompts, targets = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10", "w11 w12 w13 w14 w15"], ["w20 w21", "w22", "w23 w24 w25"]
    rows = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: rows.append(tuple(args[0].shape[:2])))
    try:
        got = teacher_forced_tokens(model, tok, prompts, targets, batch_size=3)
    finally:
        handle.remove()
    # right padding, widths 8/5/8: the earliest position predicting a target token is 3 (the 4-word prompt), so 8 - 3 columns
    assert rows == [(3, 5)]
    with torch.no_grad():
        for p, t, pred in zip(prompts, targets, got):
            ids = tok(p + " " + t)["input_ids"]
            start = len(p.split())
            assert model(torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1].argmax(-1).tolist() == pred


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_optimizer_step_is_the_textbook_adam_update(name):
    """The fused Adam/AdamW the loop builds takes the same two steps as the formula written out in float64."""
    from mergeedit.editing.rsft import TrainSettings, _make_optimizer

    torch.manual_seed(0)
    w0 = torch.randn(7, 5)
    grads = [torch.randn(7, 5), torch.randn(7, 5)]
    s = TrainSettings(lr=1e-2, weight_decay=0.1, optimizer=name)
    p = torch.nn.Parameter(w0.clone())
    opt = _make_optimizer([p], s)
    assert opt.defaults.get("fused") is True  # the fast path is the one tested
    for g in grads:
        p.grad = g.clone()
        opt.step()
    w, m, v = w0.double(), torch.zeros(7, 5, dtype=torch.float64), torch.zeros(7, 5, dtype=torch.float64)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if name == "adamw":
            w = w * (1 - s.lr * s.weight_decay)
        else:
            g = g + s.weight_decay * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - s.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(p.detach().double(), w, rtol=1e-6, atol=1e-7)


def test_a_step_backpropagates_bucket_by_bucket_with_the_whole_batch_gradient():
    """Each length bucket is backpropagated on its own (one bucket's activations at a time); the update equals one
    backward of the mean answer loss over the whole batch (plain SGD, so the update is -lr * gradient)."""
    examples = EXAMPLES + [TrainingExample("d", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [16, 17]), TrainingExample("e", [1] + list(range(2, 40)), [40, 41])]
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in examples]
    assert len(step_buckets(lengths)) >= 2  # precondition, by construction: the step spans several buckets
    trainable_of = lambda m: [n for n, _ in m.named_parameters() if ".mlp." in n]  # noqa: E731
    reference = _model()
    ref_params = dict(reference.named_parameters())
    names = trainable_of(reference)
    for n, p in ref_params.items():
        p.requires_grad_(n in names)
    loss = FullForward(reference, "reference").losses(_batch(examples), list(range(len(examples)))).mean()
    loss.backward()
    expected = {n: (ref_params[n] - 0.1 * ref_params[n].grad).detach() for n in names}

    model = _model()
    backwards = []
    settings = TrainSettings(lr=0.1, optimizer="sgd", batch_size=len(examples), max_epochs=1, max_steps_per_batch=1, loss_threshold=0.0)
    hook = model.lm_head.register_full_backward_hook(lambda m, gi, go: backwards.append(m))
    try:
        train_edits(model, examples, trainable_of(model), settings, pad_id=0, device=torch.device("cpu"))
    finally:
        hook.remove()
    assert len(backwards) == len(step_buckets(lengths))  # one backward per bucket
    got = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n].detach(), expected[n], rtol=1e-5, atol=1e-7)


def test_the_check_after_an_epoch_runs_only_when_it_can_stop_training(monkeypatch):
    """Step losses (each before its step's update) stand in for the per-epoch check; every edit is measured again only
    when they say all are learned, and after the last epoch, so the report's losses are always fresh."""
    from mergeedit.editing import rsft

    calls = []
    real = rsft._EditLoop.measure_all
    monkeypatch.setattr(rsft._EditLoop, "measure_all", lambda self: (calls.append(self.epochs), real(self))[1])
    model = _model()
    never = TrainSettings(lr=1e-6, batch_size=3, max_epochs=4, max_steps_per_batch=1, loss_threshold=0.01)
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    report = train_edits(model, EXAMPLES, trainable, never, pad_id=0, device=torch.device("cpu"))
    assert report.epochs == 4 and calls == [4]  # nothing could stop training: measured once, after the last epoch
    assert all(not e.learned for e in report.edits)
    calls.clear()
    model = _model(initializer_range=0.3)
    easy = TrainSettings(lr=1e-2, batch_size=3, max_epochs=20, max_steps_per_batch=30, loss_threshold=0.5)
    report = train_edits(model, EXAMPLES, trainable, easy, pad_id=0, device=torch.device("cpu"))
    assert report.learned_fraction == 1.0 and report.epochs < 20  # precondition: learned before the last epoch
    assert calls and calls[-1] == report.epochs  # training stopped on a fresh measurement
    fresh = {e.case_id: e.final_loss for e in report.edits}
    model.eval()
    with torch.no_grad():
        ref = FullForward(model, "reference").losses(_batch(EXAMPLES), [0, 1, 2])
    assert fresh == pytest.approx({e.case_id: float(v) for e, v in zip(EXAMPLES, ref)}, rel=1e-5)
