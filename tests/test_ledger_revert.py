"""The edit ledger (`RUN/ledger.jsonl`, `mergeedit edits`, `mergeedit verify`) and `mergeedit revert`, on a tiny model:
3 sequential batches of one edit each, a few training steps, teacher-forced scoring only."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_defaults import PAPER_LOOP

from mergeedit.pipeline.revert import revert_run
from mergeedit.pipeline.runner import RecipeRun

WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(40)] + ["what", "is", "the", "of", "capital", "color", "?"]
EDITS = [  # prompts share no token, so one batch's task vector leaves the others' facts alone
    {"case_id": "e1", "prompt": "w1 w2 w3", "target": "w20", "rephrases": "w2 w1 w3", "locality_prompt": "w30 w31", "locality_answer": "w32"},
    {"case_id": "e2", "prompt": "w4 w5 w6", "target": "w21 w22", "rephrases": "w5 w4 w6", "locality_prompt": "w33 w34", "locality_answer": "w35"},
    {"case_id": "e3", "prompt": "w7 w8 w9", "target": "w23", "rephrases": "w8 w7 w9", "locality_prompt": "w36 w37", "locality_answer": "w38"},
]
SCRIPT = Path(sys.executable).with_name("mergeedit")
MERGE = {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "rsft", "parameters": {"weight": 1.0}}], "dtype": "float32"}


def build_tiny(folder: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


def recipe(folder: Path, model: Path, strategy: str, select: list[int] | None = None) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in EDITS) + "\n")
    data = {
        "model": {"base": str(model)},
        "dataset": {"format": "jsonl", "path": "edits.jsonl", "prompt": "raw", **({"select": select} if select else {})},
        "rsft": {"lr": 0.01, "batch_size": 1, "max_epochs": 10, "max_steps_per_batch": 10, "loss_threshold": 0.05, **PAPER_LOOP},
        "sequential": {"batch_size": 1, "strategy": strategy},
        "merge": MERGE,
        "eval": {"generation": False, "drift": False, "batch_size": 4, "examples": 0},
        "output": {"dir": "run"},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensors(folder: Path) -> dict[str, bytes]:
    """Every tensor of a model folder as (dtype, shape, raw bytes): equal means equal bit for bit."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


@pytest.fixture(scope="module")
def anchored(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("anchored")
    result = RecipeRun(recipe(folder, tiny, "anchored")).run()
    return folder, result


def test_ledger_names_every_batch_with_its_records_and_digests(anchored, run_cli):
    folder, result = anchored
    run = folder / "run"
    lines = (run / "ledger.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["kind"] for e in entries] == ["batch"] * 3 and [e["batch"] for e in entries] == [1, 2, 3]
    recipe_sha = sha256(folder / "recipe.yaml")
    for k, e in enumerate(entries):
        assert [(x["case_id"], x["prompt"], x["target"]) for x in e["edits"]] == [(EDITS[k]["case_id"], EDITS[k]["prompt"], EDITS[k]["target"])]
        delta = run / "stages" / f"rsft-{k:03d}" / "model.safetensors"
        stage = json.loads((run / "stages" / f"rsft-{k:03d}" / "stage.json").read_text())
        assert {key: e["delta"][key] for key in ("stage", "output_id", "file", "sha256", "bytes")} == {
            "stage": f"rsft-{k:03d}", "output_id": stage["output_id"], "file": f"stages/rsft-{k:03d}/model.safetensors", "sha256": sha256(delta), "bytes": delta.stat().st_size
        }
        assert e["recipe"] == {"path": str((folder / "recipe.yaml").resolve()), "sha256": recipe_sha}
        # the merge actually used: every batch's task vector, added once to the base
        assert e["merge"]["stage"] == "merge" and e["merge"]["sha256"] == sha256(run / "stages" / "merge" / "model.safetensors")
        assert [m["model"] for m in e["merge"]["config"]["models"]] == ["rsft.0", "rsft.1", "rsft.2"]
        assert e["metrics"]["train"]["learned_fraction"] == result.train_reports[k]["learned_fraction"]
        per_edit = json.loads((run / "stages" / "eval" / "result.json").read_text())["per_edit"]
        assert e["metrics"]["final"]["rel"] == next(p["rel"] for p in per_edit if p["case_id"] == EDITS[k]["case_id"])
        assert e["edits"][0]["scores"]["rel"] == e["metrics"]["final"]["rel"]
    # the exported model carries the same batches (in its manifest) and its card lists them
    assert (run / "model" / "ledger.jsonl").read_text() == "".join(line + "\n" for line in lines)
    card = (run / "model" / "README.md").read_text()
    assert "## Edit ledger" in card and entries[1]["delta"]["sha256"][:16] in card and "mergeedit verify" in card

    for target in (run, run / "model"):
        shown = run_cli("edits", target, "--json")
        assert shown.code == 0 and json.loads(shown.stdout) == entries
    table = run_cli("edits", run / "model")
    assert table.code == 0 and "e2" in table.stdout and entries[2]["delta"]["sha256"][:12] in table.stdout
    ok = run_cli("verify", run)
    assert ok.code == 0 and "3 batch(es); 6 delta(s) match their sha256" in ok.stdout, ok.stdout + ok.stderr
    assert run_cli("verify", run / "model").code == 0
    # a rerun with every stage cached keeps each batch's time (when its delta was made)
    again = RecipeRun(folder / "recipe.yaml").run()
    assert again.stages_run == [] and [e["recorded"] for e in again.ledger] == [e["recorded"] for e in entries]


def test_verify_names_a_changed_or_missing_delta(tmp_path, tiny, run_cli):
    RecipeRun(recipe(tmp_path, tiny, "anchored")).run()
    # a model folder shipped without its run: the manifest is checked, the deltas are said not to be
    shipped = tmp_path / "shipped"
    shutil.copytree(tmp_path / "run" / "model", shipped)
    (tmp_path / "run").rename(tmp_path / "moved")
    alone = run_cli("verify", shipped)
    (tmp_path / "moved").rename(tmp_path / "run")
    assert alone.code == 0 and "3 batch(es); their deltas were not checked: the run directory" in alone.stdout.replace("\n", "")
    delta = tmp_path / "run" / "stages" / "rsft-001" / "model.safetensors"
    original = delta.read_bytes()
    delta.write_bytes(original[:-4] + b"\0\0\0\0")
    bad = run_cli("verify", tmp_path / "run" / "model")
    assert bad.code == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "R-SFT delta of batch 2 has sha256" in bad.stderr and str(delta) in bad.stderr.replace("\n", "")
    delta.unlink()
    gone = run_cli("verify", tmp_path / "run")
    assert gone.code == 2 and "R-SFT delta of batch 2 is missing" in gone.stderr


def test_anchored_revert_of_the_middle_batch_equals_a_run_that_never_had_it(anchored, tmp_path, tiny):
    folder, result = anchored
    run = folder / "run"
    out = tmp_path / "without-2"
    reverted = revert_run(run, [2], out)
    assert reverted.stages_run == ["revert-002-merge", "revert-002-eval"]  # no training: a re-merge of batches 1 and 3
    assert reverted.stages_cached == ["pre-eval"]
    never = RecipeRun(recipe(tmp_path / "never", tiny, "anchored", select=[0, 2])).run()
    assert tensors(out) == tensors(never.model_dir)  # tensor by tensor, byte for byte
    assert tensors(out) != tensors(result.model_dir)
    # the reverted fact falls back to its pre-edit score, the kept ones keep theirs
    groups = reverted.groups
    assert groups["reverted"]["in_run"]["rel"] == 1.0 and groups["reverted"]["after_revert"]["rel"] == groups["reverted"]["before_edit"]["rel"] < 1.0
    assert groups["kept"]["after_revert"]["rel"] == groups["kept"]["in_run"]["rel"] == 1.0 > groups["kept"]["before_edit"]["rel"]
    assert reverted.checks and all(c["ok"] for c in reverted.checks)
    # the ledger records the revert; the reverted model's own ledger names batches 1 and 3 and the revert
    entries = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["batch"] * 3 + ["revert"]
    assert entries[-1]["batches"] == [2] and entries[-1]["kept"] == [1, 3] and entries[-1]["out"] == str(out.resolve())
    own = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert [(e["kind"], e.get("batch")) for e in own] == [("batch", 1), ("batch", 3), ("revert", None)]
    assert [e["delta"]["sha256"] for e in own[:2]] == [entries[0]["delta"]["sha256"], entries[2]["delta"]["sha256"]]
    from mergeedit.pipeline.ledger import verify_target

    # manifest + the deltas it names: batches 1 and 3 (R-SFT delta, the revert's merge) and the revert's own
    assert any("2 batch(es); 5 delta(s) match" in line for line in verify_target(out))
    card = (out / "README.md").read_text()
    assert "Batch(es) 2 of the run were taken back by `mergeedit revert`" in card and "| 3 | 1 | e3 |" in card
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    # the same revert again is all cache hits
    again = revert_run(run, [2], tmp_path / "again")
    assert again.stages_run == [] and tensors(tmp_path / "again") == tensors(out)


def test_chained_revert_replays_from_the_batch_before_and_reuses_cached_stages(tmp_path, tiny):
    first = RecipeRun(recipe(tmp_path / "chain", tiny, "chained")).run()
    assert [s for s in first.stages_run if s.startswith(("rsft", "merge"))] == ["rsft-000", "merge-000", "rsft-001", "merge-001", "rsft-002", "merge-002"]
    out = tmp_path / "without-2"
    reverted = revert_run(tmp_path / "chain" / "run", [2], out)
    # batch 1's R-SFT and merge (and the pre-edit scores) come from the run's cache; only batch 3 is trained again
    assert sorted(reverted.stages_cached) == ["merge-000", "pre-eval", "rsft-000"]
    assert reverted.stages_run == ["revert-002-rsft-001", "revert-002-merge-001", "revert-002-eval"]
    never = RecipeRun(recipe(tmp_path / "never", tiny, "chained", select=[0, 2])).run()
    assert tensors(out) == tensors(never.model_dir)
    assert reverted.checks and all(c["ok"] for c in reverted.checks), reverted.checks
    # the run's own stages were not replaced: a rerun of the recipe is all cache hits
    assert RecipeRun(tmp_path / "chain" / "recipe.yaml").run().stages_run == []
    # reverting the last batch trains nothing: the model after batch 2 is the run's own merge-001
    last = revert_run(tmp_path / "chain" / "run", [3], tmp_path / "without-3")
    assert [s for s in last.stages_run if "rsft" in s or "merge" in s] == []
    merged = json.loads((tmp_path / "without-3" / "ledger.jsonl").read_text().splitlines()[-1])["delta"]
    assert merged["stage"] == "merge-001"


@pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the console script (bash setup.sh installs it)")
def test_bad_revert_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    base = build_tiny(tmp_path / "base")
    RecipeRun(recipe(tmp_path / "r", base, "anchored")).run()
    run = tmp_path / "r" / "run"
    ledger_before = (run / "ledger.jsonl").read_bytes()
    out = tmp_path / "out"

    def revert(*args, command=("revert", str(run))):
        result = subprocess.run([str(SCRIPT), *command, *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr
        assert not out.exists() and not list(tmp_path.glob(".out*")) and (run / "ledger.jsonl").read_bytes() == ledger_before
        return " ".join(result.stderr.split())

    assert "batch 7 is not in the ledger (it has batch(es) 1-3)" in revert("--batch", "7", str(out))
    assert "is a model folder, not a run directory; revert works on the run that made it" in revert("--batch", "2", str(out), command=("revert", str(run / "model")))
    assert f"{tmp_path}: no ledger.jsonl" in revert(command=("edits", str(tmp_path)))
    assert "leaves the unedited base model" in revert("--batch", "1", "--batch", "2", "--batch", "3", str(out))
    # a base that is not the run's base: same names and shapes, other weights
    saved = tmp_path / "saved"
    shutil.copytree(base, saved)
    build_tiny(tmp_path / "other", seed=1)
    shutil.copyfile(tmp_path / "other" / "model.safetensors", base / "model.safetensors")
    assert "is not the run's base" in revert("--batch", "2", str(out))
    shutil.copyfile(saved / "model.safetensors", base / "model.safetensors")
    # a run whose deltas were deleted
    shutil.rmtree(run / "stages" / "rsft-002")
    message = revert("--batch", "2", str(out))
    assert "R-SFT delta of batch 3 is missing" in message and "rsft-002" in message


def test_revert_checks_by_hand():
    """Reverted edits must come back to their pre-edit scores (either way), kept ones must not lose more than the
    tolerance (a gain is fine); a reverted edit whose target a kept edit teaches is listed and checked apart."""
    from mergeedit.pipeline.revert import _compare

    def per(**rel):
        return [{"case_id": k, "rel": v, "gen": None} for k, v in rel.items()]

    scores = {"base_per_edit": per(a=0.0, b=0.25, c=0.0, d=0.5), "per_edit": per(a=0.05, b=1.0, c=0.9, d=1.0)}
    reverted = [{"edits": [{"case_id": "a", "target": "X", "scores": {"rel": 1.0}}, {"case_id": "b", "target": "Y", "scores": {"rel": 1.0}}]}]
    kept = [{"edits": [{"case_id": "c", "target": " y ", "scores": {"rel": 1.0}}, {"case_id": "d", "target": "Z", "scores": {"rel": 0.5}}]}]
    groups, checks = _compare(scores, reverted, kept, tolerance=0.1)
    assert groups["reverted"]["shared_targets"] == [["b", "c"]]
    assert groups["reverted"]["before_edit"]["rel"] == 0.125 and groups["reverted"]["after_revert"]["rel"] == 0.525
    assert groups["kept"]["in_run"]["rel"] == 0.75 and groups["kept"]["after_revert"]["rel"] == 0.95
    assert [(c["group"], c["metric"], c["expected"], c["got"], c["ok"]) for c in checks] == [
        ("reverted", "rel", 0.125, 0.525, False),  # b is still taught by c
        ("reverted_unshared", "rel", 0.0, 0.05, True),
        ("kept", "rel", 0.75, 0.95, True),  # a gain is not a failure
    ]
    _, dropped = _compare({**scores, "per_edit": per(a=0.0, b=0.25, c=0.5, d=0.5)}, reverted, kept, tolerance=0.1)
    assert [c["ok"] for c in dropped if c["group"] == "kept"] == [False]  # 0.75 -> 0.5 is a loss beyond 0.1
