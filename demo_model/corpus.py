"""The demo model's synthetic world: IOI sentences, landmark facts, repeated random words. The
names, places, objects, templates and landmarks are the built-in tasks' (`core.tasks`).

Everything here is data plus small generators; `train.py` turns it into a model.
"""

from __future__ import annotations

import random

from core.tasks import FACT_TEMPLATES, IOI_TEMPLATES, LANDMARKS, NAMES, OBJECTS, PLACES, ioi_prompt  # noqa: F401  (the same world as the tasks)
from examples import EXAMPLES, SEED_PAIR

# The seed IOI contrast pair: S2 swapped for the indirect object; answer " Mary", wrong " John".
# measure.py patches it for the README's numbers and train.py's log probes the same pair.
SEED_CLEAN, SEED_CORRUPTED = SEED_PAIR["clean"], SEED_PAIR["corrupted"]  # the app's first contrast example
SEED_ANSWER, SEED_WRONG = SEED_PAIR["answer"], SEED_PAIR["wrong"]

# extra words so that the repeated-text example and free-form prompts have a vocabulary
FILLER = "The quick brown fox jumps over the lazy dog. A cat sat on a mat and a bird sang in a tree."


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
