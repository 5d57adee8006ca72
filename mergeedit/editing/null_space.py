"""Null-space projection: keep every trained matrix's update out of the directions unrelated text uses.

The retain KL (editing.retain) asks the edited model to stay close to the unedited one on unrelated text; this holds
it there by construction, for as much of that text's activations as the recipe asks (`rsft.null_space`), in the way of
AlphaEdit (Fang et al., ICLR 2025: "AlphaEdit: Null-Space Constrained Knowledge Editing"), applied here to every step
of fine-tuning instead of to one closed-form update:

    for each trained matrix W (out x in), over the inputs x it sees on the retain texts (the unedited model):
        K = sum x x^T                        (in x in, every non-padding position)
        U = the top eigenvectors of K holding `energy` of its trace (the directions unrelated text uses)
        P = I - U U^T                        (projection onto the rest)
    before every optimizer step: grad <- grad P           (Adam's moments see only the directions left free)
    after every optimizer step:  W <- W0 + (W - W0) P      (W0: the weights when training started)

so the update ``dW = W - W0`` satisfies ``dW U = 0``: on an input inside span(U) the matrix computes what it did before.
Projecting the gradient first matters with Adam: a weight gradient is a sum of ``delta x^T`` over positions, and most of
its energy lies along the inputs' main directions (the held ones), so Adam's per-element scale, computed from the whole
gradient, would shrink the steps the free directions get; the projection after the step is what makes the promise
exact (Adam's per-element division takes its update out of the free subspace).
When every trained matrix of a window is projected, a retain text's activations are unchanged layer after layer, up
to the energy left out (1 - energy of each K). The edits are learned in the directions that are left: a subject's
own features, where they are not common to the retain text. `energy` trades locality against reliability: at 1.0
nothing could change; the fraction of directions kept free is reported (`describe`).

Only 2-D weights of `torch.nn.Linear` modules are projected (an MLP's gate, up and down projections, attention
projections); any other trained tensor (a norm's scale, an embedding) is left as trained and listed in `describe`.
The projections are computed once, from the unedited model, and reused for every sequential batch; `W0` is each
batch's starting point, so every batch's own update is projected.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from ..core.errors import MergeEditError
from .tokens import model_inputs

__all__ = ["NullSpaceProjector", "Projection", "input_second_moments", "projection_from_moment"]


def _linear_modules(model, trainable: Iterable[str]) -> dict[str, torch.nn.Linear]:
    """Each trained parameter name that is a Linear module's weight -> that module."""
    modules = dict(model.named_modules())
    out: dict[str, torch.nn.Linear] = {}
    for name in trainable:
        owner, _, leaf = name.rpartition(".")
        m = modules.get(owner)
        if leaf == "weight" and isinstance(m, torch.nn.Linear):
            out[name] = m
    return out


class _Enough(Exception):
    """Raised inside the forward once every trained matrix has read its input: the rest of the model (the layers
    above the trained window, the output layer) would compute nothing the moments use."""


def input_second_moments(model, trainable: Iterable[str], batches: Iterable[dict]) -> tuple[dict[str, torch.Tensor], int]:
    """K = sum x x^T (float64) of the inputs each trained Linear weight sees, over every non-padding position of
    `batches` (dicts with input_ids and attention_mask, and position_ids where the model takes them); and the count
    of positions. The model runs without gradients, in its current precision; after the first batch, each forward
    stops as soon as the last trained matrix has read its input (unless a trained module ran twice in the first
    batch's forward). Matrices that read the same input tensor (an MLP's gate and up projections) get the same K
    object, accumulated once."""
    linears = _linear_modules(model, trainable)
    if not linears:
        return {}, sum(int(b["attention_mask"].bool().sum()) for b in batches)
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}  # a matrix reading the input another one already read -> that one
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this batch's inputs by id, held so no id is reused within it
    mask_now: list[Optional[torch.Tensor]] = [None]
    read_now: set[str] = set()  # the matrices that have read their input in this batch's forward
    # the first batch runs the whole model; the later ones stop early only when no trained matrix ran twice in a
    # forward (a module run twice, as in a weight-shared layer, must see all of its inputs)
    ran_twice, stop_early = [False], [False]
    hooks = []

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0]
            ran_twice[0] = ran_twice[0] or name in read_now
            read_now.add(name)
            first = seen.get(id(x))
            if first is not None and first[0] is x:
                alias[name] = first[1]
            else:
                seen[id(x)] = (x, name)
                keep = mask_now[0]
                rows = x[keep] if keep is not None and keep.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
                rows = rows.detach().to(torch.float64)
                k = rows.T @ rows
                sums[name] = k if name not in sums else sums[name] + k
            if stop_early[0] and len(read_now) == len(linears):  # every trained matrix has read its input: the layers above are not needed
                raise _Enough

        return hook

    for name, m in linears.items():
        hooks.append(m.register_forward_pre_hook(hook_for(name)))
    positions = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                read_now.clear()
                mask = batch["attention_mask"].bool()
                mask_now[0] = mask
                positions += int(mask.sum())
                try:
                    model(**model_inputs(model, batch))
                except _Enough:
                    pass
                stop_early[0] = not ran_twice[0]
    finally:
        seen.clear()
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {**sums, **{name: sums[first] for name, first in alias.items() if first in sums}}, positions


def _held_and_free(k: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """The eigenvectors of the symmetric `k` (float64, columns by descending eigenvalue) and how many of the first
    hold `energy` of its trace (the fewest that do; 0 for a zero or non-finite trace). Ties in the ordering are
    broken by eigh's (deterministic) order."""
    if not 0 < energy < 1:
        raise MergeEditError(f"null_space energy must be in (0, 1), got {energy}")
    values, vectors = torch.linalg.eigh(k.to(torch.float64))
    values = values.clamp_min(0).flip(0)
    vectors = vectors.flip(1)
    total = float(values.sum())
    if total <= 0 or not math.isfinite(total):
        return vectors, 0
    share = torch.cumsum(values, 0) / total
    taken = int((share < energy).sum()) + 1  # the fewest whose share reaches `energy`
    return vectors, min(taken, k.shape[0])


def projection_from_moment(k: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """P = I - U U^T (float32), U the fewest top eigenvectors of the symmetric `k` whose eigenvalues hold `energy` of
    its trace; and how many were taken."""
    vectors, taken = _held_and_free(k, energy)
    u = vectors[:, :taken]
    p = torch.eye(k.shape[0], dtype=torch.float64) - u @ u.T
    return p.to(torch.float32), taken


class Projection:
    """x -> x P with P = I - U U^T, stored as the smaller side of the eigenbasis: the held directions U (then
    x - (x U) U^T) or the free ones V (then (x V) V^T, as P = V V^T). Both cost 4 * rows * in * r multiply-adds
    against 2 * rows * in^2 for the full matrix (r <= in / 2), and hold in * r floats instead of in^2."""

    def __init__(self, basis: torch.Tensor, held: bool, taken: int):
        self.basis = basis  # [in, r] float32, orthonormal columns
        self.held = held  # True: the columns are the held directions; False: the free ones
        self.taken = taken  # held directions
        self.size = basis.shape[0]
        self._cast: dict[torch.dtype, torch.Tensor] = {}  # the basis in a half precision, made once (apply's `half`)

    @classmethod
    def from_moment(cls, k: torch.Tensor, energy: float) -> "Projection":
        vectors, taken = _held_and_free(k, energy)
        held = taken <= k.shape[0] - taken
        basis = vectors[:, :taken] if held else vectors[:, taken:]
        return cls(basis.to(torch.float32).contiguous(), held, taken)

    def to(self, device) -> "Projection":
        return self if self.basis.device == torch.device(device) else Projection(self.basis.to(device), self.held, self.taken)

    def apply(self, x: torch.Tensor, half: Optional[torch.dtype] = None) -> torch.Tensor:
        """x P (float32) for x [..., in]. With `half` (bf16, fp16) the two products run in that precision (the
        result is float32): P is then exact only to that precision's rounding, which is enough for a gradient
        (`NullSpaceProjector.project_grads`), never for the weights."""
        if half is None:
            x = x.float()
            along = (x @ self.basis) @ self.basis.T
        else:
            basis = self._cast.get(half)
            if basis is None:
                basis = self._cast[half] = self.basis.to(half)
            along = ((x.to(half) @ basis) @ basis.T).float()
            x = x.float()
        return x - along if self.held else along

    def matrix(self) -> torch.Tensor:
        """P itself (in x in, float32): for checks, not for training."""
        return self.apply(torch.eye(self.size, dtype=torch.float32, device=self.basis.device))


class NullSpaceProjector:
    """``start(named)`` when a training call begins (remembers W0), ``project_grads(named)`` before and
    ``project(named)`` after every optimizer step."""

    def __init__(self, projections: dict[str, Projection], energy: float, positions: int, skipped: list[str], source: str = ""):
        self.projections = projections  # trained weight name -> its Projection; matrices with the same input share one
        self.energy = energy
        self.positions = positions
        self.skipped = skipped
        self.source = source
        self._start: dict[str, torch.Tensor] = {}

    @classmethod
    def build(cls, model, trainable: list[str], batches: Iterable[dict], energy: float, source: str = "") -> "NullSpaceProjector":
        """From the model as it is now (the unedited one) and the retain batches (RetainKL.batches())."""
        moments, positions = input_second_moments(model, trainable, batches)
        if positions == 0:
            raise MergeEditError("rsft.null_space: the retain set has no positions to measure")
        projections: dict[str, Projection] = {}
        done: dict[int, Projection] = {}  # id(K) -> its Projection: gate and up share one K, and so one projection
        for name in trainable:
            k = moments.get(name)
            if k is None:
                continue
            if id(k) not in done:
                done[id(k)] = Projection.from_moment(k, energy)
            projections[name] = done[id(k)]
        skipped = [n for n in trainable if n not in projections]
        return cls(projections, energy, positions, skipped, source)

    def start(self, named: dict) -> None:
        """Remember the starting weights of every projected matrix (a training call's W0)."""
        self._start = {n: named[n].detach().clone() for n in self.projections}
        moved: dict[int, Projection] = {}  # once per training call, not every step; shared projections stay shared
        for n, p in self.projections.items():
            if id(p) not in moved:
                moved[id(p)] = p.to(named[n].device)
            self.projections[n] = moved[id(p)]

    def project_grads(self, named: dict, half: Optional[torch.dtype] = None) -> None:
        """grad <- grad P for every projected matrix that has a gradient (before the optimizer step).

        `half`: the training's autocast precision, in which these products then run (on a CPU with bf16 units, 2-4x
        faster). A gradient is already a bf16 computation's result there; the few parts in a thousand of it the
        rounding leaves along the held directions reach Adam's moments, never the weights: `project`, in float32
        after the step, is what keeps the update exactly off the held directions."""
        with torch.no_grad():
            for n, p in self.projections.items():
                g = named[n].grad
                if g is not None:
                    g.copy_(p.apply(g, half).to(g.dtype))

    def project(self, named: dict) -> None:
        """W <- W0 + (W - W0) P for every projected matrix, in place."""
        if not self._start:
            raise MergeEditError("NullSpaceProjector.project before start")
        with torch.no_grad():
            for n, p in self.projections.items():
                w, w0 = named[n], self._start[n]
                w.copy_((w0.float() + p.apply(w.float() - w0.float())).to(w.dtype))

    def finish(self) -> None:
        self._start = {}

    def describe(self) -> dict:
        """What the run stores: the energy, the positions measured, and per matrix shape how many directions were held."""
        free = {n: p.size - p.taken for n, p in self.projections.items()}
        return {
            "energy": self.energy,
            "positions": self.positions,
            "source": self.source,
            "held_directions": {n: p.taken for n, p in self.projections.items()},
            "free_directions": free,
            "free_share": sum(free.values()) / max(sum(p.size for p in self.projections.values()), 1),
            "not_projected": list(self.skipped),
        }
