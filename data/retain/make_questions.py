"""Regenerate questions.jsonl: 200 general questions, each followed by SmolLM2-135M-Instruct's own short answer (run by hand, once).

    .venv/bin/python data/retain/make_questions.py

The retain KL (mergeedit.editing.retain) on generic prose (retain.jsonl) keeps perplexity on text, but ZsRE's locality
probes are questions followed by a short answer, and edits move exactly that behaviour: answering a question. These
texts give the KL term question-shaped text to hold: ``text`` is the question, a space, and the first line of the
unedited model's greedy answer to it (asked in the chat form, as a user would ask; at most 12 new tokens, cut at the
first newline or sentence end), written raw, as the teacher-forced locality protocol scores its probes.

The questions were written for mergeedit (general knowledge, everyday life, science, language, numbers; lowercase and
without a question mark, as search queries are). They are not ZsRE's locality probes (Natural Questions, prefixed
"nq question:"), and none names a subject of the shipped ZsRE records: tests/test_retain.py checks both, and that no
question is an edit prompt or paraphrase. The answers are the model's, not facts: the KL keeps what the unedited
model said, right or wrong.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

QUESTIONS = [
    # science
    "what is the boiling point of water at sea level",
    "how many legs does a spider have",
    "what gas do plants take in from the air",
    "what is the chemical symbol for gold",
    "how long does it take the earth to go around the sun",
    "what is the largest planet in the solar system",
    "what causes the seasons on earth",
    "what is the hardest natural substance",
    "how many bones are in the adult human body",
    "what is the speed of light",
    "which organ pumps blood through the body",
    "what is the main gas in the air we breathe",
    "what do bees make from nectar",
    "how many chambers does the human heart have",
    "what is the freezing point of water in fahrenheit",
    "what is the closest star to the earth",
    "what part of the plant makes food",
    "what is the smallest unit of life",
    "what force keeps us on the ground",
    "how many planets are in the solar system",
    "what is the chemical formula for water",
    "what kind of animal is a whale",
    "what do caterpillars turn into",
    "what is the largest organ of the human body",
    "which blood cells fight infection",
    "what is the study of rocks called",
    "what metal is liquid at room temperature",
    "how many teeth does an adult human have",
    "what is the process by which plants make food",
    "what is the center of an atom called",
    "which planet is known as the red planet",
    "what does a thermometer measure",
    "what is the tallest kind of grass",
    "what is the fastest land animal",
    "what is a baby kangaroo called",
    "how many hearts does an octopus have",
    "what is the largest mammal on earth",
    "what do you call animals that eat only plants",
    "what is the outer layer of the earth called",
    "what type of energy comes from the sun",
    # geography and places (no named place of the ZsRE sample)
    "what is the largest ocean on earth",
    "what is the longest river in the world",
    "what is the largest desert in the world",
    "how many continents are there",
    "what is the coldest continent",
    "what is a large body of salt water called",
    "what is the highest mountain on earth",
    "what do you call a piece of land surrounded by water",
    "what is the line that divides the earth into north and south",
    "what is the capital of a country usually home to",
    "what is the name for a group of islands",
    "what is a river's mouth",
    "what kind of climate does a rainforest have",
    "what is a volcano",
    "what is the imaginary line at zero degrees longitude called",
    "what causes tides in the ocean",
    "what is the driest place on earth",
    "how much of the earth is covered by water",
    "what is a glacier made of",
    "what is the difference between weather and climate",
    # history and society
    "when did the first person walk on the moon",
    "what was the first country to use paper money",
    "what is democracy",
    "what does a mayor do",
    "who makes laws in a parliament",
    "what is a constitution",
    "when did the second world war end",
    "what was the industrial revolution",
    "what is the oldest known form of writing",
    "what is an empire",
    "what did the ancient egyptians build as tombs",
    "what is a monarchy",
    "what are taxes used for",
    "what is the purpose of the united nations",
    "what is a census",
    "what is the role of a judge",
    "when was the printing press invented",
    "what is a pension",
    "what is a trade union",
    "what is the difference between a city and a town",
    # language and arts
    "what is a noun",
    "what is the plural of mouse",
    "what is a synonym",
    "how many letters are in the english alphabet",
    "what is a haiku",
    "what is the opposite of ancient",
    "what is a sonnet",
    "how many strings does a standard guitar have",
    "what is a symphony",
    "what are the primary colours",
    "what is an autobiography",
    "what is a metaphor",
    "what instrument has black and white keys",
    "what is the past tense of run",
    "what is a palindrome",
    "what is a novel",
    "what does a conductor do in an orchestra",
    "what is the art of paper folding called",
    "what is a self portrait",
    "what is a limerick",
    # numbers and everyday knowledge
    "how many days are in a leap year",
    "how many minutes are in an hour",
    "what is ten times ten",
    "how many sides does a hexagon have",
    "how many weeks are in a year",
    "what is half of one hundred",
    "how many hours are in a day",
    "what is the square root of sixty four",
    "how many months have thirty days",
    "how many centimetres are in a metre",
    "what is a dozen",
    "how many degrees are in a right angle",
    "what is the sum of the angles in a triangle",
    "how many seconds are in a minute",
    "what is a prime number",
    "how many cards are in a standard deck",
    "what is a percentage",
    "how many zeros are in one million",
    "what comes after the number nine",
    "what is the value of pi to two decimal places",
    # food and home
    "what is bread made from",
    "what is the main ingredient in guacamole",
    "what do cows produce that people drink",
    "how do you boil an egg",
    "what fruit is used to make wine",
    "what is cheese made from",
    "what vegetable makes people cry when they cut it",
    "what is the main ingredient of hummus",
    "what is honey made by",
    "how long should you brush your teeth",
    "what is a good source of vitamin c",
    "what is the most popular hot drink in the world",
    "what grain is used to make popcorn",
    "what is tofu made from",
    "how do you keep food fresh",
    "what is yeast used for in baking",
    "what is the difference between a fruit and a vegetable",
    "what spice is made from the stigma of a flower",
    "what is a vegetarian",
    "how often should you water a houseplant",
    # sports and games
    "how many players are on a soccer team",
    "how long is a marathon",
    "how many rings are on the olympic flag",
    "what sport uses a racket and a shuttlecock",
    "how many points is a touchdown worth",
    "what is a hat trick",
    "how many squares are on a chess board",
    "what game uses a cue and balls on a table",
    "how many holes are played in a round of golf",
    "what is the highest score in bowling",
    "how many players are on a basketball court for one team",
    "what sport is played at wimbledon",
    "what is a referee",
    "what does a goalkeeper do",
    "how many pieces does each player start with in chess",
    "what is a relay race",
    "what sport uses a puck",
    "how many sets are in a tennis match",
    "what is a triathlon",
    "what is the piece that moves in an l shape in chess",
    # technology
    "what does a computer mouse do",
    "what is the internet",
    "what is a password used for",
    "what does cpu stand for",
    "what is an email",
    "what is a smartphone",
    "what does a printer do",
    "what is software",
    "what is a website",
    "what is artificial intelligence",
    "what is a battery",
    "what does wifi do",
    "what is a spreadsheet",
    "what is a pixel",
    "what is a search engine",
    "what is the cloud in computing",
    "what is a keyboard shortcut",
    "what does a router do",
    "what is a computer virus",
    "what is a byte",
    # health and body
    "how many hours of sleep do adults need",
    "what is a healthy heart rate",
    "why is exercise good for you",
    "what is a vaccine",
    "what causes a cold",
    "how much water should you drink a day",
    "what is a calorie",
    "what does the liver do",
    "what is a balanced diet",
    "why do we sneeze",
    "what is an allergy",
    "what do the lungs do",
    "what is blood pressure",
    "why do we need vitamins",
    "what is a fever",
    "how can you prevent the flu",
    "what does the brain do",
    "why do muscles get sore after exercise",
    "what is first aid",
    "what is stress",
]


def short_answer(text: str, limit_words: int = 12) -> str:
    """The first line, cut at the first sentence end, at most `limit_words` words."""
    line = text.strip().split("\n", 1)[0].strip()
    for stop in (". ", "! ", "? "):
        if stop in line:
            line = line.split(stop, 1)[0] + stop.strip()
    return " ".join(line.split()[:limit_words])


def main() -> None:
    from make_retain import greedy, reference_model, write_lines  # beside this script

    from mergeedit.editing.prompts import chat_prompt

    assert len(QUESTIONS) == len(set(QUESTIONS)) == 200, (len(QUESTIONS), len(set(QUESTIONS)))
    tok, model = reference_model()
    lines = []
    with torch.no_grad():
        for n, question in enumerate(QUESTIONS, 1):
            ids = tok(chat_prompt(tok, question), return_tensors="pt", add_special_tokens=False)
            answer = short_answer(greedy(model, tok, ids, 24))
            if not answer:
                raise SystemExit(f"no answer to {question!r}")
            lines.append(json.dumps({"prompt": question, "text": f"{question} {answer}"}, ensure_ascii=False))
            if n % 20 == 0:
                print(f"{n}/{len(QUESTIONS)}", file=sys.stderr, flush=True)
    write_lines(Path(__file__).with_name("questions.jsonl"), lines)


if __name__ == "__main__":
    main()
