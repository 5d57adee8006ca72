"""Edit metrics on hand-made cases: a tiny Llama whose argmax is known, a word-level tokenizer built here, no download.

The "shift" model: every layer's output projections are zero, so the residual stream is the token's embedding; the
embeddings are one-hot and lm_head maps token i to token (i + 1) % V. Its greedy next token is therefore the next
word of WORDS, whatever the context:

    <s> -> the -> capital -> of -> france -> is -> paris -> . -> rome -> \\n -> berlin -> a -> an -> apple -> old -> </s>
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mergeedit.core.errors import MergeEditError
from mergeedit.editing.records import EditRecord, Probe
from mergeedit.editing.tokens import encode_prompt_target
from mergeedit.evaluation import metrics
from mergeedit.evaluation.evaluate import EvalResult, evaluate_edits, reference_outputs
from mergeedit.evaluation.metrics import (
    exact_match,
    generate_answers,
    locality,
    ngram_entropy,
    squad_normalize,
    teacher_forced_accuracy,
    teacher_forced_tokens,
    text_ngram_entropy,
)

WORDS = ["<pad>", "<s>", "the", "capital", "of", "france", "is", "paris", ".", "rome", "\n", "berlin", "a", "an", "apple", "old", "</s>"]
ID = {w: i for i, w in enumerate(WORDS)}
V = len(WORDS)
HIDDEN = 32
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} is{% endif %}"


def make_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(ID, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ID["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=V,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=ID["<pad>"],
        bos_token_id=ID["<s>"],
        eos_token_id=ID["</s>"],
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


def shift_model(overrides: dict[str, str] | None = None):
    """Greedy next token = the next word of WORDS; `overrides` {word: next word} rewires some of them."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.zeros(V, HIDDEN)
        emb[torch.arange(V), torch.arange(V)] = 1.0
        model.model.embed_tokens.weight.copy_(emb)
        head = torch.zeros(V, HIDDEN)
        for i in range(V):
            head[(i + 1) % V, i] = 1.0
        for word, nxt in (overrides or {}).items():
            head[ID[nxt], ID[word]] = 2.0  # beats the shift's 1.0
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: intra-op threads only add overhead (and fight over a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def base():
    return shift_model()


@pytest.fixture(scope="module")
def edited():
    """The 'edit': after "paris" the model now says "berlin" instead of "."."""
    return shift_model({"paris": "berlin"})


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def random_model(request):
    """Tiny random models whose outputs depend on context and position (for the padding checks): Llama (RoPE,
    relative) and GPT-2 (learned absolute positions, where left padding needs explicit position ids)."""
    torch.manual_seed(1234)
    if request.param == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config(initializer_range=0.5)).eval()
    return gpt2_model()


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    config = GPT2Config(
        vocab_size=V,
        n_positions=64,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        initializer_range=0.5,
        bos_token_id=ID["<s>"],
        eos_token_id=ID["</s>"],
        pad_token_id=ID["<pad>"],
    )
    return GPT2LMHeadModel(config).eval()


# ---------------------------------------------------------------------------------------------------------------
# Tokenization convention


def test_target_tokens_are_those_of_the_full_string(tok):
    ids, start, stop = encode_prompt_target(tok, "the capital of", "france is paris")
    assert ids == [ID[w] for w in ["<s>", "the", "capital", "of", "france", "is", "paris"]]
    assert (start, stop) == (4, 7)


def test_space_carrying_tokens_count_as_target():
    """SentencePiece-style tokens carry the joining space ("▁paris"): the token is the target's, boundaries unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "▁the", "▁capital", "▁of", "▁paris", "▁is"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    sp = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    ids, start, stop = encode_prompt_target(sp, "the capital of", "paris is")
    assert ids == [1, 2, 3, 4, 5] and (start, stop) == (3, 5)


def test_slow_tokenizer_fallback_matches_offsets(tok):
    class Slow:  # no offsets: the common-prefix rule must give the same boundaries
        is_fast = False
        all_special_ids = tok.all_special_ids

        def __call__(self, text, **kw):
            return tok(text, **kw)

    for prompt, target in [("the capital of", "france is paris"), ("a", "an apple old")]:
        assert encode_prompt_target(Slow(), prompt, target) == encode_prompt_target(tok, prompt, target)


def test_empty_target_is_an_error(tok):
    with pytest.raises(MergeEditError, match="no tokens"):
        encode_prompt_target(tok, "the capital of", "")


# ---------------------------------------------------------------------------------------------------------------
# Teacher-forced accuracy and locality


def test_teacher_forced_accuracy_full_partial_zero(base, tok):
    prompts = ["the capital of", "the capital of", "the capital of", "a", "is"]
    targets = ["france is paris", "france is berlin", "berlin apple", "an apple old", "paris rome"]
    got = teacher_forced_accuracy(base, tok, prompts, targets, batch_size=2)
    assert got[0] == 1.0
    assert got[1] == pytest.approx(2 / 3) and round(got[1], 4) == 0.6667
    assert got[2] == 0.0
    assert got[3] == 1.0
    assert got[4] == 0.5  # "paris" right, then "." predicted where "rome" stands
    # The argmax per target position (prediction at t-1 for the token at t).
    assert teacher_forced_tokens(base, tok, ["the capital of"], ["berlin apple"], batch_size=1) == [[ID["france"], ID["a"]]]


def test_edited_model_partial_credit(edited, tok):
    assert teacher_forced_accuracy(edited, tok, ["the capital of france is"], ["paris ."], batch_size=4) == [0.5]
    assert teacher_forced_accuracy(edited, tok, ["is"], ["paris berlin"], batch_size=4) == [1.0]


MARGIN = 1e-2  # logit gap between the best and the second-best token, far above float32 rounding of these logits


def _gaps(model, seqs: list[list[int]], positions: list[range]) -> float:
    """The smallest gap between the top two logits at the given positions, each sequence run alone. A batch changes
    the logits only by rounding (other row counts pick other matrix kernels): far below MARGIN, so where every gap
    is at least MARGIN the batched argmax is the single one by construction, on any processor."""
    gaps = []
    with torch.no_grad():
        for seq, where in zip(seqs, positions):
            logits = model(input_ids=torch.tensor([seq])).logits[0, list(where)]
            top = logits.topk(2, dim=-1).values
            gaps.append(float((top[:, 0] - top[:, 1]).min()))
    return min(gaps)


def _teacher_forced_gaps(model, tok, prompts, targets) -> float:
    encoded = [encode_prompt_target(tok, p, t) for p, t in zip(prompts, targets)]
    return _gaps(model, [seq for seq, _, _ in encoded], [range(start - 1, stop - 1) for _, start, stop in encoded])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(random_model, tok, side):
    prompts = ["the", "the capital of france is", "a", "is paris . rome", "berlin a an", "of"]
    targets = ["capital of france is paris", "paris", "an apple old", "\n berlin", "apple", "france is"]
    assert _teacher_forced_gaps(random_model, tok, prompts, targets) > MARGIN  # the precondition: no near-ties
    one_by_one = [teacher_forced_tokens(random_model, tok, [p], [t], batch_size=1)[0] for p, t in zip(prompts, targets)]
    batched = teacher_forced_tokens(random_model, tok, prompts, targets, batch_size=4, padding_side=side)
    assert batched == one_by_one
    assert teacher_forced_accuracy(random_model, tok, prompts, targets, batch_size=6, padding_side=side) == teacher_forced_accuracy(
        random_model, tok, prompts, targets, batch_size=1
    )


def test_padding_invariance_needs_the_position_ids(tok, monkeypatch):
    """The check above has teeth: with absolute positions (GPT-2), left padding without position ids changes argmaxes."""
    random_model = gpt2_model()
    prompts = ["the", "the capital of france is", "a", "is paris . rome", "berlin a an", "of"]
    targets = ["capital of france is paris", "paris", "an apple old", "\n berlin", "apple", "france is"]
    one_by_one = [teacher_forced_tokens(random_model, tok, [p], [t], batch_size=1)[0] for p, t in zip(prompts, targets)]
    monkeypatch.setattr(metrics, "_accepts", lambda model, name: name != "position_ids")
    assert teacher_forced_tokens(random_model, tok, prompts, targets, batch_size=6, padding_side="left") != one_by_one


def test_locality_pre_vs_post(base, edited, tok):
    prompts, answers = ["the capital of france is", "a"], ["paris . rome", "an apple"]
    pre = teacher_forced_tokens(base, tok, prompts, answers, batch_size=2)
    assert pre == [[ID["paris"], ID["."], ID["rome"]], [ID["an"], ID["apple"]]]
    assert locality(pre, teacher_forced_tokens(base, tok, prompts, answers, batch_size=2)) == [1.0, 1.0]
    post = teacher_forced_tokens(edited, tok, prompts, answers, batch_size=2)
    assert post == [[ID["paris"], ID["berlin"], ID["rome"]], [ID["an"], ID["apple"]]]
    assert locality(pre, post) == [pytest.approx(2 / 3), 1.0]


def test_locality_shape_errors():
    with pytest.raises(ValueError):
        locality([[1, 2]], [[1, 2], [3]])
    with pytest.raises(ValueError):
        locality([[1, 2]], [[1]])


# ---------------------------------------------------------------------------------------------------------------
# Generation and exact match


def test_generation_stops_at_period_newline_eos_and_budget(base, tok):
    got = generate_answers(base, tok, ["the capital of france is", "paris .", "an", "the", "of france"], chat_template=False, batch_size=8)
    # "paris" then "." (period); "rome" then "\n" (newline); "apple old" then EOS; the rest run to the period.
    assert got == ["paris", "rome", "apple old", "capital of france is paris", "is paris"]
    assert generate_answers(base, tok, ["the"], max_new_tokens=3, chat_template=False, batch_size=1) == ["capital of france"]


def test_generation_batched_equals_one_at_a_time(random_model, tok):
    prompts = ["the", "the capital of france is", "a", "is paris . rome", "berlin a an"]
    single = [generate_answers(random_model, tok, [p], max_new_tokens=8, chat_template=False, batch_size=1)[0] for p in prompts]
    # the precondition: each of the 8 greedy steps (decoded here without a cache, one token at a time) wins by MARGIN
    for ids in metrics._generation_inputs(tok, prompts, False):
        for _ in range(8):
            assert _gaps(random_model, [ids], [range(len(ids) - 1, len(ids))]) > MARGIN
            with torch.no_grad():
                ids = ids + [int(random_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    assert generate_answers(random_model, tok, prompts, max_new_tokens=8, chat_template=False, batch_size=5) == single


def test_generation_chat_template(base):
    templated = make_tokenizer(CHAT_TEMPLATE)
    # The template appends " is", so the model answers "paris"; without it, "france" -> "is paris".
    assert generate_answers(base, templated, ["the capital of france"], batch_size=1) == ["paris"]  # auto: template used
    assert generate_answers(base, templated, ["the capital of france"], chat_template=True, batch_size=1) == ["paris"]
    assert generate_answers(base, templated, ["the capital of france"], chat_template=False, batch_size=1) == ["is paris"]
    with pytest.raises(MergeEditError, match="no chat template"):
        generate_answers(base, make_tokenizer(), ["the capital of france"], chat_template=True, batch_size=1)


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("The Paris.", "paris", 1.0),
        ("an apple", "apple", 1.0),
        ("  A   big\tApple! ", ["x", "big apple"], 1.0),
        ("Paris, France", "paris", 0.0),
        ("theater", "ater", 0.0),  # articles only as whole words
        ("", "paris", 0.0),
        ("paris", [], 0.0),
    ],
)
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


def test_squad_normalize():
    assert squad_normalize("The  Eiffel-Tower, in an A.D. year!") == "eiffeltower in ad year"


# ---------------------------------------------------------------------------------------------------------------
# Fluency


def test_ngram_entropy_hand_computed():
    # "a b c d": 3 distinct bigrams (H2 = log2 3), 2 distinct trigrams (H3 = 1).
    assert text_ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert text_ngram_entropy("a a a a a") == 0.0
    # "x y x y x": bigrams xy,yx,xy,yx (H2 = 1); trigrams xyx,yxy,xyx (p = 2/3, 1/3).
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert text_ngram_entropy("x y x y x") == pytest.approx((2 / 3 + 4 / 3 * h3) / 2)
    assert text_ngram_entropy("one") == 0.0  # no bigrams: 0, not NaN
    # Punctuation and contractions are words of their own ("do", "n't", "."): 4 tokens -> as "a b c d".
    assert text_ngram_entropy("don't stop.") == pytest.approx(text_ngram_entropy("a b c d"))
    assert ngram_entropy(["a b c d", "a a a a a"]) == pytest.approx(text_ngram_entropy("a b c d") / 2)
    assert ngram_entropy("a b c d") == text_ngram_entropy("a b c d")


# ---------------------------------------------------------------------------------------------------------------
# evaluate_edits


RECORDS = [
    EditRecord(
        case_id="1",
        prompt="the capital of france is",
        target="paris .",
        rephrases=("france is", "capital of france is"),
        locality=(Probe("the capital of france is", "paris . rome"),),
        portability=(Probe("of france", "is paris"),),
    ),
    EditRecord(case_id="2", prompt="an", target="apple old", locality=(Probe("a", "an apple"), Probe("of", "france"))),
]


def test_evaluate_edits_end_to_end(base, edited, tok):
    pre = reference_outputs(base, tok, RECORDS, batch_size=3)
    assert pre == {"1": [[ID["paris"], ID["."], ID["rome"]]], "2": [[ID["an"], ID["apple"]], [ID["france"]]]}
    json.dumps(pre)  # plain data: can be saved next to the run

    res = evaluate_edits(edited, tok, RECORDS, pre=pre, chat_template=False, batch_size=3, fluency=True)
    assert isinstance(res, EvalResult)
    r1, r2 = res.records
    assert r1["case_id"] == "1" and r1["rel"] == 0.5 and r1["gen"] == 0.5 and r1["port"] == 1.0
    assert r1["loc"] == pytest.approx(2 / 3)
    # Greedy from the question alone: "paris" is now followed by "berlin a an apple old </s>".
    assert r1["answers"] == {"rel": "paris berlin a an apple old", "gen": ["paris berlin a an apple old"] * 2}
    assert r1["rel_em"] == 0.0 and r1["gen_em"] == 0.0
    assert r2 == {
        **r2,
        "rel": 1.0,
        "gen": None,
        "loc": 1.0,
        "port": None,
        "rel_em": 1.0,
        "gen_em": None,
        "answers": {"rel": "apple old", "gen": []},
    }
    assert r1["continuation"] == " ".join(["paris", "berlin", "a", "an", "apple", "old"])
    assert r1["fluency"] == pytest.approx(text_ngram_entropy(r1["continuation"]))

    agg = res.aggregate
    assert agg["rel"] == {"value": 0.75, "n": 2, "protocol": "teacher-forced"}
    assert agg["gen"] == {"value": 0.5, "n": 1, "protocol": "teacher-forced"}
    assert agg["loc"]["value"] == pytest.approx((2 / 3 + 1.0) / 2) and agg["loc"]["protocol"] == "pre-vs-post"
    assert agg["port"] == {"value": 1.0, "n": 1, "protocol": "teacher-forced"}
    assert agg["rel_em"] == {"value": 0.5, "n": 2, "protocol": "generation"}
    assert agg["gen_em"] == {"value": 0.0, "n": 1, "protocol": "generation"}
    assert agg["fluency"]["protocol"] == "generation" and agg["fluency"]["n"] == 2

    back = json.loads(res.to_json())
    assert back["aggregate"]["rel"]["value"] == 0.75 and back["records"][0]["case_id"] == "1"


def test_evaluate_edits_unedited_model_has_full_locality(base, tok):
    pre = reference_outputs(base, tok, RECORDS, batch_size=16)
    res = evaluate_edits(base, tok, RECORDS, pre=pre, generation=False, batch_size=16)
    assert [r["loc"] for r in res.records] == [1.0, 1.0]
    assert res.records[0]["rel"] == 1.0 and res.records[0]["rel_em"] is None and "answers" not in res.records[0]
    assert res.aggregate["rel_em"] == {"value": None, "n": 0, "protocol": "generation"}


def test_evaluate_edits_without_pre_has_no_locality(edited, tok):
    res = evaluate_edits(edited, tok, RECORDS, generation=False, batch_size=2)
    assert [r["loc"] for r in res.records] == [None, None]
    assert res.aggregate["loc"] == {"value": None, "n": 0, "protocol": "pre-vs-post"}


def test_evaluate_edits_rejects_mismatched_pre(base, tok):
    pre = reference_outputs(base, tok, RECORDS[:1], batch_size=2)
    with pytest.raises(MergeEditError, match="no entry"):
        evaluate_edits(base, tok, RECORDS, pre=pre, generation=False)
    with pytest.raises(MergeEditError, match="locality outputs"):
        evaluate_edits(base, tok, RECORDS, pre={"1": pre["1"], "2": [[1]]}, generation=False)
    with pytest.raises(MergeEditError, match="duplicate case_id"):
        reference_outputs(base, tok, [RECORDS[0], RECORDS[0]])


def test_metrics_leave_training_flag_alone(tok):
    model = shift_model().train()
    teacher_forced_accuracy(model, tok, ["a"], ["an"], batch_size=1)
    generate_answers(model, tok, ["a"], chat_template=False, batch_size=1)
    assert model.training and all(m.training for m in model.modules())


def test_transformers_not_imported_by_package():
    import subprocess
    import sys

    code = "import sys, mergeedit, mergeedit.editing, mergeedit.evaluation; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_loc_chat_sees_a_change_of_the_chat_form_that_loc_cannot():
    """The chat template here appends " is" after the user turn. Probe "the capital" -> "of france": plainly the model
    reads "<s> the capital of france" and predicts [of, france]; in the chat form it reads "the capital is of france"
    and predicts [paris, france] (the word after "is", then after "of"). An edit that rewires only "is" -> "rome"
    leaves every plain position alone (loc 1.0) and changes one of the two chat positions (loc_chat 0.5)."""
    tok = make_tokenizer(CHAT_TEMPLATE)
    base, edited = shift_model(), shift_model({"is": "rome"})
    rec = EditRecord(case_id="0", prompt="the capital of", target="france", locality=(Probe("the capital", "of france"),))
    pre, pre_chat = reference_outputs(base, tok, [rec]), reference_outputs(base, tok, [rec], chat=True)
    assert pre == {"0": [[ID["of"], ID["france"]]]} and pre_chat == {"0": [[ID["paris"], ID["france"]]]}
    got = evaluate_edits(edited, tok, [rec], pre=pre, pre_chat=pre_chat, generation=False)
    assert got.records[0]["loc"] == 1.0 and got.records[0]["loc_chat"] == 0.5
    assert got.aggregate["loc_chat"] == {"value": 0.5, "protocol": "pre-vs-post", "n": 1} and got.settings["pre_chat"] is True
    assert evaluate_edits(base, tok, [rec], pre=pre, pre_chat=pre_chat, generation=False).records[0]["loc_chat"] == 1.0
    assert evaluate_edits(edited, tok, [rec], pre=pre, generation=False).aggregate["loc_chat"]["value"] is None


@pytest.mark.parametrize("size", [2, 3])
def test_shared_evaluation_splits_the_batches_and_returns_what_one_process_does(size):
    """Under `metrics.shared`, each simulated process (a thread with its own copy of the model) runs a share of the
    length batches and every process gets the one-process result, record for record and answer for answer. The
    batches are the one-process batches, so the forward calls of the shares add up to exactly the one-process count."""
    import copy

    from thread_group import run_members

    tok = make_tokenizer()
    torch.manual_seed(1234)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(initializer_range=0.5)).eval()
    words = WORDS[2:16]
    records = [
        EditRecord(
            case_id=str(k),
            prompt=" ".join(words[(k + j) % len(words)] for j in range(2 + k % 4)),
            target=" ".join(words[(3 * k + j) % len(words)] for j in range(1 + k % 3)),
            rephrases=(" ".join(words[(k + 5 + j) % len(words)] for j in range(1 + k % 5)),),
            locality=(Probe(words[k % len(words)], " ".join(words[(k + 7 + j) % len(words)] for j in range(1 + k % 2))),),
        )
        for k in range(11)
    ]
    pre = reference_outputs(model, tok, records, batch_size=2)
    calls: dict = {}

    def score(m, rank):
        hook = m.register_forward_hook(lambda *_: calls.__setitem__(rank, calls.get(rank, 0) + 1))
        try:
            return evaluate_edits(m, tok, records, pre=pre, chat_template=False, batch_size=2, max_new_tokens=4).to_dict()
        finally:
            hook.remove()

    alone = score(model, "alone")
    copies = [copy.deepcopy(model) for _ in range(size)]

    def member(c):
        with metrics.shared(c):
            return score(copies[c.rank], c.rank)

    for got in run_members(size, member):
        assert got == alone
    shares = [calls[r] for r in range(size)]
    assert sum(shares) == calls["alone"] and all(0 < n < calls["alone"] for n in shares)
