"""The model card (README.md) of an edited model: what was edited, how, how well, and with which versions."""

from __future__ import annotations

import platform
from pathlib import Path

from .. import __version__
from ..editing.retain import DEFAULT_RETAIN_SET


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"mergeedit": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _metrics_table(pre: dict | None, post: dict | None) -> str:
    if not post:
        return "Evaluation was disabled in the recipe.\n"
    rows = ["| metric | protocol | before | after |", "|---|---|---|---|"]
    for name, entry in post.items():
        before = (pre or {}).get(name, {}).get("value")
        value, protocol = entry["value"], entry["protocol"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"| {name} | {protocol} | {fmt(before)} | {fmt(value)} |")
    return "\n".join(rows) + "\n"


def _short(values: list[str], n: int = 4) -> str:
    return ", ".join(values[:n]) + (f" (+{len(values) - n} more)" if len(values) > n else "")


def _ledger_section(entries: list[dict] | None) -> str:
    """The batches in this model (from its ledger.jsonl) and how to check them."""
    if not entries:
        return ""
    rows = ["| batch | edits | case ids | R-SFT delta sha256 | merge | rel (final) |", "|---|---|---|---|---|---|"]
    reverts = []
    for e in entries:
        if e.get("kind") == "revert":
            reverts.append(e)
            continue
        merge = (e.get("merge") or {}).get("config") or {}
        rel = ((e.get("metrics") or {}).get("final") or {}).get("rel")
        ids = [str(x["case_id"]) for x in e["edits"]]
        rows.append(f"| {e['batch']} | {len(ids)} | {_short(ids)} | `{e['delta']['sha256'][:16]}` | {merge.get('merge_method', 'none')} | {'n/a' if rel is None else f'{rel:.3f}'} |")
    text = "## Edit ledger\n\n" + "\n".join(rows) + "\n"
    for r in reverts:
        text += f"\nBatch(es) {', '.join(map(str, r['batches']))} of the run were taken back by `mergeedit revert` ({r.get('recorded', '')}); this model keeps batch(es) {', '.join(map(str, r['kept']))}.\n"
    run = next((e.get("run") for e in entries if e.get("run")), "RUN")
    text += (
        "\n`ledger.jsonl` in this folder lists every batch: its edits (case id, prompt, target, final scores), the recipe's "
        "sha256, the base, the R-SFT delta's sha256 and the merge settings used. To check them:\n\n"
        f"- `mergeedit edits <this folder>` prints the ledger (`--json` for machines);\n"
        f"- `mergeedit verify <this folder>` checks every file against `mergeedit-manifest.json` and, where the run directory "
        f"(`{run}`) is present, each delta the ledger names against its sha256;\n"
        f"- `mergeedit revert {run} --batch K OUT` writes the model without batch K.\n"
    )
    return text + "\n"


def _choices_section(recipe, result) -> str:
    """What the run chose for itself: the `layers: auto` window, each `merge: {auto}` choice with every candidate's
    scores, and the retain term's settings."""
    parts = []
    layer = getattr(result, "layer_choice", None)
    if layer:
        scores = ", ".join(f"{i}: {v:.3g}" for i, v in enumerate(layer["scores"]))
        parts.append(
            f"- Layers (`rsft.layers: auto`): trained layers [{layer['window'][0]}, {layer['window'][1]}), chosen before training by the "
            f"{layer['score']} norm of the answer loss's gradient over {layer['examples']} example(s) of the unedited model; per-layer scores: {scores}"
        )
    retain = recipe.rsft.retain
    if retain is not None and retain.weight > 0:
        parts.append(
            f"- Retain (`rsft.retain`): weight {retain.weight} x KL(base || current) on `{', '.join([retain.path] if isinstance(retain.path, str) else retain.path) if retain.path else ', '.join(f'data/retain/{f.name}' for f in DEFAULT_RETAIN_SET)}` in every training step "
            f"(top-{retain.top_k if retain.top_k else 'all'} base tokens, {retain.batch_size} texts per step, {retain.max_tokens} tokens each)"
        )
    null_space = recipe.rsft.null_space
    if null_space is not None:
        reports = [r.get("null_space") or {} for r in getattr(result, "train_reports", None) or []]
        free = next((r["free_share"] for r in reports if "free_share" in r), None)
        source = next((" + ".join(Path(f).name for f in r["source"].split(" + ")) for r in reports if r.get("source")), None)  # file names, not local paths
        parts.append(
            f"- Null space (`rsft.null_space`): every step's update of each trained matrix was projected off the top input directions holding "
            f"{null_space.energy} of the retain texts' activations" + (f" (`{source}`" if source else " (") + ", measured on the unedited model)"
            + (f"; {free:.1%} of the input directions were left free to learn in" if free is not None else "")
        )
    for c in getattr(result, "merge_choices", None) or []:
        keys = list(c["table"][0]["params"]) if c.get("table") else []
        score_keys = [k for k in ("rel", "gen", "loc", "rel_em", "gen_em") if any(row["scores"].get(k) is not None for row in c["table"])]
        rows = ["| " + " | ".join(keys + score_keys + ["meets floor", "chosen"]) + " |", "|" + "---|" * (len(keys) + len(score_keys) + 2)]
        for row in c["table"]:
            cells = [str(row["params"][k]) for k in keys] + ["n/a" if row["scores"].get(k) is None else f"{row['scores'][k]:.3f}" for k in score_keys]
            rows.append("| " + " | ".join(cells + ["yes" if row["meets_floor"] else "no", "**yes**" if row["chosen"] else ""]) + " |")
        where = f"batch {c['batch']}" if c.get("batch") is not None else "the merge of every batch"
        flag = "" if c["met_floor"] else " No candidate reached the floor: the best locality was kept."
        parts.append(
            f"- Merge (`merge: {{auto}}`, {where}): {', '.join(f'{k}={v}' for k, v in c['params'].items())}, the best reliability with locality >= {c['floor']} "
            f"on {len(c.get('validation', []))} validation edit(s).{flag}\n\n" + "\n".join(rows) + "\n"
        )
    return ("## Choices made in the run\n\n" + "\n".join(parts) + "\n\n") if parts else ""


def write_model_card(path: Path, recipe, doc, result) -> None:
    name = recipe.name or Path(doc.path).stem
    learned = [r.get("learned_fraction") for r in result.train_reports]
    text = f"""---
library_name: transformers
tags: [knowledge-editing, mergeedit, model-merging]
base_model: {recipe.model.base}
---

# {name}

{recipe.description or "A model edited with mergeedit: robust supervised fine-tuning (R-SFT), then a merge with the base model."}

- Base model: `{recipe.model.base}`
- Edits: {result.edits} from `{recipe.dataset.path}` ({recipe.dataset.format}), in {result.batches} batch(es), strategy `{recipe.sequential.strategy}`
- Training: `{recipe.rsft.method}`, lr {recipe.rsft.lr}, batch {recipe.rsft.batch_size}, loss threshold {recipe.rsft.loss_threshold}; edits learned per batch: {", ".join(f"{x:.0%}" for x in learned if x is not None)}
- Merge: {recipe.merge.merge_method if recipe.merge else "none (the R-SFT model is the result)"}

## Edit quality

{_metrics_table(result.pre_metrics, result.metrics)}
Locality is post-edit vs pre-edit agreement of argmax tokens; teacher-forced scores give partial credit per token;
generation scores are exact match of greedy answers.

{_choices_section(recipe, result)}{_ledger_section(getattr(result, "ledger", None))}
## Recipe

```yaml
{Path(doc.path).read_text().rstrip()}
```

## Versions

{chr(10).join(f"- {k} {v}" for k, v in _versions().items())}
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)
