"""`mergeedit run` end to end on a tiny random model: training, delta, merge, caching, resume, bad recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from recipe_defaults import PAPER_LOOP

from mergeedit.core.errors import MergeEditError
from mergeedit.models.toy import load_state_dict
from mergeedit.pipeline.runner import RecipeRun

WORDS = ["<pad>", "<s>", "</s>", "<user>", "<bot>"] + [f"w{i}" for i in range(40)] + ["what", "is", "the", "of", "capital", "color", "?"]
CHAT = "{% for m in messages %}<user> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <bot> {% endif %}"
EDITS = [
    {"prompt": "what is the capital of w1 ?", "target": "w20", "rephrases": "the capital of w1 is", "locality_prompt": "what is the color of w30 ?", "locality_answer": "w31"},
    {"prompt": "what is the capital of w2 ?", "target": "w21 w22", "rephrases": "the capital of w2 is", "locality_prompt": "what is the color of w32 ?", "locality_answer": "w33"},
    {"prompt": "what is the color of w3 ?", "target": "w23", "rephrases": "the color of w3 is", "locality_prompt": "what is the capital of w34 ?", "locality_answer": "w35"},
    {"prompt": "what is the color of w4 ?", "target": "w24", "rephrases": "the color of w4 is", "locality_prompt": "what is the capital of w36 ?", "locality_answer": "w37"},
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny") / "model"
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")
    tok.chat_template = CHAT
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


DEFAULT_MERGE = {"merge_method": "ties", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0, "density": 0.6}}], "dtype": "float32"}


def _recipe(folder: Path, model: Path, *, merge="default", name: str = "recipe.yaml", **sections) -> Path:
    """Write edits.jsonl and a recipe into `folder`; keyword sections (rsft=..., sequential=...) override defaults."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in EDITS) + "\n")
    recipe = {
        "model": {"base": str(model)},
        "dataset": {"format": "jsonl", "path": "edits.jsonl", "prompt": "raw"},
        "rsft": {"lr": 0.01, "batch_size": 2, "max_epochs": 30, "max_steps_per_batch": 20, "loss_threshold": 0.05, **PAPER_LOOP},
        "eval": {"generation": True, "batch_size": 4, "max_new_tokens": 4},
        "output": {"dir": "run"},
    }
    if merge != "default":
        recipe["merge"] = merge
    else:
        recipe["merge"] = DEFAULT_MERGE
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def ties_one(base: torch.Tensor, tuned: torch.Tensor, density: float) -> torch.Tensor:
    """TIES with a single fine-tune (weight 1): keep the top-k |delta|, the sign vote is the delta's own sign."""
    d = (tuned - base).flatten()
    k = max(1, int(density * d.numel()))
    keep = torch.zeros_like(d)
    keep[torch.argsort(d.abs(), descending=True)[:k]] = 1
    return base + (d * keep).reshape(base.shape)


def test_rsft_then_ties_merge(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model)
    result = RecipeRun(recipe).run()
    report = result.train_reports[0]
    assert report["learned_fraction"] == 1.0 and all(e["final_loss"] < 0.05 for e in report["edits"])
    base = load_state_dict(tiny_model)
    delta = load_state_dict(tmp_path / "run" / "stages" / "rsft-000")
    assert set(delta) == {f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")}
    merged = load_state_dict(result.model_dir)
    assert set(merged) == set(base)
    for name, tensor in base.items():
        if name in delta:
            assert not torch.equal(delta[name], tensor)  # training changed every trainable tensor
            torch.testing.assert_close(merged[name], ties_one(tensor, delta[name], 0.6), atol=1e-6, rtol=0)
        else:
            assert torch.equal(merged[name], tensor), name  # untouched tensors are the base's, bit for bit
    # the edited folder is a Hugging Face model with a model card
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.model_dir)
    from mergeedit.io.integrity import verify_folder

    assert verify_folder(result.model_dir) >= 4  # shards, config, tokenizer and the model card, all in the manifest
    card = (result.model_dir / "README.md").read_text()
    assert "Edits: 4" in card and "| rel | teacher-forced |" in card and "torch" in card
    # reliability after editing well above before
    assert result.metrics["rel"]["value"] > result.pre_metrics["rel"]["value"] + 0.5
    assert 0 <= result.metrics["loc"]["value"] <= 1


def test_rerun_skips_finished_stages_and_force_redoes_one(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model)
    first = RecipeRun(recipe).run()
    again = RecipeRun(recipe).run()
    assert again.stages_run == [] and set(again.stages_cached) == set(first.stages_run)
    forced = RecipeRun(recipe, force=["merge"]).run()
    assert forced.stages_run == ["merge-000", "export", "eval"]


def test_interrupted_run_resumes_to_the_same_model(tmp_path, tiny_model, monkeypatch):
    RecipeRun(_recipe(tmp_path / "a", tiny_model)).run()
    broken = _recipe(tmp_path / "b", tiny_model)
    from mergeedit.pipeline import runner

    original = runner.RecipeRun._export

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.RecipeRun, "_export", crash)
    with pytest.raises(KeyboardInterrupt):
        RecipeRun(broken).run()
    assert not (tmp_path / "b" / "run" / "stages" / "export").exists()
    monkeypatch.setattr(runner.RecipeRun, "_export", original)
    resumed = RecipeRun(broken).run()
    assert "rsft-000" in resumed.stages_cached and "export" in resumed.stages_run
    a = load_state_dict(tmp_path / "a" / "run" / "model")
    b = load_state_dict(tmp_path / "b" / "run" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sequential_chained_and_anchored(tmp_path, tiny_model):
    chained = RecipeRun(_recipe(tmp_path, tiny_model, sequential={"batch_size": 2, "strategy": "chained"})).run()
    assert chained.batches == 2 and len(chained.train_reports) == 2
    assert [s for s in chained.stages_run if s.startswith(("rsft", "merge"))] == ["rsft-000", "merge-000", "rsft-001", "merge-001"]
    anchored = RecipeRun(_recipe(tmp_path / "anch", tiny_model, sequential={"batch_size": 2, "strategy": "anchored"})).run()
    assert [s for s in anchored.stages_run if s.startswith(("rsft", "merge"))] == ["rsft-000", "rsft-001", "merge"]
    base = load_state_dict(tiny_model)
    d0 = load_state_dict(tmp_path / "anch" / "run" / "stages" / "rsft-000")
    d1 = load_state_dict(tmp_path / "anch" / "run" / "stages" / "rsft-001")
    merged = load_state_dict(anchored.model_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    # anchored: both batches were trained from the original base, then TIES-merged together (weights 1, density 0.6)
    from conftest import ties_reference

    expected = ties_reference(base[name], [d0[name], d1[name]], [1.0, 1.0], [0.6, 0.6])
    torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=0)


def test_rsft_without_merge_and_ftm_baseline(tmp_path, tiny_model):
    no_merge = RecipeRun(_recipe(tmp_path, tiny_model, merge=None)).run()
    delta = load_state_dict(tmp_path / "run" / "stages" / "rsft-000")
    merged = load_state_dict(no_merge.model_dir)
    assert all(torch.equal(merged[k], v) for k, v in delta.items())
    result = RecipeRun(_recipe(tmp_path / "ftm", tiny_model, merge=None, rsft={"method": "ft-m", "layers": [1, 2], "max_epochs": 3})).run()
    assert result.train_reports[0]["trainable_tensors"] == ["model.layers.1.mlp.down_proj.weight"]


OTHER_REF = {"merge_method": "ties", "base_model": "base", "models": [{"model": "other", "parameters": {"weight": 1}}]}
NO_RSFT = {"merge_method": "ties", "base_model": "base", "models": [{"model": "base", "parameters": {"weight": 1}}]}


@pytest.mark.parametrize(
    "sections,needle",
    [
        ({"rsft": {"trainable": ["nothing_matches"]}}, "match no parameter"),
        ({"merge": OTHER_REF}, "model reference 'other' is unknown"),
        ({"merge": NO_RSFT}, "never uses `rsft`"),
        ({"sequential": {"strategy": "anchored"}, "merge": None}, "needs a `merge:` section"),
        ({"rsft": {"lr": -1}}, r"recipe.yaml:\d+ \(rsft.lr\)"),
        ({"rsft": {"lrr": 0.1}}, "did you mean 'lr'"),
        ({"dataset": {"format": "zsre2"}}, "zsre"),
    ],
)
def test_bad_recipes_fail_before_training(tmp_path, tiny_model, sections, needle, monkeypatch):
    merge = sections.pop("merge", "default")
    recipe = _recipe(tmp_path, tiny_model, merge=merge, **sections)
    from mergeedit.pipeline import runner

    monkeypatch.setattr(runner, "train_edits", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(MergeEditError, match=needle):
        RecipeRun(recipe).run()


def test_empty_dataset_is_an_error(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model)
    (tmp_path / "edits.jsonl").write_text("")
    with pytest.raises(MergeEditError, match="edits.jsonl"):
        RecipeRun(recipe).run()


def test_two_processes_under_torchrun(tmp_path, tiny_model, monkeypatch):
    """Two CPU processes (torchrun, gloo) with the controls the shipped recipe turns on (breadth-first, the retain KL,
    the null space, sit-out, a window above layer 0: the frozen-prefix cache) over two chained batches with every
    earlier edit replayed: each process computes its share of every step, the main process writes, and the run takes
    the steps one process takes, to the same weights up to float32 rounding; the evaluation is shared out too."""
    import subprocess
    import sys

    retain = [{"prompt": f"w{i} w{i + 1}", "text": f"w{i} w{i + 1} the w{i + 2} of w{i + 3} is w{i + 4}"} for i in range(0, 30, 3)]
    rsft = {"schedule": "breadth-first", "layers": [1, 2], "lr": 0.02, "max_epochs": 40, "sit_out_learned": True, "replay": 1.0,
            "retain": {"weight": 1.0, "path": "retain.jsonl", "batch_size": 3}, "null_space": {"energy": 0.9}}
    from mergeedit.editing import rsft as rsft_module

    first_checks = []  # what each training call's first sit-out check measured (in this process: run "one")
    real = rsft_module._EditLoop.measure
    monkeypatch.setattr(rsft_module._EditLoop, "measure", lambda self, cases: (first_checks.append((len(self.case_ids), sorted(cases)))
                        if self.epochs == 1 and self.total_steps == 0 else None) or real(self, cases))
    runs = {}
    for name in ("one", "two"):
        recipe = _recipe(tmp_path / name, tiny_model, eval={"generation": False}, rsft=rsft, sequential={"batch_size": 2, "strategy": "chained"})
        (tmp_path / name / "retain.jsonl").write_text("\n".join(json.dumps(r) for r in retain) + "\n")
        with open(tmp_path / name / "edits.jsonl", "a") as edits:  # a record without a target: skipped, with a warning
            edits.write(json.dumps({**EDITS[0], "target": ""}) + "\n")
        if name == "one":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as each torchrun process: the same kernels, so the unedited model scores alike
            try:
                RecipeRun(recipe).run()
            finally:
                torch.set_num_threads(threads)
            batch0 = sorted(e["case_id"] for e in json.loads((tmp_path / name / "run" / "stages" / "rsft-000" / "train_report.json").read_text())["edits"])
            assert first_checks == [(4, batch0)]  # batch 0: nothing measured (every edit new); batch 1: its 2 replayed edits
        else:
            # (`accelerate launch --cpu --num_processes 2` starts one process without MPI; refused in test_distributed_backends)
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mergeedit.cli", "run", str(recipe)],
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            printed = proc.stdout + proc.stderr  # progress on stderr, results on stdout: from the main process only
            assert printed.count("running pre-eval") == 1 and printed.count("edits in 2 batch(es)") == 1
            assert printed.count("skipped 1 record(s) with an empty target") == 1  # warnings too: from the main process
        stages = tmp_path / name / "run" / "stages"
        runs[name] = [(json.loads((stages / b / "train_report.json").read_text()), load_state_dict(stages / b)) for b in ("rsft-000", "rsft-001")]
    base = load_state_dict(tiny_model)
    for (one, one_delta), (two, two_delta) in zip(runs["one"], runs["two"]):
        assert one["learned_fraction"] == 1.0 and one["forward"].startswith("frozen-prefix") and one["retain"]["kl"] and one["null_space"]
        assert any(one["sat_out"])  # precondition: sit-out decided something the processes had to agree on
        assert (two["steps"], two["epochs"], two["sat_out"], two["learned_fraction"]) == (one["steps"], one["epochs"], one["sat_out"], 1.0)
        assert two["forward"] == one["forward"] and two["tokens"] == one["tokens"] and len(two["edits"]) == len(one["edits"])
        assert (two["processes"], one["processes"]) == (2, 1) and "sync" in two["profile"] and "sync" not in one["profile"]  # two summed their gradients
        assert set(two_delta) == set(one_delta) == {f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
        assert all(torch.allclose(two_delta[n], one_delta[n], rtol=0, atol=1e-4) for n in one_delta)
        assert all((one_delta[n] - base[n]).abs().max() > 1e-2 for n in one_delta)  # the edits moved the weights far more than that
    assert len(runs["one"][1][0]["edits"]) == 4  # the second batch trained its 2 edits and replayed the first batch's 2
    # each process's share of a retain mini-batch has its base side in that share's own shape: 0 before the first step
    assert runs["one"][0][0]["retain"]["kl"][0] == runs["two"][0][0]["retain"]["kl"][0] == 0.0
    one_model, two_model = load_state_dict(tmp_path / "one" / "run" / "model"), load_state_dict(tmp_path / "two" / "run" / "model")
    assert set(two_model) == set(base) and all(torch.allclose(two_model[n], one_model[n], rtol=0, atol=1e-4) for n in base)
    assert torch.equal(two_model["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # the evaluation stages ran on both processes, each scoring a share of the batches (gathered over gloo): the
    # unedited model's scores and locality references are the one-process ones exactly
    pre = [json.loads((tmp_path / name / "run" / "stages" / "pre-eval" / "result.json").read_text()) for name in ("one", "two")]
    assert pre[0]["locality"] and pre[1] == pre[0]
    post = [json.loads((tmp_path / name / "run" / "stages" / "eval" / "result.json").read_text())["metrics"] for name in ("one", "two")]
    assert post[1].keys() == post[0].keys() and post[0]["rel"]["n"] == post[1]["rel"]["n"] == 4


def test_eval_command_scores_a_folder_against_its_reference(tmp_path, tiny_model, run_cli):
    recipe = _recipe(tmp_path, tiny_model)
    RecipeRun(recipe).run()
    out = tmp_path / "scores.json"
    result = run_cli("eval", tmp_path / "run" / "model", "--dataset", tmp_path / "edits.jsonl", "--format", "jsonl",
                     "--reference", tiny_model, "--json", out, "--no-generation")
    assert result.code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["aggregate"]["rel"]["value"] > 0.9 and data["aggregate"]["loc"]["protocol"] == "pre-vs-post"
    same = run_cli("eval", tiny_model, "--dataset", tmp_path / "edits.jsonl", "--format", "jsonl", "--reference", tiny_model,
                   "--json", out, "--no-generation")
    assert same.code == 0 and json.loads(out.read_text())["aggregate"]["loc"]["value"] == 1.0


def test_eval_command_asks_the_chat_forms_with_the_system_prompt_given(tmp_path, tiny_model, run_cli, monkeypatch):
    """`mergeedit eval --system-prompt`: generation and loc_chat, on the model and its reference, ask with that system
    turn (as a recipe's `dataset.system_prompt` trains); the scores record it."""
    from mergeedit.editing import prompts
    from mergeedit.evaluation import metrics

    real, seen = prompts.chat_prompt, []
    spy = lambda tokenizer, question, system_prompt=None: seen.append(system_prompt) or real(tokenizer, question, system_prompt)  # noqa: E731
    monkeypatch.setattr(prompts, "chat_prompt", spy)
    monkeypatch.setattr(metrics, "chat_prompt", spy)
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in EDITS) + "\n")
    out = tmp_path / "scores.json"
    for system in (None, "w9"):
        seen.clear()
        args = ["--system-prompt", system] if system else []
        result = run_cli("eval", tiny_model, "--dataset", tmp_path / "edits.jsonl", "--format", "jsonl", "--reference", tiny_model,
                         "--json", out, "--batch-size", "4", "--no-drift", *args)
        assert result.code == 0, result.stderr
        data = json.loads(out.read_text())
        assert data["aggregate"]["loc_chat"]["value"] == 1.0 and data["aggregate"]["rel_em"]["value"] is not None
        assert data["settings"]["system_prompt"] == system and seen and set(seen) == {system}


@pytest.mark.parametrize(
    "content,needles",
    [
        ("", ["edits.jsonl", "no edits selected"]),
        ('{"prompt": "what is w1 ?", "target_new": "w2"}\n{"prompt": "broken', ["edits.jsonl: line 2 is not valid JSON"]),
        ('{"prompt": "what is w1 ?"}\n', ["edits.jsonl", "target"]),
    ],
    ids=["empty", "truncated-record", "missing-target"],
)
def test_bad_edit_files_fail_cleanly_from_the_cli(tmp_path, tiny_model, run_cli, content, needles):
    recipe = _recipe(tmp_path, tiny_model)
    (tmp_path / "edits.jsonl").write_text(content)
    result = run_cli("run", recipe)
    assert result.code == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert message.startswith("error:") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "run").exists()
