"""Regenerate retain.jsonl: SmolLM2-135M-Instruct's greedy continuations of 210 generic prompts (run by hand, once).

    .venv/bin/python data/retain/make_retain.py

Made exactly like data/drift/generic.jsonl (data/drift/make_generic.py), from OTHER prompts: the retain set is trained
on (the KL regulariser of mergeedit.editing.retain), the drift set is only scored, so they must share nothing
(tests/test_retain.py checks it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PROMPTS = [
    # everyday life
    "The best way to keep a kitchen clean is",
    "On rainy days, children often",
    "A good pair of walking shoes should",
    "Before going on a long trip, it is wise to",
    "The neighbours planted a row of trees along",
    "Most people drink coffee in the morning because",
    "A birthday party for a small child usually has",
    "When the power goes out at night, you can",
    "The bus was late again, so the passengers",
    "Folding laundry is easier when",
    "The smell of fresh bread in the morning",
    "A quiet room helps students",
    "The market on Saturday mornings sells",
    "If you lose your keys, the first thing to do is",
    "Washing your hands before meals",
    "The picnic was cancelled when",
    "A small apartment can feel larger if",
    "The dog waited by the door until",
    "Packing a lunch for school takes",
    "A cup of tea is often served with",
    "The shop on the corner closes early on",
    "Cleaning the windows in spring",
    "The family gathered around the table to",
    "An umbrella is useful when",
    "Most kitchens have a drawer full of",
    "The alarm clock rang, and she",
    "Grocery shopping with a list helps",
    "The children built a sandcastle that",
    "A warm blanket on a cold evening",
    "The bakery down the street makes",
    # work and school
    "A good manager listens to",
    "The meeting ran long because",
    "Writing a clear report starts with",
    "Students who take notes by hand",
    "The new employee spent her first day",
    "Group projects work best when",
    "A well-organised desk makes it easier to",
    "The exam was difficult, but most students",
    "Working from home has changed the way",
    "The school library bought new books about",
    "A short break every hour can",
    "The interview went well because the candidate",
    "Homework should be finished before",
    "The team celebrated the end of the project by",
    "A teacher can make a lesson interesting by",
    "The office printer stopped working, so",
    "Learning to type quickly",
    "The class went on a field trip to",
    "A good presentation has",
    "The deadline was moved to next week, which",
    # nature and weather
    "Autumn leaves change colour because",
    "A thunderstorm often begins with",
    "The desert is cold at night because",
    "Snow covers the fields in winter and",
    "Frogs can be heard near ponds when",
    "The wind picked up in the afternoon and",
    "Mushrooms grow best in places that",
    "A rainbow appears when",
    "The forest floor is covered with",
    "Squirrels hide nuts in the autumn so that",
    "Fog forms over the valley when",
    "Some flowers close their petals at night because",
    "The tide comes in twice a day and",
    "Wild rabbits live in burrows that",
    "A dry summer can cause",
    "The stars are easier to see in the countryside because",
    "Earthworms help the soil by",
    "Clouds are made of",
    "In spring, the days grow longer and",
    "A strong wind can knock down",
    "Butterflies begin their lives as",
    "The lake froze over during",
    "Pine trees keep their needles in winter because",
    "Hail is different from snow because",
    "After the storm, the streets were",
    # science and technology (general)
    "Sound travels faster in water than in air because",
    "A magnet can pick up",
    "Plants need sunlight, water and",
    "The human eye sees colour because",
    "Ice floats on water because",
    "A battery stores energy that",
    "Bacteria can be found almost everywhere, including",
    "Scientists use microscopes to",
    "A simple electric circuit needs",
    "Metal feels cold to the touch because",
    "The wheel made it easier for people to",
    "A thermometer measures",
    "Our bones grow stronger when",
    "Mixing baking soda and vinegar produces",
    "Light from the sun takes a few minutes to",
    "A lever makes it easier to lift",
    "Vaccines help the body by",
    "Smartphones have changed how people",
    "A computer program is a set of",
    "Solar panels turn sunlight into",
    "The brain uses a lot of energy because",
    "Glass is made by heating",
    "A compass needle points north because",
    "Salt dissolves in water because",
    "Robots are used in factories to",
    "Wind turbines generate electricity when",
    "The internet allows people to",
    "Rust forms on iron when",
    "Muscles get tired after exercise because",
    "A password should be long and",
    # food and cooking
    "To bake a loaf of bread, you need",
    "Soup tastes better the next day because",
    "A fruit salad can include",
    "Rice is cooked by",
    "Fresh vegetables stay crisp longer if",
    "The secret to a good omelette is",
    "Spicy food makes people sweat because",
    "Most cakes need eggs, sugar and",
    "A sandwich can be made with",
    "Leftovers should be stored in",
    "Boiling pasta in salted water",
    "Pancakes are usually served with",
    "The chef tasted the sauce and",
    "Apples turn brown after they are cut because",
    "Making jam at home requires",
    "A balanced lunch might have",
    "Popcorn pops because",
    "Cheese is made from",
    "Chopping onions makes people cry because",
    "A pot of stew simmered on the stove while",
    # animals
    "Cats spend a large part of the day",
    "A puppy needs to be trained to",
    "Cows are raised on farms for",
    "Owls hunt at night because",
    "Fish breathe through",
    "Horses have been used by people to",
    "Ants work together to",
    "A parrot can learn to",
    "Elephants live in groups that",
    "Spiders spin webs to",
    "Ducks float on water because",
    "Sheep are sheared in the spring so that",
    "Bats find their way in the dark by",
    "A hamster stores food in",
    "Penguins cannot fly, but they",
    "Whales come to the surface to",
    "Snails move slowly because",
    "Chickens lay eggs that",
    "A goldfish bowl should be cleaned",
    "Wolves communicate with each other by",
    # travel and places (no named places)
    "The small village at the foot of the hill",
    "A long train journey gives passengers time to",
    "The airport was busy because",
    "Hotels near the beach are often",
    "Walking through an old town, visitors can see",
    "The road through the mountains was closed after",
    "A map of the city shows",
    "Camping in the woods requires",
    "The ferry crossed the harbour in",
    "Tourists often take photographs of",
    "The hiking trail climbs steeply until",
    "A busy street at rush hour",
    "The old castle on the hill was",
    "The farmhouse stood at the end of",
    "Travelling by bicycle lets you",
    # health and the body
    "Drinking enough water each day",
    "A cold usually lasts",
    "Stretching before a run helps",
    "Brushing your teeth twice a day",
    "Too much sugar can lead to",
    "Walking every day is good for",
    "A doctor may ask a patient to",
    "Wearing sunscreen protects the skin from",
    "People yawn when they",
    "A good night's sleep helps the body",
    "Laughing with friends can",
    "Reading in dim light can make your eyes",
    "Regular check-ups help doctors",
    "A sprained ankle should be",
    "Breathing slowly and deeply can",
    # arts, hobbies and culture
    "Painting with watercolours is tricky because",
    "A good story needs",
    "The choir practised every week to",
    "Knitting a scarf takes",
    "Photography is a hobby that",
    "The audience clapped loudly when",
    "Dancing is a good way to",
    "Writing poems can help people",
    "The orchestra tuned their instruments before",
    "A board game night with friends",
    "Drawing a portrait starts with",
    "The play was so funny that",
    "Collecting stamps was once",
    "Building a model ship requires",
    "The film ended with",
    "Learning to juggle takes practice because",
    "A library card lets you",
    "The street musician played",
    "Pottery is made by shaping",
    "Crossword puzzles help keep the mind",
    # society, money and ideas
    "Saving a little money each month",
    "A town needs parks because",
    "Volunteering at a shelter",
    "Good neighbours often",
    "The price of a house depends on",
    "People vote in elections to",
    "A shopping list can save",
    "Public transport reduces",
    "Being polite to strangers",
    "A budget helps a family",
    "Friendship is important because",
    "The newspaper reported that the local",
    "Small businesses often struggle when",
    "Sharing toys teaches children",
    "A fair game needs rules that",
]


def reference_model():
    """(tokenizer, model): SmolLM2-135M-Instruct as mergeedit ships it, float32, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeedit.models.builtin import materialize

    folder = materialize("smollm2-135m-instruct", dtype="float32")
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def greedy(model, tok, ids: dict, max_new_tokens: int) -> str:
    """The greedy continuation of one tokenized prompt, decoded without special tokens."""
    gen = model.generate(**ids, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, temperature=None, top_p=None, top_k=None, pad_token_id=tok.eos_token_id)
    return tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def write_lines(out: Path, lines: list[str]) -> None:
    """All lines at once, through a temporary sibling."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {len(lines)} texts to {out}")


def main() -> None:
    tok, model = reference_model()
    lines = []
    with torch.no_grad():
        for n, prompt in enumerate(PROMPTS, 1):
            continuation = greedy(model, tok, tok(prompt, return_tensors="pt"), 48)
            lines.append(json.dumps({"prompt": prompt, "text": prompt + continuation}, ensure_ascii=False))
            if n % 20 == 0:
                print(f"{n}/{len(PROMPTS)}", file=sys.stderr, flush=True)
    write_lines(Path(__file__).with_name("retain.jsonl"), lines)


if __name__ == "__main__":
    main()
