"""One edit request and its probes, whatever dataset it came from (EasyEdit's conventions)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer scored on it (teacher-forced or by generation)."""

    prompt: str
    answer: str
    kind: str = ""  # e.g. "Relation_Specificity", "Reasoning", "neighborhood"


@dataclass(frozen=True)
class EditRecord:
    """A fact to install: `prompt` should be answered with `target`.

    rephrases: paraphrased prompts with the same target (generalization).
    locality: prompts whose pre-edit behaviour must not change (answer = the dataset's answer, for reference).
    portability: prompts whose answer follows from the new fact (post-edit accuracy only).
    """

    case_id: str
    prompt: str
    target: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrases: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)
