"""Regenerate chat_questions.jsonl from questions.jsonl (run by hand; no model needed).

    .venv/bin/python data/retain/make_chat_questions.py

Each line of questions.jsonl is ``{"prompt": question, "text": question + " " + answer}``, the answer being
SmolLM2-135M-Instruct's own greedy answer asked in the chat form. This writes the same pairs as
``{"question": question, "answer": answer}``: a retain line that `mergeedit.editing.retain` reads in the chat form the
edits are trained in (the question as a user turn, the answer as the assistant's, then the end of turn), so the retain
KL and the null space hold the model's chat answers to unrelated questions, not only its raw text.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "questions.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in rows:
        question, text = row["prompt"], row["text"]
        if not text.startswith(question + " "):
            raise SystemExit(f"questions.jsonl: text does not start with its question: {question!r}")
        out.append({"question": question, "answer": text[len(question) + 1 :]})
    (HERE / "chat_questions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    print(f"wrote {len(out)} lines to {HERE / 'chat_questions.jsonl'}")


if __name__ == "__main__":
    main()
