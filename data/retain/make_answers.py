"""Regenerate answers.jsonl: general-knowledge questions, each followed by a short named-entity answer (run by hand).

    .venv/bin/python data/retain/make_answers.py

Where ZsRE locality is lost (benchmarks/README.md, T=100 controls): the edits move the model's guesses inside entity
names (its completion of "Hugo" into "Weaving"), not the shape of an answer. The prose set (retain.jsonl) and the
question set with the model's own sentence answers (questions.jsonl) hold little of that. These texts put the KL on
exactly such positions: a question, a space, and a person, work or place written out (teacher-forced, raw, as the
locality protocol reads its probes). The KL keeps the unedited model's next-token distributions at every position of
the text, right or wrong; it teaches no fact.

The questions and answers were written for mergeedit (literature, music, art, science, history, film, sport,
geography, companies, philosophy). They are not the evaluation's: a pair is dropped when its question is a ZsRE
locality probe, edit prompt or paraphrase of the shipped 1,000 records, or when the question or the answer names, as a
whole word, any subject, edit target or locality answer of those records that has a capital letter (the names; 54 of
the 213 written pairs were dropped that way). tests/test_retain.py checks the same, and the drift set.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ZSRE = HERE.parent / "zsre" / "zsre_mend_eval_first1000.json"

PAIRS = [
    # literature
    ("who wrote romeo and juliet", "William Shakespeare"),
    ("who wrote pride and prejudice", "Jane Austen"),
    ("who wrote the novel moby dick", "Herman Melville"),
    ("who wrote war and peace", "Leo Tolstoy"),
    ("who wrote the adventures of tom sawyer", "Mark Twain"),
    ("who wrote the odyssey", "Homer"),
    ("who wrote don quixote", "Miguel de Cervantes"),
    ("who wrote the divine comedy", "Dante Alighieri"),
    ("who wrote crime and punishment", "Fyodor Dostoevsky"),
    ("who wrote a tale of two cities", "Charles Dickens"),
    ("who wrote the old man and the sea", "Ernest Hemingway"),
    ("who wrote the great gatsby", "F. Scott Fitzgerald"),
    ("who wrote frankenstein", "Mary Shelley"),
    ("who wrote the raven", "Edgar Allan Poe"),
    ("who wrote one hundred years of solitude", "Gabriel Garcia Marquez"),
    ("who wrote the metamorphosis", "Franz Kafka"),
    ("who wrote jane eyre", "Charlotte Bronte"),
    ("who wrote wuthering heights", "Emily Bronte"),
    ("who wrote les miserables", "Victor Hugo"),
    ("who wrote the count of monte cristo", "Alexandre Dumas"),
    ("who wrote alice's adventures in wonderland", "Lewis Carroll"),
    ("who wrote the picture of dorian gray", "Oscar Wilde"),
    ("who wrote nineteen eighty-four", "George Orwell"),
    ("who wrote brave new world", "Aldous Huxley"),
    ("who wrote the lord of the rings", "J. R. R. Tolkien"),
    ("who wrote the chronicles of narnia", "C. S. Lewis"),
    ("who wrote the canterbury tales", "Geoffrey Chaucer"),
    ("who wrote paradise lost", "John Milton"),
    ("who wrote the call of the wild", "Jack London"),
    ("who wrote little women", "Louisa May Alcott"),
    ("who wrote the scarlet letter", "Nathaniel Hawthorne"),
    ("who wrote to kill a mockingbird", "Harper Lee"),
    ("who wrote of mice and men", "John Steinbeck"),
    ("who wrote the catcher in the rye", "J. D. Salinger"),
    ("who wrote madame bovary", "Gustave Flaubert"),
    ("who wrote faust", "Johann Wolfgang von Goethe"),
    ("who wrote the time machine", "H. G. Wells"),
    ("who wrote dracula", "Bram Stoker"),
    ("who wrote treasure island", "Robert Louis Stevenson"),
    ("who wrote gulliver's travels", "Jonathan Swift"),
    # music
    ("who composed the four seasons", "Antonio Vivaldi"),
    ("who composed the magic flute", "Wolfgang Amadeus Mozart"),
    ("who composed the moonlight sonata", "Ludwig van Beethoven"),
    ("who composed the nutcracker ballet", "Pyotr Ilyich Tchaikovsky"),
    ("who composed the blue danube waltz", "Johann Strauss II"),
    ("who composed the ring cycle of operas", "Richard Wagner"),
    ("who composed the opera carmen", "Georges Bizet"),
    ("who composed the brandenburg concertos", "Johann Sebastian Bach"),
    ("who composed the messiah oratorio", "George Frideric Handel"),
    ("who composed clair de lune", "Claude Debussy"),
    ("who composed the rite of spring", "Igor Stravinsky"),
    ("who composed rhapsody in blue", "George Gershwin"),
    ("who composed the planets suite", "Gustav Holst"),
    ("who composed the opera la traviata", "Giuseppe Verdi"),
    ("who composed the opera madama butterfly", "Giacomo Puccini"),
    ("who composed bolero", "Maurice Ravel"),
    ("who was the lead singer of queen", "Freddie Mercury"),
    ("who was known as the king of rock and roll", "Elvis Presley"),
    ("who was known as the king of pop", "Michael Jackson"),
    ("who sang what a wonderful world", "Louis Armstrong"),
    ("who sang respect in 1967", "Aretha Franklin"),
    ("who sang blowin in the wind", "Bob Dylan"),
    ("who sang like a rolling stone", "Bob Dylan"),
    ("which band recorded abbey road", "The Beatles"),
    ("which band recorded the dark side of the moon", "Pink Floyd"),
    ("who sang purple rain", "Prince"),
    # art
    ("who painted the mona lisa", "Leonardo da Vinci"),
    ("who painted the starry night", "Vincent van Gogh"),
    ("who painted guernica", "Pablo Picasso"),
    ("who painted the ceiling of the sistine chapel", "Michelangelo"),
    ("who painted the birth of venus", "Sandro Botticelli"),
    ("who painted girl with a pearl earring", "Johannes Vermeer"),
    ("who painted the persistence of memory", "Salvador Dali"),
    ("who painted the scream", "Edvard Munch"),
    ("who painted water lilies", "Claude Monet"),
    ("who painted the night watch", "Rembrandt"),
    ("who painted american gothic", "Grant Wood"),
    ("who painted the school of athens", "Raphael"),
    ("who sculpted the thinker", "Auguste Rodin"),
    ("who painted the garden of earthly delights", "Hieronymus Bosch"),
    ("who painted the kiss in gold leaf", "Gustav Klimt"),
    # science and invention
    ("who discovered penicillin", "Alexander Fleming"),
    ("who proposed the theory of relativity", "Albert Einstein"),
    ("who formulated the laws of motion", "Isaac Newton"),
    ("who proposed the theory of evolution by natural selection", "Charles Darwin"),
    ("who discovered radium", "Marie Curie"),
    ("who invented the telephone", "Alexander Graham Bell"),
    ("who invented the light bulb", "Thomas Edison"),
    ("who invented the printing press", "Johannes Gutenberg"),
    ("who developed the polio vaccine", "Jonas Salk"),
    ("who created the periodic table", "Dmitri Mendeleev"),
    ("who discovered the structure of dna with francis crick", "James Watson"),
    ("who proposed the heliocentric model of the solar system", "Nicolaus Copernicus"),
    ("who discovered the moons of jupiter", "Galileo Galilei"),
    ("who invented the steam engine improvements of the 1770s", "James Watt"),
    ("who invented dynamite", "Alfred Nobel"),
    ("who developed the first smallpox vaccine", "Edward Jenner"),
    ("who discovered electromagnetic induction", "Michael Faraday"),
    ("who invented the world wide web", "Tim Berners-Lee"),
    ("who flew the first powered airplane", "the Wright brothers"),
    ("who is known as the father of genetics", "Gregor Mendel"),
    ("who proposed the uncertainty principle", "Werner Heisenberg"),
    ("who discovered the electron", "J. J. Thomson"),
    ("who invented alternating current motors", "Nikola Tesla"),
    ("who wrote a brief history of time", "Stephen Hawking"),
    ("who pioneered pasteurization", "Louis Pasteur"),
    # history and people
    ("who was the first president of the united states", "George Washington"),
    ("who was the first person to walk on the moon", "Neil Armstrong"),
    ("who was the first person in space", "Yuri Gagarin"),
    ("who led the nonviolent movement for indian independence", "Mahatma Gandhi"),
    ("who gave the i have a dream speech", "Martin Luther King Jr."),
    ("who was the first emperor of rome", "Augustus"),
    ("who was the french emperor defeated at waterloo", "Napoleon Bonaparte"),
    ("who was the british prime minister for most of world war two", "Winston Churchill"),
    ("who was the first woman to fly solo across the atlantic", "Amelia Earhart"),
    ("who sailed across the atlantic in 1492", "Christopher Columbus"),
    ("who led the first voyage around the world", "Ferdinand Magellan"),
    ("who founded the mongol empire", "Genghis Khan"),
    ("who was the macedonian king who conquered persia", "Alexander the Great"),
    ("who was the queen of egypt allied with mark antony", "Cleopatra"),
    ("who wrote the ninety-five theses", "Martin Luther"),
    ("who was the president during the american civil war", "Abraham Lincoln"),
    ("who was the first woman to win a nobel prize", "Marie Curie"),
    ("who reached the south pole first", "Roald Amundsen"),
    ("who first climbed the highest mountain with tenzing norgay", "Edmund Hillary"),
    ("who was the longest reigning british monarch", "Elizabeth II"),
    ("who was the first chancellor of the german empire", "Otto von Bismarck"),
    ("who led the soviet union during world war two", "Joseph Stalin"),
    ("who was south africa's first black president", "Nelson Mandela"),
    ("who founded the red cross", "Henry Dunant"),
    ("who was the nurse known as the lady with the lamp", "Florence Nightingale"),
    # film and television
    ("who directed jaws", "Steven Spielberg"),
    ("who directed psycho", "Alfred Hitchcock"),
    ("who directed the godfather", "Francis Ford Coppola"),
    ("who directed pulp fiction", "Quentin Tarantino"),
    ("who directed 2001 a space odyssey", "Stanley Kubrick"),
    ("who directed citizen kane", "Orson Welles"),
    ("who directed spirited away", "Hayao Miyazaki"),
    ("who directed seven samurai", "Akira Kurosawa"),
    ("who created mickey mouse", "Walt Disney"),
    ("who played the tramp in silent films", "Charlie Chaplin"),
    ("who starred as holly golightly in breakfast at tiffany's", "Audrey Hepburn"),
    ("who created the simpsons", "Matt Groening"),
    ("who created star trek", "Gene Roddenberry"),
    ("who directed the lord of the rings film trilogy", "Peter Jackson"),
    ("who directed schindler's list", "Steven Spielberg"),
    # sport
    ("who holds the record for most olympic gold medals", "Michael Phelps"),
    ("who is the fastest sprinter in history over 100 metres", "Usain Bolt"),
    ("which boxer called himself the greatest", "Muhammad Ali"),
    ("who is known as the greatest basketball player of the chicago bulls", "Michael Jordan"),
    ("which brazilian footballer won three world cups", "Pele"),
    ("who won twenty-four grand slam singles titles in men's tennis", "Novak Djokovic"),
    ("who won seven tour de france titles later stripped", "Lance Armstrong"),
    ("which golfer is nicknamed tiger", "Eldrick Woods"),
    ("which country won the first football world cup", "Uruguay"),
    ("which country hosts wimbledon", "England"),
    # geography
    ("what is the capital of japan", "Tokyo"),
    ("what is the capital of egypt", "Cairo"),
    ("what is the capital of canada", "Ottawa"),
    ("what is the capital of australia", "Canberra"),
    ("what is the capital of kenya", "Nairobi"),
    ("what is the capital of argentina", "Buenos Aires"),
    ("what is the capital of spain", "Madrid"),
    ("what is the capital of turkey", "Ankara"),
    ("what is the capital of thailand", "Bangkok"),
    ("what is the capital of peru", "Lima"),
    ("what is the capital of norway", "Oslo"),
    ("what is the capital of portugal", "Lisbon"),
    ("what is the capital of south korea", "Seoul"),
    ("what is the capital of ireland", "Dublin"),
    ("what is the capital of greece", "Athens"),
    ("what is the capital of vietnam", "Hanoi"),
    ("what is the capital of new zealand", "Wellington"),
    ("what is the capital of chile", "Santiago"),
    ("what is the capital of morocco", "Rabat"),
    ("what is the capital of hungary", "Budapest"),
    ("what river flows through cairo", "the Nile"),
    ("what river flows through paris", "the Seine"),
    ("what river flows through london", "the Thames"),
    ("what river flows through vienna", "the Danube"),
    ("in which country is machu picchu", "Peru"),
    ("in which country is the taj mahal", "India"),
    ("in which city is the colosseum", "Rome"),
    ("in which city is the statue of liberty", "New York City"),
    ("in which country are the pyramids of giza", "Egypt"),
    ("in which city is the eiffel tower", "Paris"),
    ("what is the largest country by area", "Russia"),
    ("what is the most populous country in south america", "Brazil"),
    ("which mountain range separates europe from asia", "the Ural Mountains"),
    ("which sea lies between europe and africa", "the Mediterranean Sea"),
    ("what is the largest island in the world", "Greenland"),
    # companies and things
    ("who founded microsoft with paul allen", "Bill Gates"),
    ("who co-founded apple with steve wozniak", "Steve Jobs"),
    ("who founded the ford motor company", "Henry Ford"),
    ("who founded amazon", "Jeff Bezos"),
    ("who founded facebook", "Mark Zuckerberg"),
    ("which company makes the iphone", "Apple"),
    ("which company makes the windows operating system", "Microsoft"),
    ("which company created the android operating system", "Google"),
    ("which car company makes the model t", "Ford"),
    ("which company is known for the swoosh logo", "Nike"),
    # philosophy and religion
    ("who wrote the republic", "Plato"),
    ("who was the teacher of alexander the great", "Aristotle"),
    ("who said i think therefore i am", "Rene Descartes"),
    ("who wrote the communist manifesto with friedrich engels", "Karl Marx"),
    ("who wrote thus spoke zarathustra", "Friedrich Nietzsche"),
    ("who wrote the wealth of nations", "Adam Smith"),
    ("who wrote the prince", "Niccolo Machiavelli"),
    ("who wrote leviathan", "Thomas Hobbes"),
    ("who wrote the art of war", "Sun Tzu"),
    ("who founded taoism according to tradition", "Laozi"),
    ("who wrote critique of pure reason", "Immanuel Kant"),
    ("who wrote the social contract", "Jean-Jacques Rousseau"),
]


def evaluation_names(records: list[dict]) -> set[str]:
    """Every capitalised subject, edit target and locality answer of the ZsRE records (lowercase), 3 characters up."""
    names = set()
    for r in records:
        for n in (r["subject"], r["alt"], r["loc_ans"], *r.get("answers", [])):
            if any(ch.isupper() for ch in n) and len(n) >= 3:
                names.add(n.lower())
    return names


def evaluation_prompts(records: list[dict]) -> set[str]:
    return {x.lower().removeprefix("nq question:").strip() for r in records for x in (r["loc"], r["src"], r["rephrase"])}


def kept_pairs(records: list[dict]) -> list[tuple[str, str]]:
    """PAIRS without any that asks an evaluation prompt or names an evaluation name."""
    names, prompts = evaluation_names(records), evaluation_prompts(records)
    patterns = [re.compile(r"\b" + re.escape(n) + r"\b") for n in names]
    return [(q, a) for q, a in PAIRS if q not in prompts and not any(p.search(f"{q} {a}".lower()) for p in patterns)]


def main() -> None:
    records = json.loads(ZSRE.read_text())
    kept = kept_pairs(records)
    with open(HERE / "answers.jsonl", "w") as out:
        for q, a in kept:
            out.write(json.dumps({"prompt": q, "text": f"{q} {a}"}) + "\n")
    print(f"wrote {len(kept)} of {len(PAIRS)} pairs to {HERE / 'answers.jsonl'}")


if __name__ == "__main__":
    main()
