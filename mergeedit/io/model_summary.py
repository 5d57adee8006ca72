"""`mergeedit inspect`: what a checkpoint holds, from its headers alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..core.units import format_size
from . import architecture as arch
from .model_source import open_model


@dataclass
class ModelSummary:
    ref: str
    path: str
    architecture: str
    layers: int
    tensors: int
    parameters: int
    total_bytes: int
    dtypes: dict[str, int]
    shards: list[str]
    tied_embeddings: bool

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("model", self.ref),
            ("path", self.path),
            ("architecture", self.architecture),
            ("layers", str(self.layers)),
            ("tensors", str(self.tensors)),
            ("parameters", f"{self.parameters:,}"),
            ("size", format_size(self.total_bytes)),
            ("dtypes", ", ".join(f"{d} x{n}" for d, n in sorted(self.dtypes.items()))),
            ("shards", f"{len(self.shards)}: " + ", ".join(self.shards[:4]) + (" ..." if len(self.shards) > 4 else "")),
            ("tied embeddings", "yes (no lm_head.weight)" if self.tied_embeddings else "no"),
        ]


def summarize(ref: str) -> ModelSummary:
    model = open_model(ref)
    infos = list(model.tensors.values())
    return ModelSummary(
        ref=ref,
        path=str(model.path),
        architecture=arch.guess_architecture(model),
        layers=arch.layer_count(model),
        tensors=len(infos),
        parameters=sum(i.numel for i in infos),
        total_bytes=sum(i.nbytes for i in infos),
        dtypes=dict(Counter(i.dtype for i in infos)),
        shards=[f.name for f in model.files],
        tied_embeddings=arch.TIED_HEAD not in model.tensors and arch.tied_embedding_name(model) is not None,
    )
