"""Regenerate generic.jsonl: SmolLM2-135M-Instruct's greedy continuations of 40 generic prompts (run by hand, once).

    .venv/bin/python data/drift/make_generic.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = [
    "The history of the bicycle begins",
    "Photosynthesis is the process by which",
    "A good breakfast usually includes",
    "The main difference between weather and climate is",
    "When you learn a new language, the hardest part is",
    "The city council met on Tuesday to discuss",
    "Water boils at a lower temperature on mountains because",
    "To make a simple tomato sauce, you",
    "The first computers were",
    "Many people enjoy gardening because",
    "The ocean covers most of the Earth's surface and",
    "In the morning, the train station was",
    "A healthy diet should contain",
    "The library opens at nine o'clock and",
    "Exercise is important for children because",
    "The recipe calls for two cups of flour and",
    "Volcanoes form when",
    "The museum's newest exhibition shows",
    "Most birds build their nests in",
    "The moon orbits the Earth and",
    "Good sleep habits include",
    "The bridge was built in the nineteenth century to",
    "A triangle has three sides, and",
    "The farmers in the valley grow",
    "Electric cars are becoming popular because",
    "The teacher asked the students to",
    "Rain forests are home to",
    "The price of bread rose last year because",
    "An email to a colleague should be",
    "The river flows through the town and",
    "Music can change a person's mood by",
    "The company announced that its new product",
    "Honey bees are important for agriculture because",
    "During the winter, many animals",
    "The old lighthouse stands on a rock and",
    "Learning to play the piano takes",
    "The human heart pumps blood through",
    "A map helps travellers",
    "The football match was postponed because",
    "Recycling paper saves",
]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeedit.models.builtin import materialize

    folder = materialize("smollm2-135m-instruct", dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = Path(__file__).with_name("generic.jsonl")
    lines = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")
            gen = model.generate(**ids, do_sample=False, num_beams=1, max_new_tokens=48, temperature=None, top_p=None, top_k=None, pad_token_id=tok.eos_token_id)
            continuation = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            lines.append(json.dumps({"prompt": prompt, "text": prompt + continuation}, ensure_ascii=False))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} texts to {out}")


if __name__ == "__main__":
    main()
