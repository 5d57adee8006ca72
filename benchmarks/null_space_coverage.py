#!/usr/bin/env python
"""How much of the evaluation's inputs lies outside the null space's held directions (issue 17, run by hand).

`rsft.null_space` keeps every trained matrix's update off the top eigen-directions of its inputs on the retain texts
(editing.null_space). An input x is then changed by the update only through its free part x P (P = I - U U^T). This
script measures, on the unedited SmolLM2-135M-Instruct, for each trained matrix of a window (gate/up share an input;
down reads its own), the share of an input set's energy that is free:

    free share = trace(P K_set) / trace(K_set),   K_set = sum x x^T over the set's non-padding positions

for three input sets: the locality probes (``prompt + " " + answer``, as the evaluation scores them), the drift texts,
and the edits' own training examples (the chat form, as R-SFT trains them). A low free share on the locality probes
and the drift texts means the update barely reaches them; a high one on the edits means there is room to learn.
Reading the evaluation's texts here is a measurement, not training: nothing is fitted to them.

`--contrast` adds, for the same number of free directions, the subspace chosen for contrast instead of energy: the top
generalized eigenvectors of (K_batch, K_retain), where the edits' inputs are largest relative to the retain text's
(K_batch from one sequential batch's edit examples, records 100-199). Its shares are printed for the locality probes,
the drift texts, unrelated questions in the same chat form (data/retain/questions.jsonl), that batch's edits, their
paraphrases and another batch's edits (records 0-99, not used to choose it).

    .venv/bin/python benchmarks/null_space_coverage.py                       # energies 0.9 0.95 0.98, shipped retain set
    .venv/bin/python benchmarks/null_space_coverage.py --retain data/retain/retain.jsonl data/retain/answers.jsonl data/retain/questions.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mergeedit.editing.datasets import load_edits
from mergeedit.editing.null_space import Projection, input_second_moments
from mergeedit.editing.retain import load_retain_texts, retain_batches
from mergeedit.models import builtin

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "data" / "zsre" / "zsre_mend_eval_first1000.json"
DRIFT = ROOT / "data" / "drift" / "generic.jsonl"


def _free_share(k_set: torch.Tensor, held: Projection) -> float:
    """trace(P K) / trace(K) for the projection's P, from its stored side."""
    if held.held:
        u = held.basis.double()
        kept = float(torch.einsum("ij,ik,kj->", u, k_set, u))  # trace(U^T K U)
        return 1.0 - kept / float(k_set.trace())
    v = held.basis.double()
    return float(torch.einsum("ij,ik,kj->", v, k_set, v)) / float(k_set.trace())


def _contrast_basis(k_batch: torch.Tensor, k_retain: torch.Tensor, count: int) -> torch.Tensor:
    """An orthonormal basis [in, count] of the span of the top `count` generalized eigenvectors of
    (K_batch, K_retain + eps I): where the batch's inputs are largest relative to the retain text's."""
    kr = k_retain / float(k_retain.trace()) + 1e-4 * torch.eye(k_retain.shape[0], dtype=torch.float64) / k_retain.shape[0]
    kb = k_batch / float(k_batch.trace())
    inv_l = torch.linalg.inv(torch.linalg.cholesky(kr))
    c = inv_l @ kb @ inv_l.T
    _, u = torch.linalg.eigh((c + c.T) / 2)
    q, _ = torch.linalg.qr(inv_l.T @ u.flip(1)[:, :count])
    return q.to(torch.float32).contiguous()


def _table(title: str, rows: dict, columns: list[str], pick) -> None:
    print(f"\n{title}")
    print(f"{'matrix':34s} {'free dirs':>10s} " + " ".join(f"{k:>18s}" for k in columns))
    for name, r in rows.items():
        print(f"{name.removeprefix('model.'):34s} {r['free_directions']:>5d}/{r['width']:<4d} " + " ".join(f"{pick(r)[k]:18.4f}" for k in columns))
    print(f"{'mean':34s} {'':10s} " + " ".join(f"{sum(pick(r)[k] for r in rows.values()) / len(rows):18.4f}" for k in columns))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=1000, help="the first N usable ZsRE records (their locality probes and training examples)")
    ap.add_argument("--layers", type=int, nargs=2, default=[4, 10], help="trained window [start, stop) (the shipped recipe's: 4 10)")
    ap.add_argument("--energy", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    ap.add_argument("--retain", nargs="+", default=None, help="retain JSONL files (default: the shipped set)")
    ap.add_argument("--contrast", action="store_true", help="also the free subspace chosen for contrast with one batch's edits")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = builtin.materialize("smollm2-135m-instruct", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    names = [f"model.layers.{i}.mlp.{m}.weight" for i in range(*args.layers) for m in ("gate_proj", "down_proj")]
    retain = load_retain_texts(args.retain)
    records = load_edits(DATASET, "zsre", limit=args.edits)
    loc = [f"{p.prompt} {p.answer}" for r in records for p in r.locality]
    drift = [json.loads(line)["text"] for line in DRIFT.read_text().splitlines() if line.strip()]
    edits = [tok.apply_chat_template([{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.target}], tokenize=False) for r in records]
    sets = {"retain": retain.texts, "locality probes": loc, "drift texts": drift, "edit examples": edits}
    if args.contrast:
        chat = lambda prompt, answer: tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)  # noqa: E731
        sets["batch"] = edits[100:200]
        sets["batch paraphrases"] = [chat(q, r.target) for r in records[100:200] for q in r.rephrases]
        sets["other batch"] = edits[:100]
        # unrelated questions in the edits' own chat form (data/retain/questions.jsonl: the unedited model's answers):
        # a subspace that only tells the chat form from plain text would reach these as much as the edits
        questions = [json.loads(line) for line in (ROOT / "data" / "retain" / "questions.jsonl").read_text().splitlines() if line.strip()]
        sets["chat questions"] = [chat(q["prompt"], q["text"][len(q["prompt"]):].strip()) for q in questions]
    t = time.perf_counter()
    moments = {}
    for label, texts in sets.items():
        batches = retain_batches(tok, texts, batch_size=16, max_tokens=96)
        moments[label] = input_second_moments(model, names, batches)
    print(f"moments of {len(names)} matrices over {', '.join(f'{k} ({v[1]} positions)' for k, v in moments.items())}: {time.perf_counter() - t:.0f} s")
    out = {"retain": retain.source, "layers": args.layers, "energies": {}}
    shown = ["locality probes", "drift texts", "edit examples"] + (["chat questions"] if args.contrast else [])
    contrasted = [k for k in sets if k in ("locality probes", "drift texts", "chat questions", "batch", "batch paraphrases", "other batch")]
    for energy in args.energy:
        rows = {}
        for name in names:
            held = Projection.from_moment(moments["retain"][0][name], energy)
            free = held.size - held.taken
            rows[name] = {"free_directions": free, "width": held.size, **{k: _free_share(moments[k][0][name], held) for k in shown}}
            if args.contrast:
                basis = _contrast_basis(moments["batch"][0][name], moments["retain"][0][name], free)
                rows[name]["contrast"] = {k: _free_share(moments[k][0][name], Projection(basis, False, held.taken)) for k in contrasted}
        out["energies"][str(energy)] = rows
        _table(f"energy {energy}: share of each set's input energy in the free directions (what the update can reach)", rows, shown, lambda r: r)
        if args.contrast:
            _table(f"energy {energy}'s count of free directions, chosen for contrast with batch 100-199's edits", rows, contrasted, lambda r: r["contrast"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
