"""A knowledge-injection task: facts about people who do not exist, taught in some
phrasings and asked back in another. No pretrained model can know them, so everything the
held-out loss gains is stored in the fine-tuned weights: a capacity-bound task, where a
low-rank adapter can run out of room and full fine-tuning should not.

Each of N people has four attributes (birth city, profession, birth year, favourite food),
drawn with a fixed seed from fixed lists of real English words. Training asks every fact in
four question templates; the held-out set asks every fact once more in a fifth template that
training never uses. Examples are `Q: question` / `A: value` pairs, loss on the answer only
(data.format=instruction): short rows, so a CPU step holds many facts.

    python tools/studies/facts_task.py OUT_DIR [--people 250] [--seed 0]

writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl, deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CITIES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Hanoi",
    "Dublin",
    "Quito",
    "Tunis",
    "Riga",
    "Accra",
    "Bergen",
    "Porto",
    "Kyoto",
    "Seville",
    "Krakow",
    "Tallinn",
    "Hobart",
    "Mumbai",
    "Cairo",
    "Havana",
    "Zurich",
    "Vienna",
    "Naples",
    "Geneva",
    "Denver",
    "Boston",
    "Ottawa",
    "Dakar",
    "Manila",
    "Perth",
]
PROFESSIONS = [
    "a baker",
    "a surgeon",
    "a carpenter",
    "a pilot",
    "a librarian",
    "a chemist",
    "a sailor",
    "a tailor",
    "a dentist",
    "a farmer",
    "a jeweller",
    "a plumber",
    "an architect",
    "a journalist",
    "a violinist",
    "a geologist",
    "a potter",
    "a nurse",
    "a lawyer",
    "a gardener",
    "a butcher",
    "an astronomer",
    "a blacksmith",
    "a florist",
    "a translator",
    "a beekeeper",
    "a locksmith",
    "a shepherd",
    "a glassblower",
    "a cartographer",
]
FOODS = [
    "lentil soup",
    "roast duck",
    "apple pie",
    "grilled trout",
    "mushroom risotto",
    "beef stew",
    "plum cake",
    "fried rice",
    "lamb curry",
    "pea soup",
    "cheese omelette",
    "pickled herring",
    "pumpkin bread",
    "chicken pie",
    "fig jam",
    "oyster stew",
    "walnut bread",
    "bean chili",
    "pork dumplings",
    "rice pudding",
    "spinach pie",
    "onion tart",
    "salmon cakes",
    "cherry tart",
    "corn fritters",
    "mutton broth",
    "ginger biscuits",
    "potato salad",
    "lemon sorbet",
    "carrot cake",
]

# attribute -> (training templates, held-out template, the answer as asked)
TEMPLATES: dict[str, tuple[list[str], str]] = {
    "city": (
        [
            "Where was {name} born?",
            "What is the birthplace of {name}?",
            "In which city was {name} born?",
            "{name} was born in which city?",
        ],
        "Name the city where {name} was born.",
    ),
    "profession": (
        [
            "What does {name} do for a living?",
            "What is {name}'s job?",
            "What is the profession of {name}?",
            "{name} works as what?",
        ],
        "What line of work is {name} in?",
    ),
    "year": (
        [
            "When was {name} born?",
            "In what year was {name} born?",
            "What is {name}'s year of birth?",
            "{name} was born in which year?",
        ],
        "Which year saw the birth of {name}?",
    ),
    "food": (
        [
            "What is {name}'s favourite food?",
            "Which food does {name} like best?",
            "What food does {name} love most?",
            "{name}'s favourite dish is what?",
        ],
        "What would {name} choose to eat above all else?",
    ),
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "x"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    ).capitalize()


def people(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` people with distinct made-up names and their four attributes."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        name = f"{_word(rng, 2)} {_word(rng, rng.choice([2, 3]))}"
        if name in seen:
            continue
        seen.add(name)
        out.append(
            {
                "name": name,
                "city": rng.choice(CITIES),
                "profession": rng.choice(PROFESSIONS),
                "year": str(rng.randint(1801, 1999)),
                "food": rng.choice(FOODS),
            }
        )
    return out


def _pair(question: str, answer: str, **extra) -> dict:
    return {"prompt": f"Q: {question}\nA:", "response": f" {answer}", **extra}


def examples(n_people: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out): every fact in the four training templates, shuffled; every fact once
    in the held-out template."""
    train, held_out = [], []
    for person in people(n_people, seed):
        for attribute, (asked, unseen) in TEMPLATES.items():
            answer = person[attribute]
            train += [_pair(t.format(name=person["name"]), answer) for t in asked]
            held_out.append(_pair(unseen.format(name=person["name"]), answer, attribute=attribute))
    random.Random(seed + 1).shuffle(train)
    return train, held_out


def write(out_dir: Path, n_people: int = 100, seed: int = 0) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = examples(n_people, seed)
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--people", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train, held_out = write(args.out_dir, args.people, args.seed)
    print(f"{train}: {sum(1 for _ in train.open())} examples; {held_out}: {sum(1 for _ in held_out.open())}")


if __name__ == "__main__":
    main()
