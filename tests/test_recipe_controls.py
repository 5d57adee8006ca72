"""Issue #17's controls through a recipe, as a user runs them: `rsft.retain` (the KL term in every step),
`rsft.layers: auto` (the probe's window, shown by plan and stored in the run and the model card) and
`merge: {auto: ...}` (the operating point chosen in the run, recorded in the run, the ledger and the model card)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from recipe_defaults import PAPER_LOOP

from mergeedit.models.toy import load_state_dict
from mergeedit.pipeline.runner import RecipeRun

WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(40)] + ["what", "is", "the", "of", "capital", "color", "?"]
EDITS = [
    {"prompt": "what is the capital of w1 ?", "target": "w20", "locality_prompt": "what is the color of w30 ?", "locality_answer": "w31"},
    {"prompt": "what is the capital of w2 ?", "target": "w21 w22", "locality_prompt": "what is the color of w32 ?", "locality_answer": "w33"},
    {"prompt": "what is the color of w3 ?", "target": "w23", "locality_prompt": "what is the capital of w34 ?", "locality_answer": "w35"},
    {"prompt": "what is the color of w4 ?", "target": "w24", "locality_prompt": "what is the capital of w36 ?", "locality_answer": "w37"},
]
RETAIN = [{"prompt": f"w{i} w{i + 1}", "text": f"w{i} w{i + 1} w{(i * 7) % 40} w{(i * 3 + 5) % 40} the w{(i * 11) % 40}"} for i in range(10, 26)]
PLANTED = 2  # `layers: auto`: the one layer whose MLP can change any output (the others' up and down are zero)


def _tiny(folder: Path, plant: bool = False) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    if plant:  # by construction only layer PLANTED's MLP has a gradient: elsewhere up = down = 0 zeroes every MLP gradient
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                if i != PLANTED:
                    layer.mlp.up_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("planted") / "model", plant=True)


def _recipe(folder: Path, model: Path, *, edits=EDITS, name="recipe.yaml", **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in edits) + "\n")
    (folder / "retain.jsonl").write_text("\n".join(json.dumps(r) for r in RETAIN) + "\n")
    recipe = {
        "model": {"base": str(model)},
        "dataset": {"format": "jsonl", "path": "edits.jsonl", "prompt": "raw"},
        "rsft": {"lr": 0.01, "batch_size": 2, "max_epochs": 4, "max_steps_per_batch": 3, "loss_threshold": 0.0, **PAPER_LOOP},
        "merge": None,
        "eval": {"generation": False, "drift": False, "batch_size": 4, "examples": 0},
        "output": {"dir": "run"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) else value
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _distance(run: Path, base: dict) -> float:
    trained = load_state_dict(run / "model")
    return sum(float((trained[n] - base[n]).pow(2).sum()) for n in base if "mlp" in n) ** 0.5


def test_retain_kl_is_zero_at_step_zero_and_keeps_the_weights_near_the_base(tmp_path, tiny):
    base = load_state_dict(tiny)
    plain = RecipeRun(_recipe(tmp_path / "plain", tiny)).run()
    held = RecipeRun(_recipe(tmp_path / "held", tiny, rsft={"retain": {"weight": 1000.0, "path": "retain.jsonl", "batch_size": 4}})).run()
    report = held.train_reports[0]
    assert plain.train_reports[0]["retain"] == {} and "retain" not in plain.train_reports[0]["profile"]  # off: no retain forward at all
    kl = report["retain"]["kl"]
    assert len(kl) == report["steps"] and kl[0] == 0.0 and max(kl) > 0  # the model IS the base before the first step
    assert report["retain"]["weight"] == 1000.0 and report["retain"]["batches"] == 4  # 16 texts, 4 per step
    assert _distance(held.run_dir, base) < 0.75 * _distance(plain.run_dir, base)  # measured: 0.57
    assert plain.train_reports[0]["losses"][0] == report["losses"][0]  # same first step: the edit loss alone is logged


def test_replay_under_the_anchored_strategy_is_named_as_doing_nothing(tmp_path, tiny, run_cli):
    notes = {}
    for strategy, replay in (("anchored", 0.5), ("anchored", 0.0), ("chained", 0.5)):
        recipe = _recipe(tmp_path / f"{strategy}-{replay}", tiny, sequential={"batch_size": 2, "strategy": strategy}, rsft={"replay": replay},
                         merge={"merge_method": "linear", "models": [{"model": "rsft", "parameters": {"weight": 1.0}}]})
        shown = run_cli("validate", recipe)
        assert shown.code == 0, shown.stdout
        notes[strategy, replay] = "replay: 0.5 does nothing under the anchored strategy" in " ".join(shown.stdout.split())
    assert notes == {("anchored", 0.5): True, ("anchored", 0.0): False, ("chained", 0.5): False}


def test_retain_in_chained_batches_breadth_first_and_the_prefix_cache_holds_to_the_original_base(tmp_path, tiny, run_cli):
    recipe = _recipe(
        tmp_path, tiny, sequential={"batch_size": 2},
        rsft={"schedule": "breadth-first", "layers": [1, 3], "retain": {"weight": 5.0, "path": "retain.jsonl"}},
    )
    shown = run_cli("plan", recipe)
    assert shown.code == 0 and f"retain: 5.0 x KL(base || current) in every step on {len(RETAIN)} texts" in shown.stdout, shown.stdout
    result = RecipeRun(recipe).run()
    first, second = result.train_reports
    assert "frozen" in first["forward"] or "prefix" in first["forward"], first["forward"]  # the frozen-prefix cache path ran
    assert first["retain"]["kl"][0] == 0.0
    assert second["retain"]["kl"][0] > 0  # batch 2 starts from the edited model; the KL's base is the original one
    card = (result.model_dir / "README.md").read_text()
    assert "Retain (`rsft.retain`): weight 5.0" in card


@pytest.mark.parametrize("bad, needle", [
    ({"retain": {"weight": -1}}, "rsft.retain.weight"),
    ({"retain": {"weight": 1, "top_k": 0}}, "rsft.retain.top_k"),
    ({"layers": "top"}, "layers must be [start, end), auto or {auto: WIDTH}"),
    ({"layers": {"auto": 9}}, "asks for a window of 9 layers but the model has 3"),
    ({"layers": {"auto": 1, "score": "curvature"}}, "layers.score: Input should be 'grad' or 'relative'"),
    ({"layers": {"auto": 0}}, "layers.auto: Input should be greater than or equal to 1"),
    ({"layers": {"width": 2}}, "unknown key 'width' in layers"),
    ({"compile": "sometimes"}, "rsft.compile"),
    ({"merge": {"floor": 1.5}}, "merge.auto.floor"),
    ({"merge": {"candidates": {"densty": [0.5]}}}, "grid key 'densty' is not a parameter of merge_method ties (did you mean 'density'?)"),
    ({"merge": {"candidates": {"density": [1.5]}}}, "merge.auto.candidates"),
    ({"merge": {"validation": 3}}, "validation asks for 3 edits but the smallest sequential batch has 2"),
    ({"merge": {"locality": "drift"}}, "merge.auto.locality"),
    ({"merge": {"locality": "loc"}}, "(merge.auto.locality): 'loc' cannot be chosen on (an evaluation probe"),
    ({"merge": {"reliability": "gen"}}, "(merge.auto.reliability): 'gen' cannot be chosen on (an evaluation probe"),
])
def test_bad_values_of_the_new_keys_are_one_located_line_exit_2(tmp_path, tiny, run_cli, bad, needle):
    if "merge" in bad:
        ties = {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft"}]}
        recipe = _recipe(tmp_path, tiny, merge={**ties, "auto": bad["merge"]}, sequential={"batch_size": 2})
    else:
        recipe = _recipe(tmp_path, tiny, rsft=bad)
    for command in ("validate", "plan"):
        got = run_cli(command, recipe)
        assert got.code == 2 and needle in got.stderr and "Traceback" not in got.stderr, got.stderr
        assert str(recipe) in got.stderr and len(got.stderr.strip().splitlines()) == 1


def test_compile_true_without_a_cpp_compiler_is_one_located_line_before_any_stage(tmp_path, tiny, run_cli, monkeypatch):
    from mergeedit.core import compiler

    monkeypatch.setattr(compiler, "missing_compiler", lambda: "no C++ compiler for torch.compile (none on PATH)")
    recipe = _recipe(tmp_path, tiny, rsft={"compile": True})
    for command in ("validate", "plan", "run"):
        got = run_cli(command, recipe)
        assert got.code == 2 and "Traceback" not in got.stderr and len(got.stderr.strip().splitlines()) == 1, got.stderr
        assert str(recipe) in got.stderr and "rsft.compile: true, but no C++ compiler for torch.compile (none on PATH); install g++" in got.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("stage.json"))
    shown = run_cli("validate", _recipe(tmp_path / "auto", tiny, rsft={"compile": "auto"}))  # auto falls back instead
    assert shown.code == 0, shown.stderr


def test_a_retain_file_sharing_a_prompt_with_the_drift_set_is_refused(tmp_path, tiny, run_cli):
    from mergeedit.editing.retain import DRIFT_EVAL_TEXTS

    recipe = _recipe(tmp_path, tiny, rsft={"retain": {"weight": 1, "path": str(DRIFT_EVAL_TEXTS)}})
    got = run_cli("run", recipe)
    assert got.code == 2 and "rsft.retain.path" in got.stderr and "is the drift evaluation set" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    # a user's drift file (eval.drift_texts) counts too: one shared prompt is enough
    (tmp_path / "drift.jsonl").write_text(json.dumps({"prompt": RETAIN[3]["prompt"], "text": RETAIN[3]["prompt"] + " w1 w2"}) + "\n")
    recipe = _recipe(tmp_path, tiny, rsft={"retain": {"weight": 1, "path": "retain.jsonl"}}, eval={"drift": True, "drift_texts": "drift.jsonl"})
    got = run_cli("validate", recipe)
    assert got.code == 2 and "shares 1 prompt(s) with the drift evaluation set" in got.stderr and "rsft.retain.path" in got.stderr
    # a list of files: each is checked, and the error names the key and the offending file
    recipe = _recipe(tmp_path, tiny, rsft={"retain": {"weight": 1, "path": ["retain.jsonl", str(DRIFT_EVAL_TEXTS)]}})
    got = run_cli("validate", recipe)
    assert got.code == 2 and "rsft.retain.path" in got.stderr and f"{DRIFT_EVAL_TEXTS}: is the drift evaluation set" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1


def test_layers_auto_picks_the_planted_layer_in_plan_run_folder_and_model_card(tmp_path, planted, run_cli):
    recipe = _recipe(tmp_path, planted, rsft={"layers": "auto"})
    shown = run_cli("plan", recipe)
    assert shown.code == 0 and f"layers auto -> [{PLANTED}, {PLANTED + 1})" in shown.stdout, shown.stdout
    assert f"*{PLANTED}:" in shown.stdout and "layer-probe" in shown.stdout
    result = RecipeRun(recipe).run()
    stored = json.loads((result.run_dir / "stages" / "layer-probe" / "result.json").read_text())
    assert stored["window"] == [PLANTED, PLANTED + 1] and result.layer_choice["window"] == stored["window"]
    assert [s for i, s in enumerate(stored["scores"]) if i != PLANTED] == [0.0, 0.0] and stored["scores"][PLANTED] > 0
    trained = result.train_reports[0]["trainable_tensors"]
    assert trained and all(f"layers.{PLANTED}." in n for n in trained)
    assert any(f"layers auto -> [{PLANTED}, {PLANTED + 1})" in n for n in result.notes)
    card = (result.model_dir / "README.md").read_text()
    assert f"trained layers [{PLANTED}, {PLANTED + 1})" in card
    assert run_cli("validate", recipe).code == 0  # validate does not load the model; it says the window comes at run time


def _probe_texts(folder: Path) -> dict:
    """merge.auto's locality probe for these tests: retain texts that each end with an edit's prompt and new target,
    so a merge that keeps the edits changes the base's next token there, and lambda 0 (the base) keeps all of them."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"prompt": e["prompt"], "text": f"{e['prompt']} {e['target']}"} for e in EDITS]
    (folder / "probe.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return {"weight": 0.0, "path": "probe.jsonl"}  # weight 0: no training term, only the probe texts


def test_merge_auto_keeps_the_best_reliability_that_meets_the_floor(tmp_path, tiny, run_cli):
    merge = {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 1.0}}], "dtype": "float32"}
    rsft = {"lr": 0.03, "max_epochs": 6, "max_steps_per_batch": 5, "loss_threshold": 0.1, "retain": _probe_texts(tmp_path)}
    runs = {}
    for floor in (0.9, 0.0):  # the second run reuses the training and chooses again
        auto = {"candidates": {"lambda": [1.0, 0.0]}, "floor": floor, "validation": 2, "seed": 0}
        recipe = _recipe(tmp_path, tiny, rsft=rsft, merge={**merge, "auto": auto})
        shown = run_cli("plan", recipe)
        assert shown.code == 0 and f"2 candidates (lambda [1.0, 0.0]) scored on a validation split (2, seed 0); the best rel with retain_loc >= {floor}" in shown.stdout, shown.stdout
        assert "retain: 0.0 x KL" not in shown.stdout  # weight 0: no training term announced
        runs[floor] = result = RecipeRun(recipe).run()
        assert result.train_reports[0]["retain"] == {}  # the probe texts add nothing to training
        (choice,) = result.merge_choices
        table = {row["params"]["lambda"]: row for row in choice["table"]}
        assert table[0.0]["scores"]["retain_loc"] == 1.0 and table[0.0]["scores"]["retain_kl"] == 0.0  # the base itself
        assert table[1.0]["scores"]["rel"] == 1.0 and table[1.0]["scores"]["retain_loc"] < 0.9  # the precondition
        assert table[0.0]["scores"]["rel"] < 1.0 and "loc" not in table[1.0]["scores"]  # never the evaluation's probes
        want = 0.0 if floor == 0.9 else 1.0
        assert choice["params"] == {"lambda": want} and choice["met_floor"] and choice["batch"] == 1
        stored = json.loads((result.run_dir / "stages" / "merge-auto-000" / "result.json").read_text())
        assert stored["params"] == {"lambda": want} and len(stored["table"]) == 2 and len(stored["validation"]) == 2
        ledger = [json.loads(x) for x in (result.run_dir / "ledger.jsonl").read_text().splitlines()]
        assert ledger[0]["merge"]["config"]["parameters"]["lambda"] == want and ledger[0]["merge"]["auto"]["params"] == {"lambda": want}
        card = (result.model_dir / "README.md").read_text()
        assert f"lambda={want}, the best reliability with locality >= {floor}" in card
        assert any(n.startswith(f"merge auto (batch 1) -> lambda={want}") for n in result.notes)
    assert runs[0.0].stages_cached.count("rsft-000") == 1  # the second run reused the training, re-chose the merge
    assert not list(runs[0.0].run_dir.glob(".merge-auto-scratch*")) and not list((runs[0.0].run_dir / "stages").glob("*scratch*"))


def test_merge_auto_on_the_anchored_merge_and_a_revert_chooses_again(tmp_path, tiny, run_cli):
    merge = {
        "merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 1.0}}], "dtype": "float32",
        "auto": {"candidates": {"lambda": [1.0, 0.0]}, "floor": 0.9, "validation": 2},
    }
    rsft = {"lr": 0.03, "max_epochs": 6, "max_steps_per_batch": 5, "loss_threshold": 0.1, "retain": _probe_texts(tmp_path)}
    recipe = _recipe(tmp_path, tiny, rsft=rsft, merge=merge, sequential={"batch_size": 2, "strategy": "anchored"})
    result = RecipeRun(recipe).run()
    (choice,) = result.merge_choices
    assert choice["stage"] == "merge-auto" and "batch" not in choice and choice["params"] == {"lambda": 0.0} and choice["met_floor"]
    ledger = [json.loads(x) for x in (result.run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [e["merge"]["auto"]["params"] for e in ledger] == [{"lambda": 0.0}] * 2  # one choice covers every batch
    assert all(e["merge"]["config"]["parameters"]["lambda"] == 0.0 for e in ledger)
    got = run_cli("revert", result.run_dir, "--batch", "2", tmp_path / "reverted")
    assert got.code == 0, got.stderr
    assert (result.run_dir / "stages" / "revert-002-merge-auto" / "result.json").is_file()
    kept = [json.loads(x) for x in (tmp_path / "reverted" / "ledger.jsonl").read_text().splitlines() if '"kind": "batch"' in x]
    assert [e["batch"] for e in kept] == [1] and kept[0]["merge"]["auto"]["stage"] == "revert-002-merge-auto"


def test_a_list_of_retain_files_trains_on_all_their_texts(tmp_path, tiny, run_cli):
    (tmp_path / "more.jsonl").write_text(json.dumps({"prompt": "q1 q2", "text": "q1 q2 the w3"}) + "\n")
    recipe = _recipe(tmp_path, tiny, rsft={"retain": {"weight": 1, "path": ["retain.jsonl", "more.jsonl"]}})
    shown = run_cli("plan", recipe)
    assert shown.code == 0, shown.stderr
    assert f"on {len(RETAIN) + 1} texts of {tmp_path / 'retain.jsonl'} + {tmp_path / 'more.jsonl'}" in " ".join(shown.stdout.split())


def _rsft(section: dict):
    from mergeedit.pipeline.recipe import Recipe

    return Recipe.model_validate({"model": {"base": "m"}, "dataset": {"format": "jsonl", "path": "e.jsonl"}, "rsft": section}).rsft


def test_each_methods_defaults_are_its_measured_or_published_settings():
    """rsft's defaults are the best measured settings; the baselines keep their published ones; a key the recipe sets wins."""
    from mergeedit.editing.rsft import TrainSettings
    from mergeedit.pipeline.recipe import Recipe
    from mergeedit.pipeline.runner import train_settings

    def got(r):
        return (r.lr, r.schedule, r.eos, r.replay, r.retain.weight if r.retain else None, r.optimizer, r.batch_size, r.max_epochs, r.max_steps_per_batch, r.loss_threshold,
                r.null_space.energy if r.null_space else None)

    assert got(_rsft({})) == got(_rsft({"method": "rsft"})) == (5e-4, "breadth-first", True, 0.5, 1.0, "adamw", 10, 10, 25, 0.05, 0.9)
    assert got(_rsft({"method": "ft-m"})) == got(_rsft({"method": "ft-l"})) == (1e-4, "depth-first", False, 0.0, None, "adamw", 10, 10, 1, 0.0, None)
    assert got(_rsft({"method": "locft-bf"})) == (5e-4, "breadth-first", True, 0.0, None, "adam", 100, 25, 25, 0.0, None)
    # a key the recipe names is kept, whatever the method
    assert got(_rsft({"method": "ft-m", "eos": True, "lr": 3e-3, "retain": {"weight": 2.0}}))[:5] == (3e-3, "depth-first", True, 0.0, 2.0)
    assert _rsft({"method": "ft-l", "null_space": {"energy": 0.5}}).null_space.energy == 0.5
    assert _rsft({"retain": None}).retain is None and _rsft({"retain": {"weight": 0.0}}).retain_weight == 0.0  # off
    assert _rsft({"null_space": None}).null_space is None  # off
    assert _rsft({"retain": None}).null_space.energy == 0.9  # the projection reads the shipped retain set even with the KL off
    assert _rsft({"method": "locft-bf", "max_epochs": 3}).max_epochs == 3
    # the loop gets exactly these values
    recipe = Recipe.model_validate({"model": {"base": "m"}, "dataset": {"format": "jsonl", "path": "e.jsonl"}, "rsft": {"method": "locft-bf"}})
    settings, patterns, layers = train_settings(recipe)
    assert settings == TrainSettings(5e-4, 0.0, "adam", 100, 25, 25, 0.0, 0, "breadth-first", False) and patterns == [r"mlp\.(down_proj|c_proj)\.weight$"]


def test_a_system_prompt_reaches_every_chat_form_of_the_run(tmp_path, monkeypatch):
    """`dataset.system_prompt`: the edits train with that system turn, and so do the retain set's chat answers and every
    chat-form score (generation and `loc_chat`, of the unedited and the edited model, and the curve points); without
    one, none of them has a system turn. Every chat prompt of the run is built by `chat_prompt`, watched here."""
    from transformers import AutoTokenizer

    from mergeedit.editing import prompts
    from mergeedit.evaluation import metrics

    folder = _tiny(tmp_path / "chat-model")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}w38 {{ m['content'] }} {% else %}w39 {{ m['content'] }} {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}w37{% endif %}")
    tok.save_pretrained(folder)
    real, seen = prompts.chat_prompt, []

    def spy(tokenizer, question, system_prompt=None):
        seen.append(system_prompt)
        return real(tokenizer, question, system_prompt)

    monkeypatch.setattr(prompts, "chat_prompt", spy)
    monkeypatch.setattr(metrics, "chat_prompt", spy)
    for system in (None, "w9 w8"):
        seen.clear()
        work = tmp_path / f"system-{system}"
        work.mkdir()
        (work / "chat.jsonl").write_text(json.dumps({"question": "what is the color of w5 ?", "answer": "w6"}) + "\n")
        recipe = _recipe(work, folder, dataset={"prompt": "both", "system_prompt": system}, sequential={"batch_size": 2},
                         rsft={"retain": {"weight": 1.0, "path": ["retain.jsonl", "chat.jsonl"], "batch_size": 4}, "max_epochs": 1},
                         eval={"generation": True, "max_new_tokens": 2, "curve_every": 1})
        result = RecipeRun(recipe).run()
        assert result.metrics["loc_chat"]["value"] is not None and result.metrics["rel_em"]["value"] is not None
        assert len(result.curve) == 2 and result.curve[0]["loc_chat"] is not None
        assert seen and set(seen) == {system}, set(seen)
