"""Retain regularisation (editing/retain.py) and the shipped retain set (data/retain/): the KL term is exactly 0 on
the unedited model, equals the plain KL formula, its gradient pulls a perturbed weight back to the base, and the retain
set never overlaps the drift evaluation set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeedit.core.errors import MergeEditError
from mergeedit.editing.retain import (
    DEFAULT_RETAIN_SET,
    DRIFT_EVAL_TEXTS,
    RETAIN_ANSWERS,
    RETAIN_CHAT_QUESTIONS,
    RETAIN_PROSE,
    RETAIN_QUESTIONS,
    RetainKL,
    coarsened_kl,
    load_retain_texts,
)
from mergeedit.models.toy import LlamaShape, build_llama

SHAPE = LlamaShape(hidden=16, intermediate=32, layers=2, heads=2, kv_heads=1, vocab=48)
SEQS = [[1, 5, 9, 13, 2], [1, 7, 7, 30, 31, 40, 3], [1, 44], [1, 20, 21, 22], [1, 3, 5, 7, 9, 11, 13, 15]]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("retain") / "toy", SHAPE, shards=1)


def load(folder: Path, dtype=torch.float64):
    from transformers import LlamaForCausalLM

    # toy weights (std 0.02) give near-uniform outputs; scale the output layer so the distributions are peaked
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
    return model


# -- the shipped set ------------------------------------------------------------------------------------------------
def test_shipped_retain_set_shares_no_prompt_and_no_text_with_the_drift_set():
    retain, drift = jsonl(RETAIN_PROSE), jsonl(DRIFT_EVAL_TEXTS)
    assert len(retain) >= 200 and len(drift) == 40
    assert all(r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"]) for r in retain)
    retain_prompts, drift_prompts = {r["prompt"] for r in retain}, {d["prompt"] for d in drift}
    assert len(retain_prompts) == len(retain)
    assert not retain_prompts & drift_prompts
    assert not {r["text"] for r in retain} & {d["text"] for d in drift}
    # no retain text continues a drift prompt either (the drift texts begin with their prompts)
    assert not [r for r in retain for p in drift_prompts if r["text"].startswith(p)]
    loaded = load_retain_texts(RETAIN_PROSE)  # checks the shipped drift set itself
    assert len(loaded.texts) == len(retain)


def test_the_drift_evaluation_file_is_refused_as_retain_set(tmp_path):
    with pytest.raises(MergeEditError) as exc:
        load_retain_texts(DRIFT_EVAL_TEXTS)
    assert "drift" in str(exc.value) and "\n" not in str(exc.value)
    # a copy elsewhere, or a user file holding one drift prompt, is refused too
    copy = tmp_path / "mine.jsonl"
    copy.write_text(DRIFT_EVAL_TEXTS.read_text())
    with pytest.raises(MergeEditError, match="shares 40 prompt"):
        load_retain_texts(copy)
    one = jsonl(DRIFT_EVAL_TEXTS)[3]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "A fresh opening", "text": "A fresh opening of mine."}) + "\n" + json.dumps({"prompt": one["prompt"], "text": one["prompt"] + " my words"}) + "\n")
    with pytest.raises(MergeEditError, match="shares 1 prompt") as exc:
        load_retain_texts(mixed)
    assert "\n" not in str(exc.value)


def test_a_users_retain_file_is_read_and_checked_against_the_runs_own_drift_file(tmp_path):
    mine = tmp_path / "retain.jsonl"
    mine.write_text(json.dumps({"prompt": "p one", "text": "p one and more"}) + "\n\n" + json.dumps({"text": "only a text"}) + "\n")
    got = load_retain_texts(mine)
    assert got.prompts == ["p one"] and got.texts == ["p one and more", "only a text"] and got.source == str(mine)
    their_drift = tmp_path / "drift.jsonl"
    their_drift.write_text(json.dumps({"prompt": "other", "text": "only a text"}) + "\n")
    with pytest.raises(MergeEditError, match="shares 1 text"):
        load_retain_texts(mine, drift_texts=[their_drift])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no text"}) + "\n")
    with pytest.raises(MergeEditError, match=r"bad.jsonl:1: .*'text'"):
        load_retain_texts(bad)


def test_shipped_questions_are_not_the_evaluations_probes_and_name_no_edited_subject():
    """data/retain/questions.jsonl: question + the model's answer; no ZsRE locality probe, edit prompt, paraphrase or
    subject of the shipped records, and nothing of the drift set."""
    import re

    questions = jsonl(RETAIN_QUESTIONS)
    assert len(questions) == 200 and len({q["prompt"] for q in questions}) == 200
    assert all(q["text"].startswith(q["prompt"] + " ") and len(q["text"]) > len(q["prompt"]) + 1 for q in questions)
    zsre = json.loads((Path(__file__).resolve().parents[1] / "data" / "zsre" / "zsre_mend_eval_first1000.json").read_text())
    assert len(zsre) == 1000
    probes = {x.lower().removeprefix("nq question:").strip() for r in zsre for x in (r["loc"], r["src"], r["rephrase"])}
    asked = {q["prompt"].lower().strip() for q in questions}
    assert len(probes) > 2000 and not asked & probes
    subjects = {r["subject"].lower() for r in zsre}
    named = [(s, q) for q in asked for s in subjects if re.search(r"\b" + re.escape(s) + r"\b", q)]
    assert not named
    drift = jsonl(DRIFT_EVAL_TEXTS)
    assert not asked & {d["prompt"].lower() for d in drift} and not {q["text"] for q in questions} & {d["text"] for d in drift}


def test_shipped_answers_name_nothing_the_evaluation_asks_or_answers():
    """data/retain/answers.jsonl: question + a named-entity answer; no ZsRE locality probe, edit prompt or paraphrase,
    no capitalised subject, edit target or locality answer of the shipped records in either part, nothing of the drift
    set, and it is exactly what make_answers.py writes."""
    import importlib.util
    import re

    answers = jsonl(RETAIN_ANSWERS)
    assert len(answers) == 159 and len({a["prompt"] for a in answers}) == 159
    assert all(a["text"].startswith(a["prompt"] + " ") and len(a["text"]) > len(a["prompt"]) + 1 for a in answers)
    zsre = json.loads((Path(__file__).resolve().parents[1] / "data" / "zsre" / "zsre_mend_eval_first1000.json").read_text())
    probes = {x.lower().removeprefix("nq question:").strip() for r in zsre for x in (r["loc"], r["src"], r["rephrase"])}
    assert not {a["prompt"] for a in answers} & probes
    names = {n.lower() for r in zsre for n in (r["subject"], r["alt"], r["loc_ans"]) if len(n) >= 3 and any(c.isupper() for c in n)}
    assert {"hugo weaving", "billy idol"} <= names  # the check reads the real names (locality answers among them)
    hits = [(n, a["text"]) for a in answers for n in names if re.search(r"\b" + re.escape(n) + r"\b", a["text"].lower())]
    assert not hits
    drift = jsonl(DRIFT_EVAL_TEXTS)
    assert not {a["prompt"] for a in answers} & {d["prompt"] for d in drift} and not {a["text"] for a in answers} & {d["text"] for d in drift}
    spec = importlib.util.spec_from_file_location("make_answers", RETAIN_ANSWERS.parent / "make_answers.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert [(a["prompt"], a["text"]) for a in answers] == [(q, f"{q} {x}") for q, x in make.kept_pairs(zsre)]


def test_the_default_retain_set_is_the_prose_the_answers_and_the_chat_questions():
    default = load_retain_texts()
    assert DEFAULT_RETAIN_SET == (RETAIN_PROSE, RETAIN_ANSWERS, RETAIN_CHAT_QUESTIONS)
    assert default.texts == [r["text"] for r in jsonl(RETAIN_PROSE)] + [a["text"] for a in jsonl(RETAIN_ANSWERS)]
    assert default.chat == [(c["question"], c["answer"]) for c in jsonl(RETAIN_CHAT_QUESTIONS)] and len(default) == 210 + 159 + 200
    assert default.source == f"{RETAIN_PROSE} + {RETAIN_ANSWERS} + {RETAIN_CHAT_QUESTIONS}"


def test_several_retain_files_are_read_in_order_and_each_is_checked(tmp_path):
    both = load_retain_texts([RETAIN_PROSE, RETAIN_QUESTIONS])
    prose, questions = jsonl(RETAIN_PROSE), jsonl(RETAIN_QUESTIONS)
    assert both.texts == [r["text"] for r in prose] + [q["text"] for q in questions]
    assert both.prompts == [r["prompt"] for r in prose] + [q["prompt"] for q in questions]
    assert both.source == f"{RETAIN_PROSE} + {RETAIN_QUESTIONS}"
    one = jsonl(DRIFT_EVAL_TEXTS)[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": one["prompt"], "text": one["prompt"] + " mine"}) + "\n")
    with pytest.raises(MergeEditError, match=r"bad.jsonl: shares 1 prompt"):
        load_retain_texts([RETAIN_QUESTIONS, bad])
    with pytest.raises(MergeEditError, match="empty"):
        load_retain_texts([])


# -- the KL term ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [None, 5])
def test_kl_is_exactly_zero_before_the_first_step(toy_folder, top_k):
    model = load(toy_folder, torch.float32)
    retain = RetainKL.from_token_ids(model, SEQS, weight=3.0, top_k=top_k, batch_size=2)
    assert len(retain) == 3 and retain.positions == sum(len(s) - 1 for s in SEQS)
    model.train()
    for step in range(len(retain)):
        loss = retain(model, step)
        assert loss.requires_grad and float(loss.detach()) == 0.0


def test_full_kl_equals_the_plain_formula_and_top_k_never_exceeds_it(toy_folder):
    base = load(toy_folder)
    full = RetainKL.from_token_ids(base, SEQS, top_k=None, batch_size=8)
    top = RetainKL.from_token_ids(base, SEQS, top_k=4, batch_size=8)
    post = load(toy_folder)
    with torch.no_grad():
        post.model.layers[1].mlp.down_proj.weight.add_(0.5 * torch.randn(post.model.layers[1].mlp.down_proj.weight.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    # plain reference: sum_v p(v) (log p(v) - log q(v)) at every predicted position, one sequence at a time
    with torch.no_grad():
        terms = []
        for s in SEQS:
            ids = torch.tensor([s])
            p = torch.log_softmax(base(ids).logits[0, :-1], -1)
            q = torch.log_softmax(post(ids).logits[0, :-1], -1)
            terms.append((p.exp() * (p - q)).sum(-1))
        reference = torch.cat(terms).mean()
        got = full.kl(post, 0)
        assert float(reference) > 1e-3
        assert torch.allclose(got, reference, rtol=1e-9, atol=0)
        assert 0 < float(top.kl(post, 0)) <= float(got)


def test_coarsened_kl_by_hand():
    # base p = (0.5, 0.3, 0.2) keeping the top 1 token: buckets (0.5, 0.5); current q = (0.25, 0.25, 0.5): (0.25, 0.75)
    base = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    cur = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64).log()
    idx = torch.tensor([[0]])
    rest = torch.tensor([0.5], dtype=torch.float64).log()
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25, dtype=torch.float64)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75, dtype=torch.float64))
    assert torch.allclose(coarsened_kl(idx, base[:, :1], rest, cur), expected.reshape(1), rtol=1e-12, atol=0)


def test_gradient_pulls_a_perturbed_weight_back_toward_the_base(toy_folder):
    base = load(toy_folder)
    retain = RetainKL.from_token_ids(base, SEQS, weight=1.0, top_k=None, batch_size=8)
    model = load(toy_folder)
    w = model.model.layers[0].mlp.down_proj.weight
    w0 = w.detach().clone()
    delta = 0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        w.add_(delta)
    kl_tensor = retain(model, 0)
    (grad,) = torch.autograd.grad(kl_tensor, [w])
    kl = float(kl_tensor.detach())
    # near the base KL(d) = d'Fd / 2 + O(|d|^3) and grad = F d + O(|d|^2), so <grad, d> = 2 KL to first order:
    # the gradient points along the perturbation, i.e. a descent step moves the weight back toward the base
    assert kl > 0
    assert float((grad * delta).sum()) == pytest.approx(2 * kl, rel=0.05)
    # and plain gradient descent on the term alone shrinks the distance to the base, monotonically
    opt = torch.optim.SGD([w], lr=kl / float(grad.pow(2).sum()))  # a step that would remove ~half the KL
    distances = [float((w.detach() - w0).norm())]
    for _ in range(5):
        opt.zero_grad()
        retain(model, 0).backward()
        opt.step()
        distances.append(float((w.detach() - w0).norm()))
    assert all(b < a for a, b in zip(distances, distances[1:]))
    assert float(retain(model, 0).detach()) < kl


def test_build_from_texts_and_memory_bound(toy_folder):
    class Chars:
        pad_token_id = 0

        def __call__(self, text):
            return {"input_ids": [1] + [3 + ord(c) % 40 for c in text]}

    model = load(toy_folder, torch.float32)
    retain = RetainKL.build(model, Chars(), ["abc", "hello there", "xy"], top_k=3, batch_size=2, max_tokens=5)
    assert retain.positions == 3 + 4 + 2 and len(retain) == 2
    assert retain.reference_bytes == 9 * (3 * 8 + 3 * 4 + 4)
    assert retain.describe()["top_k"] == 3
    with pytest.raises(MergeEditError, match="GiB"):
        RetainKL.build(model, Chars(), ["abc"] * 10, top_k=None, max_reference_bytes=100)
    with pytest.raises(MergeEditError, match="at least 2"):
        RetainKL.build(model, Chars(), [""])


@pytest.mark.parametrize("top_k", [None, 4])
def test_agreement_is_the_share_of_positions_keeping_the_base_argmax(toy_folder, top_k):
    """merge.auto's locality probe: 1 and KL 0 for the base itself; after a change, exactly the plain count of
    positions whose argmax is unchanged (each sequence run alone, unpadded), over every position of every text."""
    model = load(toy_folder)
    retain = RetainKL.from_token_ids(model, SEQS, weight=0.0, top_k=top_k, batch_size=2)
    assert retain.agreement(model) == {"retain_loc": 1.0, "retain_kl": 0.0}
    with torch.no_grad():
        before = [model(input_ids=torch.tensor([s])).logits[0, :-1].argmax(-1) for s in SEQS]
        torch.manual_seed(1)
        model.model.layers[1].mlp.down_proj.weight.add_(torch.randn_like(model.model.layers[1].mlp.down_proj.weight) * 2.0)
        after = [model(input_ids=torch.tensor([s])).logits[0, :-1].argmax(-1) for s in SEQS]
    kept = sum(int((a == b).sum()) for a, b in zip(after, before))
    total = sum(len(s) - 1 for s in SEQS)
    assert 0 < kept < total  # precondition: the change moved some argmaxes and not all (float64, wide logit gaps)
    got = retain.agreement(model)
    assert got["retain_loc"] == kept / total and got["retain_kl"] > 0


def test_chat_retain_lines_are_read_in_the_edits_chat_form(tmp_path):
    """data/retain/chat_questions.jsonl holds questions.jsonl's pairs as {"question", "answer"}. Such a line is
    tokenized exactly as R-SFT tokenizes an edit (editing.prompts.chat_pair: user turn without the template's default
    system prompt, assistant header, answer, EOS), or as the raw pair + EOS without a chat template; the drift check
    still sees its question and its plain text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mergeedit.editing.prompts import chat_pair, raw_pair_eos
    from mergeedit.editing.retain import retain_token_ids

    chat, plain = jsonl(RETAIN_CHAT_QUESTIONS), jsonl(RETAIN_QUESTIONS)
    assert [(c["question"], c["question"] + " " + c["answer"]) for c in chat] == [(q["prompt"], q["text"]) for q in plain]
    both = load_retain_texts([RETAIN_PROSE, RETAIN_CHAT_QUESTIONS])
    assert len(both) == 210 + 200 and both.texts == [r["text"] for r in jsonl(RETAIN_PROSE)] and both.chat[0] == (chat[0]["question"], chat[0]["answer"])

    words = ["<pad>", "<s>", "</s>", "who", "wrote", "it", "me", "<u>", "<a>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "it", "text": "it wrote me"}) + "\n" + json.dumps({"question": "who wrote it", "answer": "me"}) + "\n")
    texts = load_retain_texts(mixed)
    assert texts.prompts == ["it", "who wrote it"] and texts.plain() == ["it wrote me", "who wrote it me"]
    p, a = raw_pair_eos(tok, "who wrote it", "me")
    assert retain_token_ids(tok, texts, 64) == [[5, 4, 6], p + a] and p + a == [3, 4, 5, 6, 2]
    tok.chat_template = "{% for m in messages %}<u> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <a>{% endif %}"
    p, a = chat_pair(tok, "who wrote it", "me")
    assert p == [7, 3, 4, 5, 8] and a == [6, 2]  # the edits' chat form: user turn, assistant header, answer, EOS
    assert retain_token_ids(tok, texts, 64) == [[5, 4, 6], p + a] and retain_token_ids(tok, texts, 3)[1] == [7, 3, 4]
    # a run with `dataset.system_prompt` holds its chat answers in the form it trains: with that system turn
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}<s> {{ m['content'] }} {% else %}<u> {{ m['content'] }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %} <a>{% endif %}")
    assert chat_pair(tok, "who wrote it", "me") == ([7, 3, 4, 5, 8], [6, 2])
    assert retain_token_ids(tok, texts, 64, system_prompt="it")[1] == [1, 5, 7, 3, 4, 5, 8, 6, 2] == sum(chat_pair(tok, "who wrote it", "me", "it"), [])
    one = jsonl(DRIFT_EVAL_TEXTS)[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": one["prompt"], "answer": "mine"}) + "\n")
    with pytest.raises(MergeEditError, match=r"bad.jsonl: shares 1 prompt"):
        load_retain_texts(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"question": "who"}) + "\n")
    with pytest.raises(MergeEditError, match=r"empty.jsonl:1: .*'question' and 'answer'"):
        load_retain_texts(empty)


def test_only_the_mini_batches_a_run_can_read_get_a_base_side(toy_folder):
    """Step s reads mini-batch s mod count; a training call over E edits takes at most max_steps(settings, E) steps
    (epochs x batches per epoch x steps per batch). `max_groups` builds only the first that many mini-batches: each
    equals the full build's, and so does the KL every step below the bound reads."""
    from mergeedit.editing.rsft import TrainSettings, max_steps

    assert max_steps(TrainSettings(batch_size=10, max_epochs=15, schedule="breadth-first"), 20) == 15 * 2 * 1
    assert max_steps(TrainSettings(batch_size=10, max_epochs=5, max_steps_per_batch=25, schedule="depth-first"), 101) == 5 * 11 * 25
    model = load(toy_folder)
    full = RetainKL.from_token_ids(model, SEQS, batch_size=2, top_k=8)
    some = RetainKL.from_token_ids(model, SEQS, batch_size=2, top_k=8, max_groups=2)
    assert len(full) == 3 and len(some) == 2
    for a, b in zip(some.groups, full.groups):
        assert all(torch.equal(x, y) for x, y in zip((a.idx, a.logp, a.rest, a.rows, a.cols), (b.idx, b.logp, b.rest, b.rows, b.cols)))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.05)
        assert [float(some.kl(model, s)) for s in range(2)] == [float(full.kl(model, s)) for s in range(2)] and float(some.kl(model, 1)) > 0
    with pytest.raises(MergeEditError, match="max_groups"):
        RetainKL.from_token_ids(model, SEQS, max_groups=0)
