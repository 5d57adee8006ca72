"""Drift metrics (hand-built models with known numbers), sequential curves, sweep grids, the Pareto front, and the
errors of the optional extras (matplotlib, lm-eval)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from recipe_defaults import PAPER_LOOP

from mergeedit.core.errors import MergeEditError
from mergeedit.evaluation import drift
from mergeedit.merging.schema import MergeConfig
from mergeedit.pipeline.sweep import apply_point, grid_points, pareto_front, parse_grid, validation_split

WORDS = ["<pad>", "<s>", "</s>", "<user>", "<bot>"] + [f"w{i}" for i in range(40)] + ["what", "is", "the", "of", "capital", "color", "?"]
EDITS = [
    {"prompt": "what is the capital of w1 ?", "target": "w20", "rephrases": "the capital of w1 is", "locality_prompt": "what is the color of w30 ?", "locality_answer": "w31"},
    {"prompt": "what is the capital of w2 ?", "target": "w21 w22", "rephrases": "the capital of w2 is", "locality_prompt": "what is the color of w32 ?", "locality_answer": "w33"},
    {"prompt": "what is the color of w3 ?", "target": "w23", "rephrases": "the color of w3 is", "locality_prompt": "what is the capital of w34 ?", "locality_answer": "w35"},
    {"prompt": "what is the color of w4 ?", "target": "w24", "rephrases": "the color of w4 is", "locality_prompt": "what is the capital of w36 ?", "locality_answer": "w37"},
]
DRIFT_LINES = [
    {"prompt": "the capital of w5", "text": "the capital of w5 is w6 w7 w8"},
    {"prompt": "what is", "text": "what is the color of w9 ? w10"},
    {"prompt": "w11 w12 w13 w14 of the", "text": "w11 w12"},
]


def word_tokenizer(words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=words[1], eos_token=words[2], pad_token="<pad>", unk_token="<pad>")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(folder)
    tok = word_tokenizer()
    tok.chat_template = "{% for m in messages %}<user> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <bot> {% endif %}"
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def drift_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("drift") / "generic.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in DRIFT_LINES) + "\n")
    return path


# -- drift metrics ----------------------------------------------------------------------------------------------------
class Bigram(torch.nn.Module):
    """logits[t] = log P(. | token t): the next-token distribution depends on the current token only."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.register_buffer("table", probs.log())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


BIGRAM_WORDS = ["<pad>", "<s>", "</s>", "a", "b", "c"]


def bigram(rows: dict[str, list[float]]) -> Bigram:
    """rows: word -> P(next) over (a, b, c); specials get a small share so every row is a proper distribution."""
    probs = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    for word, p in rows.items():
        probs[BIGRAM_WORDS.index(word)] = torch.tensor([0.04, 0.03, 0.03, *[x * 0.9 for x in p]], dtype=torch.float64)
    return Bigram(probs.float())


def test_perplexity_of_a_hand_built_model_is_the_hand_computed_value():
    model = bigram({"a": [0.2, 0.5, 0.3], "b": [0.25, 0.25, 0.5], "c": [0.1, 0.1, 0.8]})
    tok = word_tokenizer(BIGRAM_WORDS)
    got = drift.perplexity(model, tok, ["a b c", "b a", "c c c b"], batch_size=2)
    # predicted tokens: b|a, c|b ; a|b ; c|c, c|c, b|c  (each probability times 0.9, the specials' share removed)
    logs = [math.log(0.9 * p) for p in (0.5, 0.5, 0.25, 0.8, 0.8, 0.1)]
    assert got["tokens"] == 6
    assert got["ppl"] == pytest.approx(math.exp(-sum(logs) / 6), rel=1e-6)


def test_kl_of_hand_built_models_and_of_a_model_with_itself():
    p_rows = {"a": [0.2, 0.5, 0.3], "b": [0.25, 0.25, 0.5]}
    q_rows = {"a": [0.4, 0.4, 0.2], "b": [0.25, 0.25, 0.5]}
    ref, post = bigram(p_rows), bigram(q_rows)
    tok = word_tokenizer(BIGRAM_WORDS)
    prompts = ["c a", "a b"]  # next-token distributions after "a" (differs) and after "b" (the same)
    kl = drift.kl_divergence(drift.next_token_logprobs(ref, tok, prompts), drift.next_token_logprobs(post, tok, prompts))
    p = [0.04, 0.03, 0.03] + [0.9 * x for x in p_rows["a"]]
    q = [0.04, 0.03, 0.03] + [0.9 * x for x in q_rows["a"]]
    assert kl[0].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-5)
    assert kl[1].item() == 0.0
    texts = drift.DriftTexts(prompts, ["a b c", "c b a a"])
    same = drift.drift_scores(ref, tok, texts, drift.drift_reference(ref, tok, texts))
    assert same["kl"] == 0.0 and same["ppl_drift_pct"] == 0.0


def test_padding_and_batch_size_do_not_change_drift_numbers():
    model, tok = tiny_llama(), word_tokenizer()
    texts = [d["text"] for d in DRIFT_LINES]
    prompts = [d["prompt"] for d in DRIFT_LINES]
    one = drift.perplexity(model, tok, texts, batch_size=1)
    lp_one = drift.next_token_logprobs(model, tok, prompts, batch_size=1)
    for side in ("right", "left"):
        padded = drift.perplexity(model, tok, texts, batch_size=3, padding_side=side)
        assert padded["tokens"] == one["tokens"] == sum(len(t.split()) - 1 for t in texts)
        assert padded["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
        torch.testing.assert_close(drift.next_token_logprobs(model, tok, prompts, batch_size=3, padding_side=side), lp_one, atol=1e-5, rtol=0)


def test_drift_of_another_model_is_positive_and_reference_round_trips(tmp_path, drift_file):
    tok = word_tokenizer()
    texts = drift.load_drift_texts(drift_file)
    reference = drift.drift_reference(tiny_llama(0), tok, texts)
    drift.save_reference(reference, tmp_path)
    loaded = drift.load_reference(tmp_path)
    assert torch.equal(loaded.logprobs, reference.logprobs) and loaded.ppl == reference.ppl
    other = drift.drift_scores(tiny_llama(1), tok, texts, loaded)
    assert other["kl"] > 0.01 and other["ppl_drift_pct"] != 0.0
    assert other["ppl_drift_pct"] == pytest.approx(100 * (other["ppl"] / other["ppl_ref"] - 1))


def test_bad_drift_text_files_fail_with_one_line(tmp_path):
    with pytest.raises(MergeEditError, match="not found"):
        drift.load_drift_texts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(MergeEditError, match=r"bad.jsonl: line 2 is not valid JSON"):
        drift.load_drift_texts(bad)


def test_shipped_drift_set_has_forty_prompts_and_texts():
    texts = drift.load_drift_texts()
    assert len(texts.prompts) == len(texts.texts) == 40
    assert all(t.startswith(p) and len(t) > len(p) + 40 for p, t in zip(texts.prompts, texts.texts))


# -- grid, split and Pareto front -------------------------------------------------------------------------------------
def test_pareto_front_on_hand_made_points():
    points = [(0.9, 0.5), (0.8, 0.8), (0.7, 0.7), (0.5, 0.95), (0.9, 0.4), (0.8, 0.8), (None, 1.0), (0.4, None)]
    # (0.7,0.7) is beaten by (0.8,0.8); (0.9,0.4) by (0.9,0.5); (0.4,None) by everything; duplicates both stay;
    # (None, 1.0) has the best locality, so nothing beats it in both.
    assert pareto_front(points) == [True, True, False, True, False, True, True, False]


def test_grid_parsing_and_points():
    grid = parse_grid(["density=0.2,0.5,1", "normalize=true,false"])
    assert grid == {"density": [0.2, 0.5, 1.0], "normalize": [True, False]}
    assert grid_points(grid)[:3] == [{"density": 0.2, "normalize": True}, {"density": 0.2, "normalize": False}, {"density": 0.5, "normalize": True}]
    for bad, message in (["density"], "KEY=V1"), (["density=a"], "not a number"), (["w=1", "w=2"], "given twice"):
        with pytest.raises(MergeEditError, match=message):
            parse_grid(bad)


def test_grid_point_sets_shared_parameters_globally_and_per_model_ones_on_rsft():
    config = MergeConfig.model_validate(
        {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 0.5}}], "parameters": {"normalize": True}}
    )
    swept = apply_point(config, {"density": 0.2, "lambda": 0.7, "weight": 0.5}, "recipe.yaml:3")
    assert swept.models[0].parameters == {"weight": 0.5, "density": 0.2}
    assert swept.parameters == {"normalize": True, "lambda": 0.7}
    assert config.models[0].parameters == {"weight": 1.0, "density": 0.5}  # the recipe's config is left alone
    with pytest.raises(MergeEditError, match=r"recipe.yaml:3: grid key 'densty' .*did you mean 'density'"):
        apply_point(config, {"densty": 0.2}, "recipe.yaml:3")


def test_validation_split_is_seeded_and_sized():
    records = [SimpleNamespace(case_id=str(i)) for i in range(20)]
    a, b = validation_split(records, 0.25, 3), validation_split(records, 0.25, 3)
    assert [r.case_id for r in a] == [r.case_id for r in b] and len(a) == 5
    assert [int(r.case_id) for r in a] == sorted(int(r.case_id) for r in a)
    assert [r.case_id for r in validation_split(records, 0.25, 4)] != [r.case_id for r in a]
    assert len(validation_split(records, 7, 0)) == 7 and len(validation_split(records[:2], 0.1, 0)) == 1
    with pytest.raises(MergeEditError, match="asks for 30 edits"):
        validation_split(records, 30, 0)


# -- recipes: curves and sweeps on a tiny model -------------------------------------------------------------------------
def _recipe(folder: Path, model: Path, drift_file: Path, **sections) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in EDITS) + "\n")
    recipe = {
        "model": {"base": str(model)},
        "dataset": {"format": "jsonl", "path": "edits.jsonl", "prompt": "raw"},
        "rsft": {"lr": 0.02, "batch_size": 2, "max_epochs": 8, "max_steps_per_batch": 10, "loss_threshold": 0.1, **PAPER_LOOP},
        "merge": {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 0.6}}], "dtype": "float32"},
        "eval": {"generation": False, "batch_size": 4, "drift_texts": str(drift_file)},
        "output": {"dir": "run", "shard_size": "50M"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("strategy", ["chained", "anchored"])
def test_sequential_curve_points_every_k_batches(tmp_path, tiny_model, drift_file, monkeypatch, strategy):
    from mergeedit.pipeline.runner import RecipeRun

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plot extra is absent: the run still succeeds
    recipe = _recipe(tmp_path, tiny_model, drift_file, sequential={"batch_size": 1, "strategy": strategy}, eval={"curve_every": 3})
    result = RecipeRun(recipe).run()
    assert [(p["batch"], p["edits"]) for p in result.curve] == [(3, 3), (4, 4)]  # every 3rd batch, and the last
    assert json.loads((tmp_path / "run" / "curve.json").read_text()) == result.curve
    assert not (tmp_path / "run" / "curve.png").exists() and "mergeedit[plot]" in result.notes[0]
    last = result.curve[-1]
    for name in ("rel", "gen", "loc", "ppl", "ppl_drift_pct", "kl"):  # the last point is the final evaluation's, read back
        assert last[name] == result.metrics[name]["value"], name
    # no second pass over the final model: only batch 3's point has a curve stage ...
    curve_stages = (["curve-merge-002"] if strategy == "anchored" else []) + ["curve-002"]
    assert [n for n in result.stages_run if n.startswith("curve")] == curve_stages
    # ... and a curve stage's own pass over the final model would have given exactly those numbers
    import torch

    from mergeedit.models.loading import load_model_and_tokenizer
    from mergeedit.pipeline.evaluation_stage import curve_point

    run = RecipeRun(recipe)
    s = run.open_session()
    pre, drift = run.pre_edit_stages(s, s.records, run.new_result(s))
    model, tokenizer = load_model_and_tokenizer(tmp_path / "run" / "model", "float32", torch.device("cpu"))
    assert curve_point(model, tokenizer, s.records, s.fmt, run.recipe.eval, pre, drift, batch=4) == last
    assert result.metrics["kl"]["value"] > 0 and result.pre_metrics["kl"]["value"] == 0.0
    assert result.pre_metrics["ppl"]["value"] == pytest.approx(result.metrics["ppl"]["value"] / (1 + result.metrics["ppl_drift_pct"]["value"] / 100))
    again = RecipeRun(recipe).run()
    assert again.stages_run == [] and again.curve == result.curve
    from mergeedit.pipeline.planning import plan_recipe

    assert [s for s in plan_recipe(recipe).stages if s.startswith(("pre", "curve"))] == ["pre-eval", "pre-drift", *curve_stages]


def test_curve_stages_come_every_k_batches_but_the_last():
    """The last batch's point is the final evaluation's: 1,000 edits in 10 batches, a point every 2, make 4 stages."""
    from mergeedit.pipeline.recipe import Recipe
    from mergeedit.pipeline.runner import curve_stage_batches

    def recipe(**ev):
        return Recipe.model_validate({"model": {"base": "m"}, "dataset": {"format": "zsre", "path": "d.json"}, "eval": ev})

    assert curve_stage_batches(recipe(curve_every=2), 10) == [1, 3, 5, 7]
    assert curve_stage_batches(recipe(curve_every=3), 9) == [2, 5]
    assert curve_stage_batches(recipe(curve_every=1), 1) == [] and curve_stage_batches(recipe(curve_every=None), 10) == []
    assert curve_stage_batches(recipe(curve_every=2, enabled=False), 10) == []


def test_a_chained_run_stopped_early_keeps_the_curve_points_it_reached(tmp_path, tiny_model, drift_file, monkeypatch):
    """Each chained curve point is scored when its batch ends: a run that dies in batch 3 leaves the points after
    batches 1 and 2 (stages curve-000, curve-001), and the rerun reuses them."""
    from mergeedit.pipeline import runner

    real, calls = runner.train_edits, []

    def dies_in_batch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed in batch 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_edits", dies_in_batch_3)
    recipe = _recipe(tmp_path, tiny_model, drift_file, sequential={"batch_size": 1, "strategy": "chained"}, eval={"curve_every": 1})
    with pytest.raises(RuntimeError, match="killed in batch 3"):
        runner.RecipeRun(recipe).run()
    stages = tmp_path / "run" / "stages"
    kept = [json.loads((stages / f"curve-00{b}" / "result.json").read_text()) for b in (0, 1)]
    assert [(p["batch"], p["edits"]) for p in kept] == [(1, 1), (2, 2)] and not (stages / "curve-002").exists()
    monkeypatch.setattr(runner, "train_edits", real)
    result = runner.RecipeRun(recipe).run()
    assert result.curve[:2] == kept and "curve-000" not in result.stages_run and "curve-001" not in result.stages_run
    assert [p["batch"] for p in result.curve] == [1, 2, 3, 4]


def test_plot_needs_matplotlib(monkeypatch, tmp_path):
    from mergeedit.evaluation.curves import plot_curve

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MergeEditError, match=r"matplotlib.*pip install 'mergeedit\[plot\]'"):
        plot_curve([{"edits": 1, "rel": 1.0}], tmp_path / "c.png")


def test_sweep_trains_once_and_scores_every_point(tmp_path, tiny_model, drift_file, run_cli):
    from mergeedit.pipeline.sweep import run_sweep

    recipe = _recipe(tmp_path, tiny_model, drift_file)
    cli = run_cli("sweep", recipe, "--grid", "lambda=0,1", "density=0.5,1", "--validation", "3", "--json", tmp_path / "s.json")
    assert cli.code == 0, cli.stderr
    assert "pareto" in cli.stdout and "4 merges scored on 3 of 4 edits" in " ".join(cli.stdout.split())
    data = json.loads((tmp_path / "s.json").read_text())
    assert data == json.loads((tmp_path / "run" / "sweep.json").read_text())
    points = {(p["params"]["lambda"], p["params"]["density"]): p for p in data["points"]}
    assert set(points) == {(0.0, 0.5), (0.0, 1.0), (1.0, 0.5), (1.0, 1.0)}
    # lambda 0 keeps the base: locality exactly 1 and no drift, whatever the density
    for density in (0.5, 1.0):
        s = points[(0.0, density)]["scores"]
        assert s["loc"] == 1.0 and s["kl"] == 0.0 and s["ppl_drift_pct"] == 0.0
    assert points[(1.0, 1.0)]["scores"]["rel"] > points[(0.0, 1.0)]["scores"]["rel"]
    assert points[(0.0, 1.0)]["pareto"] and points[(1.0, 1.0)]["pareto"] == (points[(1.0, 1.0)]["scores"]["rel"] >= max(p["scores"]["rel"] for p in data["points"]))
    assert not (tmp_path / "run" / "stages" / "sweep-merge").exists()
    again = run_sweep(recipe, ["lambda=0,1", "density=0.5,1"], validation=3)
    assert again.stages_run == [] and "rsft-000" in again.stages_cached
    assert again.points == data["points"]


def test_sweep_refuses_chained_batches_and_unknown_keys(tmp_path, tiny_model, drift_file):
    from mergeedit.pipeline.sweep import run_sweep

    with pytest.raises(MergeEditError, match="not a parameter of merge_method ties"):
        run_sweep(_recipe(tmp_path / "a", tiny_model, drift_file), ["alpha=1,2"])
    with pytest.raises(MergeEditError, match="sequential.strategy: anchored"):
        run_sweep(_recipe(tmp_path / "b", tiny_model, drift_file, sequential={"batch_size": 2}), ["density=0.5"])


# -- `mergeedit eval`: drift and the lm-eval extra -----------------------------------------------------------------------
def test_eval_command_reports_drift_against_the_reference(tmp_path, tiny_model, drift_file, run_cli):
    other = tmp_path / "other"
    tiny_llama(1).save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    out = tmp_path / "r.json"
    same = run_cli("eval", tiny_model, "--reference", tiny_model, "--drift-texts", drift_file, "--json", out)
    assert same.code == 0, same.stderr
    d = json.loads(out.read_text())["drift"]
    assert d["kl"] == 0.0 and d["ppl_drift_pct"] == 0.0 and d["texts"] == 3
    moved = run_cli("eval", other, "--reference", tiny_model, "--drift-texts", drift_file, "--json", out)
    assert moved.code == 0 and "ppl_drift_pct" in moved.stdout and json.loads(out.read_text())["drift"]["kl"] > 0.01


def test_lm_eval_task_without_the_extra_fails_with_the_install_hint(tmp_path, tiny_model, run_cli, monkeypatch):
    from mergeedit.evaluation.lm_eval_task import run_lm_eval_task

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    task = Path(__file__).resolve().parents[1] / "data" / "lmeval" / "capitals.yaml"
    with pytest.raises(MergeEditError, match=r"lm-evaluation-harness.*pip install 'mergeedit\[lmeval\]'"):
        run_lm_eval_task(tiny_model, task)
    result = run_cli("eval", tiny_model, "--lm-eval-task", task)
    assert result.code == 2 and "mergeedit[lmeval]" in result.stderr and "Traceback" not in result.stderr


def test_lm_eval_task_yaml_gets_absolute_data_files(tmp_path):
    import yaml

    from mergeedit.evaluation.lm_eval_task import localize_task

    task = Path(__file__).resolve().parents[1] / "data" / "lmeval" / "capitals.yaml"
    (tmp_path / "out").mkdir()
    assert localize_task(task, tmp_path / "out") == "mergeedit_capitals"
    written = yaml.safe_load((tmp_path / "out" / "capitals.yaml").read_text())
    assert written["dataset_kwargs"]["data_files"] == {"test": str(task.parent / "capitals.jsonl")}
    hub = tmp_path / "hub.yaml"
    hub.write_text("task: t\ndataset_path: cais/mmlu\n")
    with pytest.raises(MergeEditError, match="only local-data tasks run offline"):
        localize_task(hub, tmp_path / "out")


def test_lm_eval_local_task_runs_offline(tiny_model):
    pytest.importorskip("lm_eval")
    from mergeedit.evaluation.lm_eval_task import run_lm_eval_task

    task = Path(__file__).resolve().parents[1] / "data" / "lmeval" / "capitals.yaml"
    result = run_lm_eval_task(tiny_model, task, limit=4, batch_size=4)
    assert result["task"] == "mergeedit_capitals" and result["samples"] == 4
    assert 0.0 <= result["metrics"]["acc"] <= 1.0


def test_run_without_the_shipped_drift_set_skips_drift_with_a_note(tmp_path, tiny_model, drift_file, monkeypatch):
    from mergeedit.pipeline.runner import RecipeRun

    monkeypatch.setattr(drift, "DEFAULT_DRIFT_TEXTS", tmp_path / "not-installed.jsonl")
    result = RecipeRun(_recipe(tmp_path, tiny_model, drift_file, eval={"drift_texts": None})).run()
    assert "kl" not in result.metrics and "rel" in result.metrics
    assert any("no drift scores" in n and "eval.drift_texts" in n for n in result.notes)
