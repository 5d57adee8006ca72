"""The model card (README.md) of an edited model: what was edited, how, how well, and with which versions."""

from __future__ import annotations

import platform
from pathlib import Path

from .. import __version__


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
