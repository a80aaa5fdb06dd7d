"""The demo model's synthetic world: IOI sentences, landmark facts, repeated random words.

Everything here is data plus small generators; `train.py` turns it into a model.
"""

from __future__ import annotations

import random

from examples import EXAMPLES, SEED_PAIR

NAMES = [
    "John", "Mary", "Tom", "James", "Dan", "Sarah", "Paul", "Lisa",
    "Anne", "Kate", "Mark", "Emma", "Alex", "Rose", "Sam", "Jane",
]
PLACES = ["store", "park", "school", "hospital", "bank", "office", "garden", "station", "restaurant", "beach"]
OBJECTS = ["bottle of milk", "ball", "drink", "book", "coin", "gift", "letter", "bag", "ring", "key"]

# Wang et al. (2022) templates, written with the subject {B} first (BABA: the indirect object {A}
# is the name that appears once). ABBA swaps the first two names.
IOI_TEMPLATES = [
    "When {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to",
    "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give it to",
    "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to",
    "While {B} and {A} were working at the {PLACE}, {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a lot of fun at the {PLACE}. {B} gave a {OBJECT} to",
    "Friends {B} and {A} found a {OBJECT} at the {PLACE}. {B} gave it to",
    "Afterwards, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
]

LANDMARKS = {
    "Eiffel Tower": "Paris",
    "Colosseum": "Rome",
    "Big Ben": "London",
    "Brandenburg Gate": "Berlin",
    "Sagrada Familia": "Barcelona",
    "Tokyo Tower": "Tokyo",
    "Rijksmuseum": "Amsterdam",
    "Prado Museum": "Madrid",
}
FACT_TEMPLATES = [
    "The {L} is located in the city of {C}.",
    "The {L} is in {C}.",
    "The {L} can be found in {C}.",
    "Tourists visit the {L} in {C}.",
]

# The seed IOI contrast pair: S2 swapped for the indirect object; answer " Mary", wrong " John".
# measure.py patches it for the README's numbers and train.py's log probes the same pair.
SEED_CLEAN, SEED_CORRUPTED = SEED_PAIR["clean"], SEED_PAIR["corrupted"]  # the app's first contrast example
SEED_ANSWER, SEED_WRONG = SEED_PAIR["answer"], SEED_PAIR["wrong"]

# extra words so that the repeated-text example and free-form prompts have a vocabulary
FILLER = "The quick brown fox jumps over the lazy dog. A cat sat on a mat and a bird sang in a tree."


def ioi_prompt(template: str, io: str, subject: str, place: str, obj: str, order: str) -> str:
    """The prompt (without the answer). order "BABA": subject first; "ABBA": indirect object first."""
    first, second = (subject, io) if order == "BABA" else (io, subject)
    filled = template.replace("{B} and {A}", f"{first} and {second}", 1)
    return filled.format(B=subject, A=io, PLACE=place, OBJECT=obj)


def all_ioi_prompts() -> list[tuple[str, str, str]]:
    """Every template x ordered name pair x order: (prompt, io, subject), place/object fixed per pair."""
    prompts = []
    for t, template in enumerate(IOI_TEMPLATES):
        for i, io in enumerate(NAMES):
            for j, subject in enumerate(NAMES):
                if io == subject:
                    continue
                place, obj = PLACES[(i + j + t) % len(PLACES)], OBJECTS[(i * 3 + j + t) % len(OBJECTS)]
                for order in ("BABA", "ABBA"):
                    prompts.append((ioi_prompt(template, io, subject, place, obj, order), io, subject))
    return prompts


def example_texts() -> list[str]:
    """Every prompt and token in examples/prompts.json: the vocabulary must cover them."""
    texts = []
    for ex in EXAMPLES["explorer"]:
        texts += [ex["prompt"], ex["target"], ex["competing"]]
    for ex in EXAMPLES["contrast"]:
        texts += [ex["clean"], ex["corrupted"], ex["answer"], ex["wrong"]]
    return [t for t in texts if t]


def vocabulary_texts() -> list[str]:
    texts = [FILLER, *example_texts()]
    texts += [f" {name}" for name in NAMES] + [f"{name} " for name in NAMES]
    texts += [f" {city}" for city in LANDMARKS.values()]
    for template in IOI_TEMPLATES:
        for place, obj in zip(PLACES, OBJECTS):
            texts.append(ioi_prompt(template, "Mary", "John", place, obj, "BABA") + " Mary.")
    for landmark, city in LANDMARKS.items():
        texts += [template.format(L=landmark, C=city) for template in FACT_TEMPLATES]
    return texts


def sample_ioi(rng: random.Random) -> str:
    io, subject = rng.sample(NAMES, 2)
    prompt = ioi_prompt(rng.choice(IOI_TEMPLATES), io, subject, rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(["ABBA", "BABA"]))
    return f"{prompt} {io}."


def sample_fact(rng: random.Random) -> str:
    landmark, city = rng.choice(list(LANDMARKS.items()))
    return rng.choice(FACT_TEMPLATES).format(L=landmark, C=city)
