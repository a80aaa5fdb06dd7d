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
    activation_patching,
    attention_patterns,
    attribution_patching,
    direct_logit_attribution,
    induction_scores,
    logit_lens,
    predict,
)
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED

CLIENT_ERRORS = (AppError, ValidationError)  # ValidationError: the tabs' events check their inputs before running
GENERIC = "upstream Gradio app has raised an exception"
SHORT = "When John and Mary went to the store"
LONG = "When John and Mary went to the store," * 10  # 81 tokens: over the demo model's 64
MEGABYTE = "x" * 1_000_000

# (endpoint, a good request, {field: position in the args})
GOOD = {
    "/predict": (IOI_CLEAN, 5),
    "/logit_lens": (IOI_CLEAN, " Mary"),
    "/dla": (IOI_CLEAN, " Mary", " John"),
    "/attention": (IOI_CLEAN, 1),
    "/induction": (10, 3, 4),
    "/patching": (IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"),
    "/attribution_patching": (IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"),
    "/explore": (IOI_CLEAN, " Mary", " John", 1, 2),
    "/contrast": (IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"),
    "/circuit_map": (10, 3, 4),
}
PROMPT_ENDPOINTS = ["/predict", "/logit_lens", "/dla", "/attention", "/explore", "/patching", "/attribution_patching", "/contrast"]
PAIR_ENDPOINTS = ["/patching", "/attribution_patching", "/contrast"]
TOKEN_FIELDS = {  # endpoint -> positions of single-token inputs
    "/logit_lens": [1], "/dla": [1, 2], "/explore": [1, 2], "/patching": [2, 3], "/attribution_patching": [2, 3], "/contrast": [2, 3],
}
INT_FIELDS = {  # endpoint -> {position: name}
    "/predict": {1: "k"}, "/attention": {1: "layer"}, "/explore": {3: "layer", 4: "head"},
    "/induction": {0: "seq_len", 1: "batch", 2: "seed"}, "/circuit_map": {0: "seq_len", 1: "batch", 2: "seed"},
}


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
    for endpoint in PAIR_ENDPOINTS:
        out += [
            (endpoint, (SHORT, SHORT + " and", " Mary", " John"), r"same number of tokens.*clean has 9 .* corrupted has 10"),
        ]
        out.append((endpoint, (IOI_CLEAN, IOI_CLEAN, " Mary", " John"), "same logit difference"))
    for endpoint, positions in TOKEN_FIELDS.items():
        for position in positions:
            out += [
                (endpoint, with_arg(endpoint, position, " Mary John"), r"must be a single token, got ' Mary John' -> \[' Mary', ' John'\]"),
                (endpoint, with_arg(endpoint, position, " zebra"), r"' zebra' is not in this model's vocabulary"),
                (endpoint, with_arg(endpoint, position, "Berlin"), r"did you mean ' Berlin'\?"),
                (endpoint, with_arg(endpoint, position, "y" * 5000), r"must be a single token, got 'yyyy.*\(5,000 characters\)"),
                (endpoint, with_arg(endpoint, position, 7), "must be text"),
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
    }
    out_of_range = {"k": [0, 101], "layer": [-1, 5], "head": [-1, 4], "seq_len": [1, 32], "batch": [0, 65], "seed": [-1, 2**40]}
    for endpoint, fields in INT_FIELDS.items():
        for position, name in fields.items():
            for value in [*out_of_range[name], -5, 2.5, "3", "abc", None, [1]]:
                out.append((endpoint, with_arg(endpoint, position, value), f"{name} must be .*{ranges[name]}"))
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
CORE_CALLS = {
    "predict": (predict, [TEXT, INT]),
    "logit_lens": (logit_lens, [TEXT, st.one_of(TEXT, st.none())]),
    "dla": (direct_logit_attribution, [TEXT, TEXT, st.one_of(TEXT, st.none())]),
    "attention": (attention_patterns, [TEXT, INT]),
    "induction": (induction_scores, [INT, st.one_of(st.integers(-2, 5), ANY), INT]),
    "patching": (activation_patching, [TEXT, TEXT, TEXT, TEXT]),
    "attribution_patching": (attribution_patching, [TEXT, TEXT, TEXT, TEXT]),
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
API_ARGS = {
    "/predict": [A, A], "/logit_lens": [A, A], "/dla": [A, A, A], "/attention": [A, I], "/induction": [I, I, I],
    "/patching": [TEXT, TEXT, A, A], "/attribution_patching": [TEXT, TEXT, A, A],
    "/explore": [A, A, A, I, I], "/contrast": [TEXT, TEXT, A, A], "/circuit_map": [I, I, I],
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
