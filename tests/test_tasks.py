"""Tasks (core.tasks): the built-in tasks on the demo model's and GPT-2's vocabularies, the user's own
pairs in three formats with messages that name the line, and the task-level metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.tasks import BUILT_IN, PairText, built_in_task, checked_inputs, chosen_task, parse_pairs, task_metric
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED


@pytest.mark.parametrize("name", list(BUILT_IN))
@pytest.mark.parametrize("fixture", ["demo_model", "gpt2_shaped"])
def test_built_in_tasks_apply_to_both_vocabularies_and_are_seeded(request, fixture, name):
    model = request.getfixturevalue(fixture)
    task = built_in_task(model, name, 24, seed=3)
    pairs = task.contrast_pairs(model)  # every pair valid: one token length, single-token answers that differ
    assert len(pairs) == 24 and task.description
    assert built_in_task(model, name, 24, seed=3) == task != built_in_task(model, name, 24, seed=4)
    assert all(p.answer != p.wrong and p.clean != p.corrupted for p in task.pairs)


def test_ioi_pairs_cover_both_orders_and_both_corruptions(demo_model):
    s2 = built_in_task(demo_model, "ioi", 8, seed=1)
    abc = built_in_task(demo_model, "ioi_abc", 8, seed=1)
    for pair, other in zip(s2.pairs, abc.pairs):
        io, subject = pair.answer.strip(), pair.wrong.strip()
        assert pair.clean.count(subject) == 2 and pair.clean.count(io) == 1  # S1, S2 and the IO once
        assert pair.corrupted.count(io) == 2 and subject in pair.corrupted  # S2 -> IO
        assert other.clean == pair.clean and io not in other.corrupted and subject not in other.corrupted  # ABC: other names
    orders = ["BABA" if p.clean.index(p.wrong.strip()) < p.clean.index(p.answer.strip()) else "ABBA" for p in s2.pairs]
    assert orders.count("BABA") == orders.count("ABBA") == 4


@pytest.mark.parametrize("name, clean_above, corrupted_below", [("ioi", 4.0, -3.0), ("ioi_abc", 4.0, 1.5), ("induction", 5.0, 0.0), ("facts", 5.0, -5.0)])
def test_task_metric_on_the_demo_model(demo_model, name, clean_above, corrupted_below):
    """The demo model was trained on this world: every task separates clean from corrupted (measured:
    64 pairs, seed 0: IOI +6.0 / -5.8, ABC corruption -0.2, induction +7.9 / -1.3, facts +8.0 / -7.9)."""
    result = task_metric(demo_model, built_in_task(demo_model, name, 64, seed=0))
    (clean, clean_error), (corrupted, corrupted_error) = result.clean, result.corrupted
    assert clean > clean_above and corrupted < corrupted_below
    assert 0 < clean_error < 0.5 and 0 < corrupted_error < 0.5
    swing, swing_error = result.swing
    assert swing == pytest.approx(clean - corrupted) and swing_error > 0


def test_task_metric_batched_equals_each_pair_alone(demo_model):
    task = built_in_task(demo_model, "ioi", 12, seed=2)  # several templates: several token lengths
    result = task_metric(demo_model, task)
    for pair, clean, corrupted in zip(task.contrast_pairs(demo_model), result.clean_values, result.corrupted_values):
        with torch.no_grad():
            alone = [float(pair.metric.of_logits(demo_model(t))[0]) for t in (pair.clean_tokens, pair.corrupted_tokens)]
        np.testing.assert_allclose([clean, corrupted], alone, atol=1e-4)


LINES = f"""{IOI_CLEAN} | {IOI_CORRUPTED} | Mary | John

When Tom and James went to the park, Tom gave a ball to|When Tom and James went to the park, James gave a ball to| James| Tom
"""


def test_the_users_pairs_in_three_formats_give_the_same_task(demo_model):
    lines = parse_pairs(LINES)
    assert lines.pairs[0] == PairText(IOI_CLEAN, IOI_CORRUPTED, " Mary", " John") and lines.lines == (1, 3)
    rows = [[p.clean, p.corrupted, p.answer, p.wrong] for p in lines.pairs]
    csv_text = "clean,corrupted,answer,wrong\n" + "\n".join(",".join(f'"{v}"' for v in row) for row in rows)
    jsonl = "\n".join(json.dumps(dict(zip(("clean", "corrupted", "answer", "wrong"), row))) for row in rows)
    assert parse_pairs(csv_text, "csv").pairs == parse_pairs(jsonl, "jsonl").pairs == lines.pairs
    assert task_metric(demo_model, lines).clean_values.shape == (2,)
    assert parse_pairs(f"{IOI_CLEAN}|{IOI_CORRUPTED}|Mary|John").pairs[0].answer == "Mary"  # no space written, none taken


@pytest.mark.parametrize(
    "text, fmt, message",
    [
        ("", "lines", "has no pairs"),
        ("a | b | c", "lines", r"Line 1: expected 4 fields separated by '\|'.*got 3"),
        (f"\n\n{IOI_CLEAN} | {IOI_CORRUPTED} | Mary\n", "lines", "Line 3: expected 4 fields"),
        ("clean,corrupted,answer,wrong\n", "csv", "only a header"),
        ('"a","b","c"\n', "csv", "Line 1: expected 4 columns"),
        ('{"clean": "a"}\n', "jsonl", "Line 1: expected an object with the text fields"),
        ("{not json\n", "jsonl", "Line 1: not JSON"),
        ("x | y | z | w", "yaml", "Unknown format 'yaml'"),
        ("a | b | c | d\n" * 300, "lines", "300 pairs; the limit is 256"),
        ("x" * 200_000, "lines", "characters long; the limit is 100,000"),
        (42, "lines", "must be text"),
    ],
)
def test_bad_pairs_get_a_message_that_names_the_line(text, fmt, message):
    with pytest.raises(ValueError, match=message):
        parse_pairs(text, fmt)


def test_a_pair_the_model_cannot_take_is_named_by_its_line(demo_model):
    text = f"{IOI_CLEAN} | {IOI_CORRUPTED} | Mary | John\n\n{IOI_CLEAN} | When John and Mary went | Mary | John"
    with pytest.raises(ValueError, match=r"Your task, line 3: The clean and corrupted prompts must have the same number of tokens"):
        parse_pairs(text).contrast_pairs(demo_model)


@pytest.mark.parametrize(
    "args, message",
    [
        (("nope", 8), "There is no task 'nope': the built-in tasks are ioi, ioi_abc, induction, facts"),
        (("ioi", 0), "n must be between 1 and 256"),
        (("ioi", 257), "n must be"),
    ],
)
def test_bad_task_requests_get_a_clear_message(demo_model, args, message):
    with pytest.raises(ValueError, match=message):
        built_in_task(demo_model, *args)


def test_a_task_is_named_in_any_case_and_pairs_beside_a_built_in_one_are_refused(demo_model):
    """As a method is ("EAP" is "eap"); pairs given with a built-in task would be left out: an API caller who
    forgot task="custom" is told, instead of getting the built-in task's numbers for theirs."""
    assert chosen_task(demo_model, " IOI ", 4, 1).pairs == chosen_task(demo_model, "ioi", 4, 1).pairs
    assert chosen_task(demo_model, "Custom", pairs=f"{IOI_CLEAN} | {IOI_CORRUPTED} | Mary | John").name == "Your task"
    with pytest.raises(ValueError, match="You gave pairs, but the task is ioi, which draws its own: choose the task custom to run your pairs"):
        chosen_task(demo_model, "ioi", 4, pairs=f"{IOI_CLEAN} | {IOI_CORRUPTED} | Mary | John")
    assert checked_inputs(demo_model, "IOI", 4, 0, "x")[0] == {"pairs": "You gave pairs, but the task is ioi, which draws its own: "
                                                                 "choose the task custom to run your pairs, or clear them to run ioi."}
    assert chosen_task(demo_model, "ioi", 4, pairs=" \n").name == chosen_task(demo_model, "ioi", 4, pairs=None).name  # blank: none given


@pytest.mark.gpt2
def test_ioi_mean_logit_difference_on_gpt2_is_near_wang_et_al(gpt2):
    """Wang et al. (2022) report a mean logit difference of 3.56 on GPT-2 Small over their IOI dataset.
    Ours: 256 pairs of the same templates with our name lists, both orders; within 1.0 of theirs."""
    clean, error = task_metric(gpt2, built_in_task(gpt2, "ioi", 256, seed=0)).clean
    assert abs(clean - 3.56) < 1.0 and error < 0.2
