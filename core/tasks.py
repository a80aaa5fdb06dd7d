"""Tasks: a claim about a model is a claim about a distribution of prompts, not one sentence. A task
is a named list of contrast pairs (clean, corrupted, answer, wrong) that share the logit-difference
metric of `core.contrast`. Built in, seeded, any N up to the limit:

- `ioi`: Wang et al. (2022)'s templates in both name orders (BABA: the subject first; ABBA), names,
  places and objects from fixed lists, kept to the ones that are single tokens for the model (so every
  prompt of a template has one token length). Corruption `s2` (the second subject mention replaced by
  the indirect object, as the app's seed pair) or `abc` (Wang et al.'s ABC distribution: all three
  names replaced by three other names).
- `induction`: a sequence of random words repeated (the answer continues the repeat) against the same
  second half after an unrepeated first half (answer: the repeat's continuation; wrong: the
  corrupted first half's last word).
- `facts`: a landmark's city ("The Eiffel Tower is located in the city of" -> " Paris") against another
  landmark of the same token length (wrong: that landmark's city).

The lists below are also the demo model's training world (`demo_model/corpus.py` reads them), so
every built-in task applies to the demo model's vocabulary as well as to GPT-2's.

The user's own pairs come as text: one pair per line (`clean | corrupted | answer | wrong`), CSV or
JSON Lines; every problem is reported with its line number.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.config import DEFAULTS, LIMITS
from core.contrast import ContrastPair, LogitDiff
from core.model import Model, check_int, single_token_id, to_tokens
from core.registry import Input
from core.results import mean_and_error

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


def ioi_prompt(template: str, io: str, subject: str, place: str, obj: str, order: str, s2: str | None = None) -> str:
    """The prompt (without the answer). order "BABA": subject first; "ABBA": indirect object first.
    `s2`: the name at the second subject mention (default: the subject)."""
    first, second = (subject, io) if order == "BABA" else (io, subject)
    filled = template.replace("{B} and {A}", f"{first} and {second}", 1)
    return filled.format(B=subject if s2 is None else s2, A=io, PLACE=place, OBJECT=obj)


# --- tasks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairText:
    """One contrast pair as text: what the user writes on one line."""

    clean: str
    corrupted: str
    answer: str
    wrong: str


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    pairs: tuple[PairText, ...]
    lines: tuple[int, ...] | None = None  # where each pair came from in the user's text (messages name it)

    def contrast_pairs(self, model: Model) -> list[ContrastPair]:
        """Every pair checked on `model` (ContrastPair.of); the first problem is a ValueError that says
        which pair (and line) it is."""
        out = []
        for i, pair in enumerate(self.pairs):
            try:
                out.append(ContrastPair.of(model, pair.clean, pair.corrupted, pair.answer, pair.wrong))
            except ValueError as err:
                where = f"line {self.lines[i]}" if self.lines else f"pair {i + 1}"
                raise ValueError(f"{self.name}, {where}: {err}") from None
        return out


def _single_tokens(model: Model, words: list[str]) -> list[str]:
    """The words that are one token for `model` with a leading space (as they appear mid-sentence)."""
    kept = []
    for word in words:
        try:
            single_token_id(model, f" {word}")
        except ValueError:
            continue
        kept.append(word)
    return kept


def ioi_task(model: Model, n: int, seed: int = 0, corruption: Literal["s2", "abc"] = "s2") -> Task:
    names, places = _single_tokens(model, NAMES), _single_tokens(model, PLACES)
    objects = _single_tokens(model, OBJECTS)
    if len(names) < 5 or not places or not objects:
        raise ValueError("This model's vocabulary lacks the IOI task's names, places or objects as single tokens: the IOI task does not apply to it.")
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        template, place, obj = rng.choice(IOI_TEMPLATES), rng.choice(places), rng.choice(objects)
        io, subject, *others = rng.sample(names, 5)
        order = ("BABA", "ABBA")[i % 2]  # both orders, alternating: a balanced task
        clean = ioi_prompt(template, io, subject, place, obj, order)
        if corruption == "s2":
            corrupted = ioi_prompt(template, io, subject, place, obj, order, s2=io)
        else:  # three other names throughout
            corrupted = ioi_prompt(template, others[0], others[1], place, obj, order, s2=others[2])
        pairs.append(PairText(clean, corrupted, f" {io}", f" {subject}"))
    described = "the second subject mention replaced by the indirect object" if corruption == "s2" else "all three names replaced by other names (ABC)"
    return Task(f"ioi ({corruption})", f"Indirect object identification, Wang et al. templates, BABA and ABBA; corrupted: {described}.", tuple(pairs))


def induction_task(model: Model, n: int, seed: int = 0, length: int = 5) -> Task:
    words = _single_tokens(model, NAMES + PLACES)
    if len(words) < 2 * length:
        raise ValueError("This model's vocabulary has too few single-token words for the induction task: it does not apply to it.")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        chosen = rng.sample(words, 2 * length)
        first, other = chosen[:length], chosen[length:]
        repeat = " " + " ".join(first[:-1])
        clean = " " + " ".join(first) + repeat
        corrupted = " " + " ".join(other) + repeat
        pairs.append(PairText(clean, corrupted, f" {first[-1]}", f" {other[-1]}"))
    return Task(
        "induction",
        f"{length} random words repeated: the answer continues the repeat; corrupted: an unrepeated first half.",
        tuple(pairs),
    )


def facts_task(model: Model, n: int, seed: int = 0) -> Task:
    landmarks = {landmark: city for landmark, city in LANDMARKS.items() if _single_tokens(model, [city])}
    prompts = {  # (template, landmark) -> prompt, for the combinations the model can read
        (t, landmark): template.split(" {C}")[0].format(L=landmark)
        for t, template in enumerate(FACT_TEMPLATES)
        for landmark in landmarks
    }
    length = {}  # token lengths of the prompts the model can read (the demo model knows only its world's words)
    for key, text in prompts.items():
        try:
            length[key] = to_tokens(model, text).shape[-1]
        except ValueError:
            continue
    prompts = {key: prompts[key] for key in length}
    partners = {key: [other for other in prompts if other[0] == key[0] and other != key and length[other] == length[key]] for key in prompts}
    usable = [key for key in prompts if partners[key]]
    if not usable:
        raise ValueError("No two landmarks of the facts task have prompts of one token length for this model: it does not apply to it.")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        key = rng.choice(usable)
        other = rng.choice(partners[key])
        pairs.append(PairText(prompts[key], prompts[other], f" {landmarks[key[1]]}", f" {landmarks[other[1]]}"))
    return Task("facts", "A landmark's city; corrupted: another landmark (same token length), wrong: its city.", tuple(pairs))


BUILT_IN: dict[str, Callable[..., Task]] = {
    "ioi": ioi_task,
    "ioi_abc": lambda model, n, seed=0: ioi_task(model, n, seed, corruption="abc"),
    "induction": induction_task,
    "facts": facts_task,
}


MAX_SEED = 2**32 - 1  # a draw's seed: 0 to this


def built_in_task(model: Model, name: str, n: int, seed: int = 0) -> Task:
    """A built-in task of `n` pairs, drawn with `seed` (the same seed gives the same pairs)."""
    if not isinstance(name, str) or name not in BUILT_IN:
        raise ValueError(f"There is no task {name!r}: the built-in tasks are {', '.join(BUILT_IN)}.")
    n = check_int(n, "n", 1, LIMITS.max_task_pairs)
    seed = check_int(seed, "seed", 0, MAX_SEED)
    return BUILT_IN[name](model, n, seed)


# --- the user's own pairs -------------------------------------------------------------------

FIELDS = ("clean", "corrupted", "answer", "wrong")


def _check_text(pairs) -> None:
    if not isinstance(pairs, str):
        raise ValueError(f"The pairs must be text, got {type(pairs).__name__}.")


def _lines(text: str, name: str) -> list[tuple[int, str]]:
    _check_text(text)
    if len(text) > LIMITS.max_task_chars:
        raise ValueError(f"The pairs are {len(text):,} characters long; the limit is {LIMITS.max_task_chars:,}: use fewer pairs.")
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{name} has no pairs: write one per line, clean | corrupted | answer | wrong.")
    if len(lines) > LIMITS.max_task_pairs:
        raise ValueError(f"{name} has {len(lines):,} pairs; the limit is {LIMITS.max_task_pairs}: use fewer.")
    return lines


def pairs_format(text: str) -> Literal["lines", "csv", "jsonl"]:
    """How pasted or uploaded pairs are written, from their first line: a JSON object (jsonl), fields
    separated by '|' (lines), else comma-separated values (csv)."""
    first = next((line.strip("\ufeff \t") for line in text.splitlines() if line.strip("\ufeff \t")), "") if isinstance(text, str) else ""
    return "jsonl" if first.startswith("{") else "lines" if "|" in first else "csv"


def parse_pairs(text: str, format: Literal["auto", "lines", "csv", "jsonl"] = "lines", name: str = "Your task") -> Task:
    """The user's pairs as a task (`auto`: the format `pairs_format` reads off the first line). `lines`: `clean | corrupted | answer | wrong`, one per line; a
    prompt's surrounding spaces are dropped, an answer keeps the space it starts with after the bar's
    own, as one space (so `... to | Mary | John` means ' Mary' and ' John', as GPT-2 writes words
    mid-sentence; `...|Mary|John` means 'Mary' and 'John').
    `csv`: four columns in that order (a header row naming them is skipped), values as written.
    `jsonl`: one object per line with the keys clean, corrupted, answer, wrong."""
    rows: list[tuple[int, PairText]] = []
    if isinstance(text, str):
        text = text.removeprefix("\ufeff")  # a byte order mark, as spreadsheet programs write "CSV UTF-8"
    if format == "auto":
        format = pairs_format(text)
    if format == "lines":
        for number, line in _lines(text, name):
            fields = line.split("|")
            if len(fields) != 4:
                raise ValueError(f"Line {number}: expected 4 fields separated by '|' (clean | corrupted | answer | wrong), got {len(fields)}.")
            clean, corrupted = fields[0].strip(), fields[1].strip()
            answer, wrong = (" " + f.strip() if f[:1].isspace() else f.strip() for f in fields[2:])  # "| Mary" -> ' Mary'
            rows.append((number, PairText(clean, corrupted, answer, wrong)))
    elif format == "csv":
        numbered = _lines(text, name)
        for (number, _), fields in zip(numbered, csv.reader(io.StringIO("\n".join(line for _, line in numbered)))):
            if [f.strip().lower() for f in fields] == list(FIELDS):
                continue  # the header
            if len(fields) != 4:
                raise ValueError(f"Line {number}: expected 4 columns (clean, corrupted, answer, wrong), got {len(fields)}.")
            rows.append((number, PairText(*fields)))
    elif format == "jsonl":
        for number, line in _lines(text, name):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"Line {number}: not JSON ({err.msg} at column {err.colno}).") from None
            if not isinstance(item, dict) or set(item) != set(FIELDS) or not all(isinstance(item[k], str) for k in FIELDS):
                raise ValueError(f"Line {number}: expected an object with the text fields clean, corrupted, answer and wrong.")
            rows.append((number, PairText(*(item[k] for k in FIELDS))))
    else:
        raise ValueError(f"Unknown format {format!r}: use lines, csv or jsonl.")
    if not rows:
        raise ValueError(f"{name} has no pairs (only a header).")
    return Task(name, "pairs given by the user", tuple(pair for _, pair in rows), tuple(number for number, _ in rows))


# --- the task's metric ----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskMetric:
    """The logit difference of every pair, clean and corrupted, and the task's means with their
    standard errors (sample standard deviation / sqrt(N))."""

    task: str
    clean_values: Float[np.ndarray, " pair"]
    corrupted_values: Float[np.ndarray, " pair"]

    @property
    def clean(self) -> tuple[float, float | None]:
        return mean_and_error(self.clean_values)

    @property
    def corrupted(self) -> tuple[float, float | None]:
        return mean_and_error(self.corrupted_values)

    @property
    def swing(self) -> tuple[float, float | None]:
        """The mean clean - corrupted difference (what task-level patching normalises by)."""
        return mean_and_error(self.clean_values - self.corrupted_values)


def task_name(task):
    """A task as its name is matched: case and surrounding spaces ignored ("IOI" is "ioi"); not text: as it is."""
    return task.strip().lower() if isinstance(task, str) else task


def chosen_task(model: Model, task: str, n: int = 32, seed: int = 0, pairs: str = "") -> Task:
    """A built-in task (`task`, `n` pairs drawn with `seed`; `pairs` left empty) or, for task "custom", your own
    `pairs` (one per line, clean | corrupted | answer | wrong; or CSV or JSONL with those four fields): what the task
    techniques' inputs (TASK_INPUTS) name. At most LIMITS.max_task_patching_pairs pairs: a request patches them all."""
    if not isinstance(task, str):
        raise ValueError(f"The task must be text: one of {', '.join(BUILT_IN)}, or custom; got {type(task).__name__}.")
    name, most = task_name(task), LIMITS.max_task_patching_pairs
    if name == "custom":
        chosen = parse_pairs(pairs, "auto")
        if len(chosen.pairs) > most:
            raise ValueError(f"Your task has {len(chosen.pairs)} pairs; patching takes at most {most} per request: use fewer.")
        return chosen
    if name in BUILT_IN:
        checked = {field: check() for field, check in _request_checks(name, n, seed, pairs).items()}
        return built_in_task(model, name, checked["n"], checked["seed"])
    raise ValueError(f"There is no task {task!r}: pick one of {', '.join(BUILT_IN)}, or custom with your pairs.")


def _no_pairs(name: str, pairs) -> None:
    """A built-in task draws its own pairs: pairs given beside it would be ignored, so they are refused."""
    if pairs is None or (isinstance(pairs, str) and not pairs.strip()):
        return
    _check_text(pairs)
    raise ValueError(f"You gave pairs, but the task is {name}, which draws its own: choose the task custom to run your pairs, or clear them to run {name}.")


def _request_checks(name: str, n, seed, pairs) -> dict[str, Callable[[], int | None]]:
    """chosen_task's checks of built-in task `name`'s other inputs, by input name, in the order it makes them:
    each gives the value as the task uses it (None: pairs, which it does not use), or raises its ValueError."""
    return {
        "n": lambda: check_int(n, "n", 1, LIMITS.max_task_patching_pairs),
        "seed": lambda: check_int(seed, "seed", 0, MAX_SEED),
        "pairs": lambda: _no_pairs(name, pairs),
    }


def checked_inputs(model: Model, task: str, n: int = 32, seed: int = 0, pairs: str = "") -> tuple[dict[str, str], list[ContrastPair]]:
    """(what is wrong with a task's inputs, keyed by the input it is about; the task's checked pairs, [] unless
    nothing is), without running the model: chosen_task's checks and messages, then each pair's, as
    ContrastPair.of checks it. A built-in task that does not apply to the model is the task's fault; a custom
    task's, its pairs'."""
    name = task_name(task)
    if isinstance(name, str) and name in BUILT_IN:
        for field, check in _request_checks(name, n, seed, pairs).items():
            try:
                check()
            except ValueError as err:
                return {field: str(err)}, []
    try:
        return {}, chosen_task(model, task, n, seed, pairs).contrast_pairs(model)
    except ValueError as err:
        return {"pairs" if name == "custom" else "task": str(err)}, []


def size_field(task: str) -> str:
    """The input that sets a task's size, which a request too big for the server's budget is refused on."""
    return "pairs" if task_name(task) == "custom" else "n"


TASK_INPUTS = (  # a task as a technique's inputs (core.registry): chosen_task's arguments
    Input("task", "choice", f"a built-in task ({', '.join(BUILT_IN)}), or custom (your pairs)", default="ioi", choices=(*BUILT_IN, "custom")),
    Input("n", "int", "pairs drawn from a built-in task", default=32),
    Input("seed", "int", "the draw's seed (same seed, same pairs)", default=0),
    Input("pairs", "text", "task custom: one pair per line, clean | corrupted | answer | wrong (or CSV / JSONL with those fields)", default=""),
)


def metric_values(model: Model, runs: Sequence[tuple[Int[Tensor, "1 pos"], LogitDiff]]) -> Float[np.ndarray, " run"]:
    """The metric of each (tokens, metric) run, the runs of one token length batched together
    (DEFAULTS.tokens_per_forward tokens per forward pass)."""
    values = np.zeros(len(runs))
    by_length: dict[int, list[int]] = {}
    for i, (tokens, _) in enumerate(runs):
        by_length.setdefault(tokens.shape[-1], []).append(i)
    with torch.no_grad():
        for length, members in by_length.items():
            rows = max(1, DEFAULTS.tokens_per_forward // length)
            for start in range(0, len(members), rows):
                chunk = members[start : start + rows]
                logits = model(torch.cat([runs[i][0] for i in chunk]))
                for row, i in enumerate(chunk):
                    values[i] = float(runs[i][1].of_logits(logits[row : row + 1])[0])
    return values


def task_metric(model: Model, task: Task) -> TaskMetric:
    """Every pair's logit difference on both prompts, pairs of one token length batched together."""
    pairs = task.contrast_pairs(model)
    clean = metric_values(model, [(pair.clean_tokens, pair.metric) for pair in pairs])
    corrupted = metric_values(model, [(pair.corrupted_tokens, pair.metric) for pair in pairs])
    return TaskMetric(task.name, clean, corrupted)
