"""How an edit becomes training tokens: the prompt format, and where the answer tokens start.

raw: EasyEdit's "question answer" string, cut exactly as the teacher-forced metrics cut it (one tokenization of the
whole string; the answer tokens are those reaching past the question). chat: the tokenizer's chat template, the
question as the user turn and the answer (then end-of-turn) as the assistant's. both: every edit in both forms, so the
fact is learned for teacher-forced scoring and for chat-style generation alike. template: a string with {prompt},
answered after a space.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .tokens import encode_prompt_target

PROMPT_MODES = ("raw", "chat", "both", "auto")


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (the chat form is possible)."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_setting_problem(setting: object) -> str | None:
    """Why `setting` is neither one of the four modes nor a template whose only field is {prompt}; None if it is.

    A typo of a mode (`chatt`, `Raw`) or a template without {prompt} would otherwise train every edit on one constant
    string, silently."""
    import difflib
    import string

    if not isinstance(setting, str):
        return f"expected one of {', '.join(PROMPT_MODES)} or a template containing {{prompt}}, got {type(setting).__name__}"
    if setting in PROMPT_MODES:
        return None
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(setting) if f is not None]
    except ValueError as exc:
        return f"{setting!r} is not a valid template ({exc}); write literal braces as {{{{ and }}}}"
    if not fields:
        close = difflib.get_close_matches(setting.strip().lower(), PROMPT_MODES, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{setting!r} is neither a mode ({', '.join(PROMPT_MODES)}) nor a template containing {{prompt}}{hint}"
    for field in fields:
        name = field.split(".")[0].split("[")[0]
        if name != "prompt":
            shown = "{" + field + "}" if field else "{}"
            return f"template {setting!r} names the field {shown}, but only {{prompt}} (the edit's question) is filled in; write literal braces as {{{{ and }}}}"
        if name != field:
            return f"template {setting!r} uses {{{field}}}; write plain {{prompt}}"
    return None


@dataclass(frozen=True)
class PromptFormat:
    """The form edits are asked in: `kind`, a prompt `template` ({prompt}), and the chat form's `system_prompt`
    (`dataset.system_prompt`: None leaves the template's default system turn out). Training, the retain set's chat
    lines and every chat-form score (generation, `loc_chat`) use the same one."""

    kind: str  # "raw" | "chat" | "both" | "template"
    template: str | None = None
    system_prompt: str | None = None

    @classmethod
    def resolve(cls, setting: str, tokenizer, system_prompt: str | None = None) -> "PromptFormat":
        return replace(cls._resolve(setting, tokenizer), system_prompt=system_prompt)

    @classmethod
    def _resolve(cls, setting: str, tokenizer) -> "PromptFormat":
        problem = prompt_setting_problem(setting)
        if problem is not None:
            from ..core.errors import MergeEditError

            raise MergeEditError(f"dataset.prompt: {problem}")
        has_chat = has_chat_template(tokenizer)
        if setting == "auto":
            return cls("both") if has_chat else cls("raw")
        if setting in ("chat", "both") and not has_chat:
            from ..core.errors import MergeEditError

            raise MergeEditError(f"dataset.prompt: '{setting}' needs a chat template and the tokenizer has none; use raw or a template with {{prompt}}")
        if setting in ("chat", "raw", "both"):
            return cls(setting)
        return cls("template", setting)

    @property
    def uses_chat(self) -> bool:
        return self.kind in ("chat", "both")

    def describe(self) -> str:
        form = self.kind if self.kind != "template" else f"template {self.template!r}"
        return form if self.system_prompt is None else f"{form}, system prompt {self.system_prompt!r}"

    def raw_prompt(self, question: str) -> str:
        return self.template.format(prompt=question) if self.kind == "template" else question


def chat_prompt(tokenizer, question: str, system_prompt: str | None = None) -> str:
    """The chat-template text of one user turn and the assistant header.

    Templates such as SmolLM2's inject a default system prompt (~20 tokens, often half an edit's tokens) when the
    conversation has none; unless `system_prompt` asks for one, that turn is left out: the conversation is rendered
    with an empty system turn, which is then cut off (when the template renders it as a separate prefix).
    """
    user = {"role": "user", "content": question}
    if system_prompt is not None:
        return tokenizer.apply_chat_template([{"role": "system", "content": system_prompt}, user], tokenize=False, add_generation_prompt=True)
    plain = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    try:
        empty = {"role": "system", "content": ""}
        with_empty = tokenizer.apply_chat_template([empty, user], tokenize=False, add_generation_prompt=True)
        empty_turn = tokenizer.apply_chat_template([empty], tokenize=False, add_generation_prompt=False)
    except Exception:  # a template that rejects system turns has no default one to drop
        return plain
    if empty_turn and with_empty.startswith(empty_turn):
        bare = with_empty[len(empty_turn) :]
        if len(bare) < len(plain) and question in bare:
            return bare
    return plain


def chat_pair(tokenizer, question: str, answer: str, system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """(chat prompt ids ending with the assistant header, answer ids + end of turn)."""
    prompt = chat_prompt(tokenizer, question, system_prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def raw_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    ids, start, stop = encode_prompt_target(tokenizer, prompt, answer)
    return ids[:start], ids[start:stop]


def raw_pair_eos(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """The raw pair with EOS trained after the answer, so generation stops there."""
    p, a = raw_pair(tokenizer, prompt, answer)
    eos = getattr(tokenizer, "eos_token_id", None)
    return p, (a + [eos] if isinstance(eos, int) else a)


def training_pairs(
    tokenizer, fmt: PromptFormat, question: str, answer: str, *, system_prompt: str | None = None, eos: bool = False
) -> list[tuple[list[int], list[int]]]:
    """The (prompt ids, answer ids) an edit trains on. Chat answers always end with the end-of-turn token; `eos` adds
    the tokenizer's EOS after raw answers too."""
    pairs = []
    if fmt.kind in ("raw", "both", "template"):
        pairs.append((raw_pair_eos if eos else raw_pair)(tokenizer, fmt.raw_prompt(question), answer))
    if fmt.uses_chat:
        pairs.append(chat_pair(tokenizer, question, answer, system_prompt))
    return pairs


def text_positions(tokenizer, prompt_ids: list[int], text: str) -> list[int] | None:
    """Positions in `prompt_ids` of the tokens that spell `text` (its first occurrence in the decoded prompt), or None
    when the prompt does not contain it. Found on the decoded text, so any prompt form (raw, chat, a template) and any
    tokenizer work: a token belongs to `text` when its characters overlap it."""
    ends, decoded = [], ""
    for k in range(1, len(prompt_ids) + 1):
        decoded = tokenizer.decode(prompt_ids[:k])
        ends.append(len(decoded))
    start = decoded.find(text) if text else -1
    if start < 0:
        return None
    stop = start + len(text)
    out, begin = [], 0
    for i, end in enumerate(ends):
        if end > start and begin < stop:  # token i spans characters [begin, end) of the decoded prompt
            out.append(i)
        begin = max(begin, end)
    return out or None
