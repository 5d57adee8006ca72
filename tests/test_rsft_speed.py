"""#16: the frozen-prefix forward is exact, bucketing keeps examples apart, learned edits leave, no system prompt."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergeedit.editing.forward import FullForward, PrefixForward
from mergeedit.editing.rsft import EpochPool, TrainingExample, TrainSettings, train_edits
from mergeedit.editing.tokens import length_buckets, pad_batch

EXAMPLES = [TrainingExample("a", [1, 5, 6, 7], [8, 9]), TrainingExample("b", [1, 5], [10]), TrainingExample("c", [1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13])]


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
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
    model = _model()
    seen = []
    settings = TrainSettings(lr=1e-2, batch_size=3, max_epochs=2, max_steps_per_batch=30, loss_threshold=1.0)
    trainable = [n for n, _ in model.named_parameters() if "layers.2.mlp" in n]
    train_edits(model, EXAMPLES, trainable, settings, pad_id=0, device=torch.device("cpu"), on_step=lambda step, cases: seen.append(cases))
    # within the first epoch, once an edit drops out of the trained set it never returns
    first = seen[: next((k for k in range(1, len(seen)) if len(seen[k]) > len(seen[k - 1])), len(seen))]
    for k in range(1, len(first)):
        assert set(first[k]) <= set(first[k - 1])


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
