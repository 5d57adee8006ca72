"""The edit ledger: which facts went into a model, in which batch, from which R-SFT delta and merge, and how they scored.

`RUN/ledger.jsonl` holds one JSON line per sequential batch of the run's current model (`"kind": "batch"`), then one
line per revert made from the run (`"kind": "revert"`, kept across reruns). The exported model folder carries a copy
(listed in its manifest), so `mergeedit edits MODEL` and `mergeedit verify MODEL` work on a model folder too; a model
made by `mergeedit revert` carries the batches it kept and the revert that made it.

A batch entry names its edits (case id, prompt, target and each edit's score on the final model), the recipe file and
its sha256, the base (a sha256 of the base's trained tensors), the R-SFT delta (file, sha256, bytes), the merge settings
actually used (and, for chained runs, the merged delta the next batch started from) and the batch's metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

from ..core.errors import MergeEditError
from ..evaluation.evaluate import PROTOCOLS, metric
from ..io.integrity import MANIFEST, add_to_manifest, sha256_file

LEDGER_FILE = "ledger.jsonl"
SCORES = ("rel", "gen", "loc", "loc_chat", "port", "rel_em", "gen_em")  # per-edit scores kept in the ledger
PROTOCOL_OF = {**PROTOCOLS, "rel_em": "generation", "gen_em": "generation"}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def file_digest(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def tensors_sha256(tensors: dict) -> str:
    """sha256 over named tensors (sorted by name; name, dtype, shape and bytes of each): the base's fingerprint."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def group_means(per_edit: list[dict], case_ids) -> dict:
    """Mean of each score over the edits named (None where no edit has that score)."""
    wanted = set(case_ids)
    out = {}
    for name in SCORES:
        values = [r[name] for r in per_edit if r["case_id"] in wanted and r.get(name) is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


def labelled(means: dict, per_edit: list[dict], case_ids) -> dict:
    """`group_means` as the run's metric dicts ({value, protocol, n}), for the model card's table."""
    wanted = set(case_ids)
    out = {}
    for name, value in means.items():
        if value is not None:
            out[name] = metric(value, PROTOCOL_OF[name], sum(1 for r in per_edit if r["case_id"] in wanted and r.get(name) is not None))
    return out


def batch_entries(
    *,
    run_root: Path,
    recipe_path: Path,
    strategy: str,
    base: dict,
    batches: list,
    rsft_stages: list[str],
    merge_stages: list[Optional[str]],
    merge_config: Optional[dict],
    train_reports: list[dict],
    per_edit: Optional[list[dict]],
    previous: list[dict],
) -> list[dict]:
    """The ledger's batch entries for a finished run. `merge_stages[b]` is the stage whose delta holds batch b's merge
    (chained: merge-00b; anchored: the one merge of every batch). `recorded` is when the batch's delta was made; the
    previous ledger's digests are reused for stages that were not redone (same output id and size)."""
    recipe = {"path": str(Path(recipe_path).resolve()), "sha256": sha256_file(Path(recipe_path))}
    scores = {r["case_id"]: r for r in per_edit or []}
    known = {}  # (stage, output id) -> digest from the previous ledger: a stage that was not redone is not re-hashed
    for e in previous:
        for ref in (e.get("delta"), e.get("merge")):
            if isinstance(ref, dict) and ref.get("output_id") and ref.get("sha256"):
                known[(ref.get("stage"), ref["output_id"])] = {"sha256": ref["sha256"], "bytes": ref.get("bytes")}

    def ref(stage: str) -> dict:
        file = Path("stages") / stage / "model.safetensors"
        meta = json.loads((Path(run_root) / "stages" / stage / "stage.json").read_text())
        digest = known.get((stage, meta["output_id"]))
        if digest is None or digest["bytes"] != (Path(run_root) / file).stat().st_size:
            digest = file_digest(Path(run_root) / file)
        made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((Path(run_root) / "stages" / stage / "stage.json").stat().st_mtime))
        return {"stage": stage, "output_id": meta["output_id"], "file": file.as_posix(), **digest, "made": made}

    entries = []
    for b, (records, stage) in enumerate(zip(batches, rsft_stages)):
        delta = ref(stage)
        merge = None
        if merge_config is not None and merge_stages[b] is not None:
            merge = {**ref(merge_stages[b]), "config": merge_config}
        edits = []
        for r in records:
            edit = {"case_id": r.case_id, "prompt": r.prompt, "target": r.target}
            if r.case_id in scores:
                edit["scores"] = {k: scores[r.case_id].get(k) for k in SCORES}
            edits.append(edit)
        report = train_reports[b] if b < len(train_reports) else {}
        metrics = {"train": {k: report.get(k) for k in ("learned_fraction", "steps", "epochs", "seconds") if k in report}}
        if per_edit is not None:
            metrics["final"] = group_means(per_edit, [r.case_id for r in records])
        entries.append({
            "kind": "batch", "batch": b + 1, "strategy": strategy, "run": str(Path(run_root).resolve()), "recipe": recipe, "base": base,
            "edits": edits, "delta": delta, "merge": merge, "metrics": metrics,
            "recorded": delta["made"],
        })
    return entries


# -- reading and writing ------------------------------------------------------------------------------------------
def ledger_path(folder: Path) -> Path:
    return Path(folder) / LEDGER_FILE


def read_ledger(folder: Path, *, required: bool = True) -> list[dict]:
    """The entries of FOLDER/ledger.jsonl (a run directory or a model folder); one line naming the problem when it is
    missing (with `required`) or malformed."""
    folder = Path(folder)
    path = ledger_path(folder)
    if not folder.is_dir():
        raise MergeEditError(f"{folder}: not a folder; give a run directory (mergeedit run) or a model folder it exported")
    if not path.is_file():
        if not required:
            return []
        raise MergeEditError(f"{folder}: no {LEDGER_FILE}; give a run directory written by `mergeedit run` (rerun the recipe to record one) or a model folder it exported")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise MergeEditError(f"{path}:{n}: not a JSON line ({exc.msg}); the ledger was edited by hand or truncated, rerun the recipe to rewrite it") from None
        if not isinstance(entry, dict) or entry.get("kind") not in ("batch", "revert"):
            raise MergeEditError(f"{path}:{n}: not a ledger entry (needs \"kind\": \"batch\" or \"revert\"); rerun the recipe to rewrite the ledger")
        if entry["kind"] == "batch" and not (isinstance(entry.get("batch"), int) and isinstance(entry.get("delta"), dict) and isinstance(entry.get("edits"), list)):
            raise MergeEditError(f"{path}:{n}: a batch entry needs `batch`, `edits` and `delta`; rerun the recipe to rewrite the ledger")
        entries.append(entry)
    return entries


def write_ledger(path: Path, entries: list[dict]) -> None:
    """Replace `path` by these entries, atomically (a reader sees the old ledger or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in entries))
    tmp.chmod(0o644)
    tmp.replace(path)


def publish_run_ledger(run_root: Path, model_folder: Path, entries: list[dict]) -> None:
    """RUN/ledger.jsonl gets the run's batch entries (the reverts recorded before are kept after them); the model
    folder gets a copy of its batches, listed in its manifest."""
    previous = read_ledger(run_root, required=False)
    write_ledger(ledger_path(run_root), entries + [e for e in previous if e["kind"] == "revert"])
    write_ledger(ledger_path(model_folder), entries)
    if (Path(model_folder) / MANIFEST).is_file():
        add_to_manifest(Path(model_folder), LEDGER_FILE)


def append_entry(run_root: Path, entry: dict) -> None:
    write_ledger(ledger_path(run_root), read_ledger(run_root) + [entry])


# -- checks -------------------------------------------------------------------------------------------------------
def delta_problem(run_root: Path, ref: dict, batch, what: str = "R-SFT delta") -> Optional[str]:
    """Why the file a ledger entry names is not the one it recorded (missing, or another sha256); None when it is."""
    path = Path(run_root) / ref["file"]
    if not path.is_file():
        return f"{path}: the {what} of {_which(batch)} is missing (deleted?); rerun the recipe to rebuild it"
    digest = sha256_file(path)
    if digest != ref.get("sha256"):
        return f"{path}: the {what} of {_which(batch)} has sha256 {digest[:16]}..., the ledger says {str(ref.get('sha256'))[:16]}...; the delta was modified or replaced, rerun the recipe to rebuild it"
    return None


def _which(batch) -> str:
    return f"batch {batch}" if isinstance(batch, int) else str(batch)


def run_of(entries: list[dict], folder: Path) -> Optional[Path]:
    """The run directory a ledger belongs to: FOLDER itself when it holds the stages, else the one the entries name."""
    folder = Path(folder)
    if (folder / "stages").is_dir():
        return folder
    for e in entries:
        if e.get("run"):
            return Path(e["run"])
    return None


def verify_ledger(folder: Path) -> tuple[int, Optional[str]]:
    """Check the deltas FOLDER's ledger names against their sha256 (raising one line for the first that differs or is
    missing). Returns (deltas checked, a note when they could not be: a model folder whose run is not on this disk)."""
    entries = read_ledger(folder)
    batches = [e for e in entries if e["kind"] == "batch"]
    run = run_of(entries, folder)
    if run is None or not run.is_dir():
        where = f" {run}" if run else ""
        return 0, f"ledger: {len(batches)} batch(es); their deltas were not checked: the run directory{where} is not on this disk"
    checked = 0
    for e in entries:
        if e["kind"] == "batch":
            refs = [(e["delta"], "R-SFT delta")] + ([(e["merge"], "merged delta")] if e.get("merge") and e["merge"].get("file") else [])
        else:  # a revert names the delta its model was made from
            refs = [(e["delta"], "reverted model's delta")] if isinstance(e.get("delta"), dict) else []
        for ref, what in refs:
            problem = delta_problem(run, ref, e.get("batch") or "revert " + ",".join(map(str, e.get("batches", []))), what)
            if problem is not None:
                raise MergeEditError(f"{ledger_path(folder)}: {problem}")
            checked += 1
    return checked, None


def verify_target(folder: Path) -> list[str]:
    """`mergeedit verify`: a model folder is checked against its manifest, and its ledger (if any) against the deltas
    it names; a run directory's model folder likewise, and the run's own ledger. Returns the lines to print."""
    from ..io.integrity import verify_folder

    folder = Path(folder)
    lines = []
    is_run = folder.is_dir() and ledger_path(folder).is_file() and (folder / "stages").is_dir() and not (folder / MANIFEST).exists()
    if is_run:
        model = folder / "model"
        if model.is_dir():
            lines.append(f"{model}: {verify_folder(model)} files match the manifest")
        else:
            raise MergeEditError(f"{model}: missing; the run has no exported model (rerun the recipe)")
    else:
        lines.append(f"{folder}: {verify_folder(folder)} files match the manifest")
    if ledger_path(folder).is_file():
        checked, note = verify_ledger(folder)
        batches = sum(1 for e in read_ledger(folder) if e["kind"] == "batch")
        lines.append(note or f"{ledger_path(folder)}: {batches} batch(es); {checked} delta(s) match their sha256")
    return lines


def ledger_rows(entries: list[dict]) -> list[dict]:
    """One row per ledger entry, for `mergeedit edits`: batch, edits, case ids, digests, merge, metrics, time."""
    rows = []
    for e in entries:
        if e["kind"] == "batch":
            final = (e.get("metrics") or {}).get("final") or {}
            train = (e.get("metrics") or {}).get("train") or {}
            ids = [str(x["case_id"]) for x in e["edits"]]
            rows.append({
                "batch": str(e["batch"]), "edits": str(len(ids)), "case ids": ", ".join(ids[:3]) + (f" +{len(ids) - 3}" if len(ids) > 3 else ""),
                "delta sha256": e["delta"]["sha256"][:12], "merge": ((e.get("merge") or {}).get("config") or {}).get("merge_method", "none"),
                "learned": "-" if train.get("learned_fraction") is None else f"{train['learned_fraction']:.0%}",
                **{k: "-" if final.get(k) is None else f"{final[k]:.3f}" for k in ("rel", "gen", "loc")},
                "recorded": e.get("recorded", ""),
            })
        else:
            checks = e.get("checks") or []
            verdict = "scored: " + ("ok" if all(c["ok"] for c in checks) else "OFF") if checks else "not scored"
            rows.append({
                "batch": "revert " + ",".join(map(str, e["batches"])), "edits": "-", "case ids": f"kept {','.join(map(str, e['kept']))} -> {e.get('out', '')}",
                "delta sha256": (e.get("delta") or {}).get("sha256", "")[:12], "merge": e.get("strategy", ""), "learned": verdict,
                "rel": "-", "gen": "-", "loc": "-", "recorded": e.get("recorded", ""),
            })
    return rows
