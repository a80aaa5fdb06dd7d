"""The example inputs, defined once in `prompts.json`: the app's examples, and the prompts the tests,
benchmarks, demo-model scripts and quickstart use (`from examples import IOI_CLEAN`)."""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES: dict[str, list[dict]] = json.loads((Path(__file__).resolve().parent / "prompts.json").read_text(encoding="utf-8"))


def example(tab: str, name: str) -> dict:
    """One example by its tab ("explorer", "contrast", "circuit_map") and its name."""
    (found,) = [ex for ex in EXAMPLES[tab] if ex["name"] == name]
    return found


EIFFEL = example("explorer", "Eiffel Tower (fact recall)")["prompt"]  # "The Eiffel Tower is located in the city of"
SEED_PAIR = example("contrast", "IOI seed pair (BABA)")  # the seed's IOI pair: clean, corrupted, answer " Mary", wrong " John"
IOI_CLEAN, IOI_CORRUPTED = SEED_PAIR["clean"], SEED_PAIR["corrupted"]
