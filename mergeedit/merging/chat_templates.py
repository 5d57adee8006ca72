"""The config's `chat_template`: `auto`, a built-in name, or a literal Jinja template, written as chat_template.jinja.

`auto` follows mergekit: the template most input models share (compared after stripping whitespace); none found leaves
the copied tokenizer's own. The built-in templates are our own renderings of each family's published prompt format:

- chatml: OpenAI's ChatML (`<|im_start|>role\\n...<|im_end|>`), as documented in the Hugging Face chat templating guide.
- llama3: Meta's Llama 3 model card prompt format (`<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`).
- alpaca: the Stanford Alpaca repository's instruction prompt (`### Instruction:` / `### Response:`).
- mistral: Mistral AI's instruct format (`[INST] ... [/INST]`, system text prepended to the first user turn).
- exaone: LG AI Research's EXAONE 3 model card format (`[|system|]`, `[|user|]`, `[|assistant|]`, `[|endofturn|]`).

transformers 5 loads chat_template.jinja in preference to a `chat_template` entry of tokenizer_config.json, and saves it
that way; we do the same and drop the stale entry so the two never disagree.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

from ..core.errors import MergeEditError
from ..core.json_shape import TOKENIZER_CONFIG, read_json
from ..core.paths import read_regular_bytes

TEMPLATE_FILE = "chat_template.jinja"

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}"
        "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join('\\n\\n') %}"
        "{% set ns = namespace(first=true) %}"
        "{% for message in messages if message['role'] != 'system' %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system + '\\n\\n' if ns.first and system else '') + message['content'] + ' [/INST]' }}"
        "{% set ns.first = false %}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def folder_chat_template(folder: Path) -> Optional[str]:
    """A tokenizer folder's default chat template: chat_template.jinja first, then tokenizer_config.json's entry."""
    jinja = folder / TEMPLATE_FILE
    if os.path.lexists(jinja):
        try:
            return read_regular_bytes(jinja, "chat template").decode("utf-8")
        except UnicodeDecodeError:
            raise MergeEditError(f"{jinja}: the chat template is not UTF-8 text; re-save it") from None
    cfg_path = folder / "tokenizer_config.json"
    if not os.path.lexists(cfg_path):
        return None
    entry = _tokenizer_config(cfg_path).get("chat_template")
    if isinstance(entry, list):  # named templates: [{"name": ..., "template": ...}]
        entry = next((e["template"] for e in entry if e["name"] == "default"), None)
    return entry if isinstance(entry, str) else None


def _tokenizer_config(path: Path) -> dict:
    return read_json(path, TOKENIZER_CONFIG, what="tokenizer_config.json", fix="fix or re-download the tokenizer files")


def check_template_syntax(template: str, where: str) -> str:
    """`template` if Jinja (as transformers renders chat templates: sandboxed, with loop controls) can parse it."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except TemplateSyntaxError as exc:
        raise MergeEditError(f"{where}: the chat template does not parse as Jinja: {exc.message} (template line {exc.lineno}); fix the template") from None
    return template


def resolve_chat_template(setting: str, folders: list[Path], where: str) -> Optional[str]:
    """The template text for the config's value; None when `auto` finds no input template (keep the tokenizer's own)."""
    if setting == "auto":
        found = [t.strip() for t in (folder_chat_template(f) for f in folders) if t and t.strip()]
        return check_template_syntax(Counter(found).most_common(1)[0][0], where) if found else None
    if setting in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[setting]
    if "{{" in setting or "{%" in setting:
        return check_template_syntax(setting, where)
    raise MergeEditError(
        f"{where}: chat_template '{setting[:40]}' is neither a built-in name ({', '.join(sorted(BUILTIN_TEMPLATES))}), "
        "'auto', nor a Jinja template; use one of those"
    )


def write_chat_template(out_dir: Path, template: str) -> None:
    """Store the template the way transformers 5 saves it, removing any copied tokenizer_config.json entry."""
    (out_dir / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    cfg_path = out_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = _tokenizer_config(cfg_path)
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
