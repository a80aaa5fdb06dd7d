"""Every technique, declared once, in its own module: `TECHNIQUE = Technique(...)` at the end of
`core/<technique>.py` (or of a module in a package under core/, such as core/patching/). The JSON
API, the app's "More" tab, the test suite's endpoint lists and the load benchmark read
this registry, and a test holds README's endpoint table to it,
so a new technique is one core module plus one test file (plus README prose):

    TECHNIQUE = Technique(
        name="predict",                                   # the endpoint: /predict
        run=predict,                                      # run(model, *inputs) -> result
        result=Predictions,                               # its JSON keys are the endpoint's output keys
        summary="Top-k next tokens with probabilities at the final position.",
        inputs=(PROMPT, Input("k", "int", "how many predictions", default=DEFAULTS.top_k)),
        lane="light",
        figures=(plots.top_predictions,),                 # result -> Figure
        example={"prompt": EIFFEL, "k": 5},               # a good request (tests, benchmarks)
        tab="Prompt Explorer",                            # a designed tab shows it; None: the "More" tab
    )
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, Literal, Sequence

from core.model import PromptReader

REQUIRED = object()  # an input the caller must give
Progress = Callable[[float, str], None]  # progress(fraction done, what is running): a technique's step boundary

# What each kind of input is: its JSON type, and what a blank optional value means.
KINDS: dict[str, type] = {
    "prompt": str,  # text checked as a prompt (length, vocabulary), tokenized with BOS
    "token": str,  # one token of the model's vocabulary, e.g. " Paris"
    "int": int,  # a whole number; the technique checks its range
    "choice": str,  # one of the input's `choices` (a dropdown in the form; the technique checks)
    "text": str,  # free text the technique parses itself (e.g. pasted pairs); several lines in the form
}


@dataclass(frozen=True)
class Input:
    name: str  # the parameter name clients use (gradio_client keyword), and the field a message is shown on
    kind: Literal["prompt", "token", "int", "choice", "text"]
    doc: str  # what it is, for a person: the API page and the form's label
    default: Any = REQUIRED  # what the API uses when the caller leaves it out; "" for an optional token
    choices: tuple[str, ...] = ()  # kind "choice": the values allowed

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def type(self) -> type:
        return KINDS[self.kind]

    def to_core(self, value):
        """The value as the technique takes it: a blank optional token is "not given" (None)."""
        return (value or None) if self.kind == "token" and self.default == "" else value


PROMPT = Input("prompt", "prompt", "the prompt; the model reads it with BOS in front")


@dataclass(frozen=True)
class Technique:
    name: str  # snake_case; the JSON endpoint is /<name>
    run: Callable  # run(model, *inputs, progress=None?) -> result
    result: type  # a core.results class: its json_keys() are the endpoint's output keys
    summary: str  # one sentence: the API page and README's endpoint table
    inputs: tuple[Input, ...]
    lane: Literal["light", "heavy"]  # light: seconds at most; heavy: patching-sized work (its own queue)
    example: dict[str, Any]  # a good request, by input name (tests call it; the load benchmark sends it)
    figures: tuple[Callable, ...] = ()  # result -> plotly Figure, in the order shown
    input_errors: Callable | None = None  # input_errors(model, *inputs) -> {input name: message}; tokenizing only
    tab: str | None = None  # the designed tab that shows it; None: the generic "More" tab
    progress: bool = False  # run() takes progress=report(fraction, description) and stops at its steps
    fitted_defaults: Callable | None = None  # fitted_defaults(model) -> {input name: default} where a declared default does not fit the model
    reads_prompt: PromptReader | None = None  # it reads one forward pass over its prompt (the first input), so
    # several such techniques can share one pass: read_prompt(model, prompt, (t.reads_prompt, other inputs), ...)

    def defaults(self, model) -> dict[str, Any]:
        """Each optional input's default on `model` (the API's): the declared one, or the one fitted to the model."""
        declared = {spec.name: spec.default for spec in self.inputs if not spec.required}
        return declared | (self.fitted_defaults(model) if self.fitted_defaults else {})

    def request(self, overrides: dict[str, Any] | None = None) -> tuple:
        """The example (with `overrides`) as the values an API request sends, in input order, each input
        the example leaves out at its default (an example names every required input: a test checks)."""
        values = self.example | (overrides or {})
        return tuple(values.get(spec.name, spec.default) for spec in self.inputs)

    def arguments(self, values: Sequence | dict[str, Any] | None = None) -> tuple:
        """run()'s arguments after the model, from `values` in input order or by input name (default:
        the example), defaults filled in, a blank optional token as None."""
        values = self.example if values is None else values
        if not isinstance(values, dict):
            values = dict(zip((spec.name for spec in self.inputs), values))
        missing = [spec.name for spec in self.inputs if spec.required and spec.name not in values]
        if missing:
            raise ValueError(f"{self.name} needs {', '.join(missing)}: it takes {', '.join(spec.name for spec in self.inputs)}.")
        return tuple(spec.to_core(values[spec.name] if spec.name in values else spec.default) for spec in self.inputs)


@cache
def techniques() -> dict[str, Technique]:
    """Every `TECHNIQUE` declared in a module under `core` (and each of a module's `TECHNIQUES`, where one
    module declares a family, e.g. a technique on one pair and on a task), by name: light ones first,
    then by module name."""
    import core

    found = []
    for info in sorted(pkgutil.walk_packages(core.__path__, "core."), key=lambda m: m.name):
        module = importlib.import_module(info.name)
        for technique in (getattr(module, "TECHNIQUE", None), *getattr(module, "TECHNIQUES", ())):
            if isinstance(technique, Technique):
                found.append(technique)
    found.sort(key=lambda t: t.lane != "light")
    names = [t.name for t in found]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise RuntimeError(f"Two techniques declare the same name: {sorted(duplicated)}")
    return {t.name: t for t in found}
