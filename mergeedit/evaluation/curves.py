"""Sequential-editing curves: scores on the edits so far after every k batches, as JSON and (optionally) a PNG plot.

matplotlib is an optional extra (`pip install 'mergeedit[plot]'`), imported only when a plot is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..core.errors import MergeEditError

PLOT_EXTRA = "pip install 'mergeedit[plot]' (matplotlib>=3.8)"
EDIT_METRICS = ("rel", "gen", "loc", "loc_chat", "port")
DRIFT_METRICS = ("ppl_drift_pct", "kl")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergeEditError(f"plotting curves needs matplotlib, which is not installed: {PLOT_EXTRA}") from None
    return plt


def plot_curve(points: Sequence[dict], path: Path) -> Path:
    """Edit metrics (left) and drift (right) against the number of edits so far."""
    plt = _pyplot()
    edits = [p["edits"] for p in points]
    drift = [m for m in DRIFT_METRICS if any(p.get(m) is not None for p in points)]
    fig, axes = plt.subplots(1, 2 if drift else 1, figsize=(10 if drift else 5.5, 4), squeeze=False)
    left = axes[0][0]
    for m in EDIT_METRICS:
        if any(p.get(m) is not None for p in points):
            left.plot(edits, [p.get(m) for p in points], marker="o", label=m)
    left.set(xlabel="edits so far", ylabel="teacher-forced score", ylim=(0, 1.02), title="edit quality")
    left.legend()
    if drift:
        right = axes[0][1]
        right.plot(edits, [p.get("ppl_drift_pct") for p in points], marker="o", color="tab:red", label="ppl drift %")
        right.set(xlabel="edits so far", ylabel="perplexity drift (%)", title="general-ability drift")
        twin = right.twinx()
        twin.plot(edits, [p.get("kl") for p in points], marker="s", color="tab:purple", label="next-token KL")
        twin.set_ylabel("KL(ref || post), nats")
        right.legend(handles=right.get_lines() + twin.get_lines(), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_curve(points: Sequence[dict], folder: Path) -> list[str]:
    """curve.json always; curve.png when matplotlib is installed. Returns notes for the user (e.g. the missing extra)."""
    folder = Path(folder)
    (folder / "curve.json").write_text(json.dumps(list(points), indent=2))
    try:
        plot_curve(points, folder / "curve.png")
    except MergeEditError as exc:
        return [f"curve written to {folder / 'curve.json'}; no curve.png: {exc}"]
    return [f"curve written to {folder / 'curve.json'} and {folder / 'curve.png'}"]
