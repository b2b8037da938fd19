#!/usr/bin/env python3
"""Generate the quickstart corpus: configs/data/quickstart_{train,eval}.jsonl.

Regenerate with (from the repository root):

    python tools/generators/make_quickstart_data.py

The output is deterministic (seeded). The corpus is a small synthetic English-like world:
a fixed cast of characters, each with a fixed home, food, colour and habit, described by
templated sentences drawn from a small grammar (a few hundred words). The facts are
consistent across records, so a language model can learn them: after "the fox lives in"
the right continuation is always the fox's home. Each record is 1-3 sentences.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234

ANIMALS = [
    "fox",
    "rabbit",
    "owl",
    "bear",
    "otter",
    "deer",
    "wolf",
    "badger",
    "heron",
    "mouse",
    "squirrel",
    "hedgehog",
    "beaver",
    "crow",
    "duck",
    "goat",
    "lynx",
    "mole",
    "swan",
    "frog",
    "turtle",
    "weasel",
    "sparrow",
    "salmon",
    "bison",
    "raccoon",
    "falcon",
    "lizard",
]
NAMES = [
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Ella",
    "Finn",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kira",
    "Leo",
    "Mila",
    "Noah",
    "Olive",
    "Peter",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Will",
    "Yara",
    "Zoe",
    "Oscar",
    "Nina",
    "Max",
]
PLACES = [
    "forest",
    "river",
    "meadow",
    "mountain",
    "lake",
    "valley",
    "marsh",
    "hill",
    "garden",
    "cave",
    "field",
    "orchard",
    "island",
    "canyon",
    "pond",
    "village",
]
FOODS = [
    "berries",
    "carrots",
    "seeds",
    "fish",
    "honey",
    "nuts",
    "apples",
    "grass",
    "worms",
    "mushrooms",
    "clover",
    "acorns",
    "pears",
    "beetles",
    "roots",
    "plums",
]
COLOURS = ["red", "brown", "grey", "white", "black", "golden", "silver", "green", "blue", "orange"]
HABITS = [
    "sings at dawn",
    "sleeps all afternoon",
    "swims before breakfast",
    "counts the stars",
    "builds small towers",
    "collects shiny stones",
    "reads old maps",
    "plays the drum",
    "paints the rocks",
    "watches the clouds",
    "digs deep tunnels",
    "tells long stories",
]
OBJECTS = [
    "a blue kite",
    "an old lantern",
    "a wooden box",
    "a silver key",
    "a red ball",
    "a small boat",
    "a green hat",
    "a warm blanket",
    "a paper map",
    "a tin whistle",
    "a glass jar",
    "a round stone",
]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "foggy", "quiet", "bright"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["in the morning", "at noon", "in the evening", "at night", "after lunch", "before sunset"]
FEELINGS = ["happy", "tired", "curious", "proud", "calm", "hungry", "sleepy", "excited"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
ADVERBS = ["slowly", "quickly", "quietly", "carefully", "happily", "bravely"]
MOVES = ["walked", "ran", "hopped", "wandered", "hurried", "climbed"]


def build_world(rng: random.Random) -> dict:
    """Fixed attributes per animal and per person: the learnable facts of the corpus."""
    world = {"animal": {}, "person": {}}
    for a in ANIMALS:
        world["animal"][a] = {
            "home": rng.choice(PLACES),
            "food": rng.choice(FOODS),
            "colour": rng.choice(COLOURS),
            "habit": rng.choice(HABITS),
            "friend": rng.choice(NAMES),
        }
    for n in NAMES:
        world["person"][n] = {
            "home": rng.choice(PLACES),
            "pet": rng.choice(ANIMALS),
            "object": rng.choice(OBJECTS),
            "day": rng.choice(DAYS),
        }
    return world


def art(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def fact_sentence(rng: random.Random, world: dict) -> str:
    a = rng.choice(ANIMALS)
    f = world["animal"][a]
    templates = [
        f"The {a} lives in the {f['home']}.",
        f"The {f['colour']} {a} eats {f['food']} {rng.choice(TIMES)}.",
        f"Every day the {a} {f['habit']}.",
        f"The {a} is {f['colour']} and likes {f['food']}.",
        f"The best friend of the {a} is {f['friend']}.",
        f"In the {f['home']} you can see the {a} looking for {f['food']}.",
        f"If you visit the {f['home']}, the {a} {f['habit']}.",
        f"{f['friend']} brings {f['food']} to the {f['colour']} {a}.",
    ]
    return rng.choice(templates)


def person_sentence(rng: random.Random, world: dict) -> str:
    n = rng.choice(NAMES)
    p = world["person"][n]
    pet = world["animal"][p["pet"]]
    templates = [
        f"{n} lives near the {p['home']} and has {art(p['pet'])}.",
        f"On {p['day']} {n} takes {p['object']} to the {p['home']}.",
        f"{n} feeds {pet['food']} to the {p['pet']} {rng.choice(TIMES)}.",
        f"{n} keeps {p['object']} in the house by the {p['home']}.",
        f"Every {p['day']}, {n} and the {p['pet']} go to the {pet['home']}.",
        f"{n} feels {rng.choice(FEELINGS)} when the {p['pet']} {pet['habit']}.",
    ]
    return rng.choice(templates)


def story(rng: random.Random, world: dict) -> str:
    n = rng.choice(NAMES)
    p = world["person"][n]
    a = p["pet"]
    f = world["animal"][a]
    k = rng.choice(NUMBERS)
    w = rng.choice(WEATHER)
    s1 = rng.choice(
        [
            f"It was a {w} {p['day']} and {n} {rng.choice(MOVES)} {rng.choice(ADVERBS)} to the {f['home']}.",
            f"One {w} morning {n} went to the {f['home']} with {p['object']}.",
            f"On a {w} day {n} looked for the {a} near the {f['home']}.",
        ]
    )
    s2 = rng.choice(
        [
            f"There the {a} was eating {f['food']}, and {n} counted {k} of them.",
            f"The {f['colour']} {a} came out to play, because every day it {f['habit']}.",
            f"{n} gave the {a} {k} {f['food']} and the {a} felt {rng.choice(FEELINGS)}.",
            f"The {a} saw {p['object']} and {rng.choice(MOVES)} {rng.choice(ADVERBS)} around it.",
        ]
    )
    s3 = rng.choice(
        [
            f"When the sun went down, {n} walked home to the {p['home']}.",
            f"Later {n} told {f['friend']} about the {a}.",
            f"{n} was {rng.choice(FEELINGS)} and went home {rng.choice(TIMES)}.",
            f"The {a} stayed in the {f['home']} and {n} went home.",
        ]
    )
    return " ".join([s1, s2, s3][: rng.choice([2, 3, 3])])


def record(rng: random.Random, world: dict) -> str:
    kind = rng.random()
    if kind < 0.45:
        return story(rng, world)
    gens = [fact_sentence, person_sentence]
    n = rng.choice([2, 3])
    while True:  # 2-3 sentences, at least 20 words
        parts = [rng.choice(gens)(rng, world) for _ in range(n)]
        if len(" ".join(parts).split()) < 20 and n == 2:
            parts.append(rng.choice(gens)(rng, world))
        text = " ".join(parts)
        if len(text.split()) >= 20:
            return text


def generate(n_train: int, n_eval: int, seed: int = SEED) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    world = build_world(rng)
    texts: dict[str, None] = {}  # unique records (eval never repeats a train record)
    while len(texts) < n_train + n_eval:
        texts.setdefault(record(rng, world))
    unique = list(texts)
    return unique[:n_train], unique[n_train:]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=root / "configs" / "data")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    train, evals = generate(args.train, args.eval, args.seed)
    write_jsonl(args.out_dir / "quickstart_train.jsonl", train)
    write_jsonl(args.out_dir / "quickstart_eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval records to {args.out_dir}")


if __name__ == "__main__":
    main()
