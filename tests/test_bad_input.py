"""Every kind of bad input, sent to a running server through gradio_client, to every endpoint:
each gets a message a person can act on (never Gradio's generic error, never a traceback) and
the next good request still succeeds. Plus a Hypothesis fuzz of core and of the API."""

from __future__ import annotations

import re
import time

import pytest
from gradio_client.exceptions import AppError, ValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import (
    LIMITS,
    logit_lens,
)
from core.registry import techniques
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED

CLIENT_ERRORS = (AppError, ValidationError)  # ValidationError: the tabs' events check their inputs before running
GENERIC = "upstream Gradio app has raised an exception"
SHORT = "When John and Mary went to the store"
LONG = "When John and Mary went to the store," * 10  # 81 tokens: over the demo model's 64
MEGABYTE = "x" * 1_000_000

TECHNIQUES = techniques()
UI_GOOD = {  # the tabs' events (the techniques' endpoints come from their declarations, core.registry)
    "/explore": (IOI_CLEAN, " Mary", " John", 1, 2),
    "/contrast": (IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"),
    "/circuit_map": (10, 3, 4),
}
UI_INPUTS = {  # the tabs' inputs as (name, kind), as the registry declares a technique's
    "/explore": (("prompt", "prompt"), ("target", "token"), ("competing", "token"), ("layer", "int"), ("head", "int")),
    "/contrast": (("clean", "prompt"), ("corrupted", "prompt"), ("answer", "token"), ("wrong", "token")),
    "/circuit_map": (("seq_len", "int"), ("batch", "int"), ("seed", "int")),
}
GOOD = {f"/{name}": t.request() for name, t in TECHNIQUES.items()} | UI_GOOD
INPUTS = {f"/{name}": tuple((spec.name, spec.kind) for spec in t.inputs) for name, t in TECHNIQUES.items()} | UI_INPUTS
KINDS = {endpoint: tuple(kind for _, kind in inputs) for endpoint, inputs in INPUTS.items()}
PROMPT_ENDPOINTS = [e for e, kinds in KINDS.items() if "prompt" in kinds]
PAIR_ENDPOINTS = [e for e, kinds in KINDS.items() if kinds.count("prompt") == 2]
TOKEN_FIELDS = {e: [i for i, kind in enumerate(kinds) if kind == "token"] for e, kinds in KINDS.items() if "token" in kinds}
INT_FIELDS = {e: {i: name for i, (name, kind) in enumerate(inputs) if kind == "int"} for e, inputs in INPUTS.items() if "int" in KINDS[e]}


def with_arg(endpoint: str, position: int, value) -> tuple:
    args = list(GOOD[endpoint])
    args[position] = value
    return tuple(args)


def cases():
    out = []
    for endpoint in PROMPT_ENDPOINTS:
        for position in [0, 1] if endpoint in PAIR_ENDPOINTS else [0]:
            out += [
                (endpoint, with_arg(endpoint, position, ""), "is empty"),
                (endpoint, with_arg(endpoint, position, "  \n\t "), "is empty"),
                (endpoint, with_arg(endpoint, position, MEGABYTE), "1,000,000 characters long; the limit is 2,000 characters"),
                (endpoint, with_arg(endpoint, position, None), "must be text"),
                (endpoint, with_arg(endpoint, position, 42), "must be text"),
                (endpoint, with_arg(endpoint, position, "When John and a zebra went"), r"vocabulary has no ' zebra'"),
                (endpoint, with_arg(endpoint, position, "When John 😀 went"), r"vocabulary has no ' 😀'"),
                (endpoint, with_arg(endpoint, position, "When John\x00 went"), r"vocabulary has no '\\x00'"),
                (endpoint, with_arg(endpoint, position, "When \u202eJohn went"), r"vocabulary has no"),
                (endpoint, with_arg(endpoint, position, "When <script>alert(1)</script> went"), r"vocabulary has no"),
            ]
            limit = f"limit here is {LIMITS.max_patching_tokens if endpoint in PAIR_ENDPOINTS else 64} tokens"
            out.append((endpoint, with_arg(endpoint, position, LONG), limit))
    for endpoint in PAIR_ENDPOINTS:  # the pair first, then the endpoint's other inputs as in GOOD
        rest = GOOD[endpoint][4:]
        out += [
            (endpoint, (SHORT, SHORT + " and", " Mary", " John", *rest),
             r"^(?![\s\S]*&lt;)[\s\S]*same number of tokens.*clean has 9 \(BOS, then \['When'.* corrupted has 10"),  # no '<' to escape
        ]
        out.append((endpoint, (IOI_CLEAN, IOI_CLEAN, " Mary", " John", *rest), "same logit difference"))
    for endpoint, inputs in INPUTS.items():  # what a technique parses itself
        for position, (name, kind) in enumerate(inputs):
            if name == "senders":
                out += [
                    (endpoint, with_arg(endpoint, position, ""), "Name at least one sender"),
                    (endpoint, with_arg(endpoint, position, "9.9"), r"There is no '9.9'.*layers 0-4 and heads 0-3"),
                    (endpoint, with_arg(endpoint, position, "L1H2, the name movers"), r"'the' is not a sender"),
                    (endpoint, with_arg(endpoint, position, ["4.0"]), "must be text"),
                ]
            if name == "pairs":
                task = [i for i, (other, _) in enumerate(inputs) if other == "task"][0]
                custom = list(with_arg(endpoint, task, "custom"))
                for text, message in [
                    ("", "has no pairs"),
                    ("a | b | c", r"Line 1: expected 4 fields"),
                    (f"{IOI_CLEAN} | {IOI_CORRUPTED} | Mary | John\n{SHORT} | {SHORT} and | Mary | John", r"line 2: .*same number of tokens"),
                    ("x" * (LIMITS.max_task_chars + 1), "the limit is 100,000"),
                    ("\n".join([f"{IOI_CLEAN} | {IOI_CORRUPTED} | Mary | John"] * 65), "65 pairs; patching takes at most 64"),
                    (7, "must be text"),
                ]:
                    custom[position] = text
                    out.append((endpoint, tuple(custom), message))
                if GOOD[endpoint][task] != "custom":  # pairs beside a built-in task: refused, never silently left out
                    out.append((endpoint, with_arg(endpoint, position, f"{IOI_CLEAN} | {IOI_CORRUPTED} | Mary | John"),
                                r"You gave pairs, but the task is \w+, which draws its own: choose the task custom"))
    for endpoint, positions in TOKEN_FIELDS.items():
        for position in positions:
            out += [
                (endpoint, with_arg(endpoint, position, " Mary John"), r"must be a single token, got ' Mary John' -> \[' Mary', ' John'\]"),
                (endpoint, with_arg(endpoint, position, " zebra"), r"' zebra' is not in this model's vocabulary"),
                (endpoint, with_arg(endpoint, position, "Berlin"), r"did you mean ' Berlin'\?"),
                (endpoint, with_arg(endpoint, position, "y" * 5000), r"must be a single token, got 'yyyy.*\(5,000 characters\)"),
                (endpoint, with_arg(endpoint, position, 7), r"^(?![\s\S]*token token)[\s\S]*The [a-z ]*token must be text, got int"),
            ]
    out += [
        ("/dla", (IOI_CLEAN, "", " John"), "target token is empty"),
        ("/patching", (IOI_CLEAN, IOI_CORRUPTED, "", " John"), "answer token is empty"),
        ("/contrast", (IOI_CLEAN, IOI_CORRUPTED, " Mary", ""), "wrong answer token is empty"),
        ("/dla", (IOI_CLEAN, " Mary", " Mary"), "same"),
        ("/explore", (IOI_CLEAN, " Mary", " Mary", 1, 0), "same"),
        ("/patching", (IOI_CLEAN, IOI_CORRUPTED, " Mary", " Mary"), "same token"),
        ("/attribution_patching", (IOI_CLEAN, IOI_CORRUPTED, " John", " John"), "same token"),
        ("/contrast", (IOI_CLEAN, IOI_CORRUPTED, " Mary", " Mary"), "same token"),
    ]
    ranges = {
        "k": "between 1 and 100", "layer": "between 0 and 4", "head": "between 0 and 3",
        "seq_len": "between 2 and 31", "batch": "between 1 and 64", "seed": "between 0 and 4294967295",
        "n": f"between 1 and {LIMITS.max_task_patching_pairs}",
        ("/circuit", "k"): "between 1 and 761",  # a circuit's edges: 1 to all of the demo model's graph
    }
    for name, t in TECHNIQUES.items():  # a choice not offered: the message names the choices
        for position, spec in enumerate(t.inputs):
            if spec.kind == "choice":
                for value in ["nope", "", 42, None]:
                    out.append((f"/{name}", with_arg(f"/{name}", position, value), re.escape(spec.choices[0])))
    out_of_range = {
        "k": [0, 101, -5], "layer": [-1, 5, -5], "head": [-1, 4, -5], "seq_len": [1, 32, -5], "batch": [0, 65, -5], "seed": [-1, 2**40, -5],
        "n": [0, 65, 257], ("/circuit", "k"): [0, 762, -5],
    }
    for endpoint, fields in INT_FIELDS.items():
        for position, name in fields.items():
            for value in [*out_of_range.get((endpoint, name), out_of_range.get(name, [])), 2.5, "3", "abc", None, [1]]:  # a number's range is its technique's
                out.append((endpoint, with_arg(endpoint, position, value), f"{name} must be .*{ranges.get((endpoint, name), ranges.get(name, ''))}"))
    return out


CASES = cases()


@pytest.mark.parametrize("endpoint, args, message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(client, endpoint, args, message):
    start = time.perf_counter()
    with pytest.raises(CLIENT_ERRORS) as error:
        client.predict(*args, api_name=endpoint)
    assert GENERIC not in str(error.value) and "Traceback" not in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)[:300]
    assert len(str(error.value)) < 600  # a sentence, not a dump of the input
    assert time.perf_counter() - start < 10  # even a megabyte is turned away at once (no timing claims beyond "not hung")
    assert client.predict("When John and Mary went", 1, api_name="/predict")["tokens"][-1] == " went"


def test_good_requests_still_work_after_all_that(client):
    for endpoint, args in GOOD.items():
        client.predict(*args, api_name=endpoint)


def test_hostile_text_is_data_not_markup(tiny_model):
    """With GPT-2's tokenizer emoji, control characters, RTL marks, NUL and HTML are ordinary text:
    results carry them verbatim, and figures show them escaped (never as markup)."""
    from core import plots

    hostile = "Hi 😀 \u202eevil\u202c \x00 \x07 <script>alert(1)</script> <img src=x onerror=alert(2)>"
    lens = logit_lens(tiny_model, hostile, " the")
    assert "<script>alert(1)</script> <img src=x onerror=alert(2)>" in "".join(lens.tokens)
    labels = list(plots.logit_lens_heatmap(lens).data[0].x)
    position = lens.tokens.index(")</")
    assert labels[position] == f"{position}: )&lt;/"  # shown as the text ")</", never parsed as markup
    assert not any("<" in label for label in labels)


# --- fuzz ------------------------------------------------------------------------------

TEXT = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    st.sampled_from([IOI_CLEAN, IOI_CORRUPTED, SHORT, " Mary", " John", "Mary", "", " ", LONG]),
    st.builds(lambda a, b: a + b, st.sampled_from([IOI_CLEAN, SHORT]), st.text(max_size=10)),
)
ANY = st.one_of(TEXT, st.integers(-10, 10**6), st.floats(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
INT = st.one_of(st.integers(-5, 70), st.floats(-5, 70), ANY)
JSON_ANY = st.one_of(
    TEXT, st.integers(-10, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.none(), st.booleans(), st.lists(st.integers(), max_size=2)
)
JSON_INT = st.one_of(st.integers(-5, 70), st.floats(-5, 70), JSON_ANY)  # what JSON can carry (no NaN / inf)
CORE_KINDS = {"prompt": TEXT, "token": TEXT, "int": INT, "choice": st.one_of(TEXT, ANY), "text": TEXT}
CORE_CALLS = {  # each technique's inputs, fuzzed by kind; an optional token may also be None
    name: (t.run, [st.one_of(CORE_KINDS[spec.kind], st.none()) if spec.default == "" else CORE_KINDS[spec.kind] for spec in t.inputs])
    for name, t in TECHNIQUES.items()
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("name", list(CORE_CALLS))
def test_fuzz_core_raises_only_clear_value_errors(demo_model, name):
    fn, strategies = CORE_CALLS[name]

    @FUZZ
    @given(st.tuples(*strategies))
    def check(args):
        try:
            fn(demo_model, *args)
        except ValueError as err:
            assert str(err) and len(str(err)) < 600 and not str(err).startswith("Traceback")

    check()


A, I = JSON_ANY, JSON_INT
API_KINDS = {"prompt": A, "token": A, "int": I, "choice": A, "text": A}  # anything JSON can carry; a pair's prompts are text (so most requests reach the model)
API_ARGS = {
    endpoint: [TEXT if kind == "prompt" and endpoint in PAIR_ENDPOINTS else API_KINDS[kind] for kind in kinds] for endpoint, kinds in KINDS.items()
}


@pytest.mark.parametrize("endpoint", list(API_ARGS))
def test_fuzz_api_answers_with_a_result_or_a_clear_message(client, endpoint):
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.tuples(*API_ARGS[endpoint]))
    def check(args):
        try:
            client.predict(*args, api_name=endpoint)
        except CLIENT_ERRORS as err:
            assert GENERIC not in str(err) and "Traceback" not in str(err), str(err)[:300]

    check()
    assert client.predict("When John and Mary went", 1, api_name="/predict")["tokens"][-1] == " went"
