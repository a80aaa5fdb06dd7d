"""Task-level patching (core.patching.task): the batched engine equals single-pair patching and
TransformerLens pair by pair; mixed token lengths keep the head sweep only; the demo model's IOI task
singles out L4H0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching

from core import SWEEPS, activation_patching, plots
from core.config import LIMITS
from core.model import to_tokens
from core.patching.cost import pairs_flops
from core.patching.exact import fast_engine
from core.patching.fast import FastRun
from core.patching.hooks import HookRun
from core.patching.path import task_path_patching
from core.patching.task import input_errors as task_errors
from core.patching.task import patch_task, raw_task_sweeps, task_patching, task_sweeps
from core.tasks import built_in_task


def test_batched_pairs_equal_each_pair_patched_alone(demo_model):
    task = built_in_task(demo_model, "induction", 6, seed=0)  # one token length: every sweep
    pairs, lengths, clean, corrupted, raw = raw_task_sweeps(demo_model, task, rows_per_pass=97)  # small chunks that mix pairs
    assert lengths == [10] and list(raw) == list(SWEEPS)  # BOS + 5 words + 4 repeated
    for i, pair in enumerate(task.pairs):
        alone = activation_patching(demo_model, pair.clean, pair.corrupted, pair.answer, pair.wrong)
        assert (clean[i], corrupted[i]) == pytest.approx((alone.clean_value, alone.corrupted_value), abs=1e-5)
        for name in SWEEPS:
            np.testing.assert_allclose(raw[name][i] - corrupted[i], getattr(alone, name) * alone.swing, atol=1e-4)
    result = task_patching(demo_model, task)
    assert result.gap == pytest.approx(float((clean - corrupted).mean()), abs=1e-9) and result.note is None
    for name in SWEEPS:
        np.testing.assert_allclose(getattr(result, name), (raw[name] - corrupted[:, None, None]).mean(0) / result.gap, atol=1e-6)  # other chunks


def test_pairs_traced_together_equal_the_models_own_runs_and_each_pair_alone(demo_model):
    """FastRun.many traces a task's prompts of one token length in one pass (several lengths, small chunks here)."""
    pairs = built_in_task(demo_model, "ioi", 12, seed=0).contrast_pairs(demo_model)
    assert len({pair.clean_tokens.shape[-1] for pair in pairs}) > 1
    engine = fast_engine(demo_model)
    for run, pair in zip(FastRun.many(engine, pairs, rows_per_pass=60), pairs, strict=True):
        reference = HookRun(demo_model, pair)  # the model's own forward pass
        assert (run.clean_value, run.corrupted_value) == pytest.approx((reference.clean_value, reference.corrupted_value), abs=1e-4)
        alone = FastRun(engine, pair)
        for field in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "k", "v"):
            torch.testing.assert_close(getattr(run.corrupted, field), getattr(alone.corrupted, field), atol=1e-5, rtol=1e-5)


def test_pairs_of_several_lengths_keep_the_head_sweep_only(demo_model):
    result = task_patching(demo_model, built_in_task(demo_model, "ioi", 16, seed=0))
    assert len(result.lengths) > 1 and result.resid_pre is None and result.head_out.shape == (5, 4)
    assert "only head_out" in result.note and result.positions == []
    figure = plots.task_heatmap(result, "resid_pre")  # says so in words, no empty axes
    assert not figure.data and not figure.layout.xaxis.visible and "see its tab" in figure.layout.annotations[0].text
    assert ", ".join(map(str, result.lengths)) in figure.layout.annotations[0].text


def test_the_demo_models_ioi_task_singles_out_L4H0(demo_model):
    """Measured (32 pairs, seed 0): L4H0 restores 0.80 of the task's mean gap, the next head 0.14."""
    head = task_patching(demo_model, built_in_task(demo_model, "ioi", 32, seed=0)).head_out
    assert np.unravel_index(np.abs(head).argmax(), head.shape) == (4, 0) and head[4, 0] > 0.6


def test_task_patching_equals_transformer_lens_pair_by_pair(demo_model):
    """Each pair's effects from transformer_lens.patching (one forward pass per patch), pair by pair.
    (Single pairs are checked against it on the GPT-2-shaped model too, tests/test_crosscheck.py.)"""
    model = demo_model
    task = built_in_task(model, "induction", 3, seed=5)  # one token length: every sweep
    _, _, _, corrupted, raw = raw_task_sweeps(model, task)
    deltas = {name: [] for name in SWEEPS}
    for pair in task.pairs:
        answer, wrong = model.to_single_token(pair.answer), model.to_single_token(pair.wrong)
        with torch.no_grad():
            _, cache = model.run_with_cache(to_tokens(model, pair.clean))
            corrupted_tokens = to_tokens(model, pair.corrupted)
            base = model(corrupted_tokens)[0, -1]
            for name, sweep in SWEEPS.items():
                metric = lambda logits: (logits[0, -1, answer] - logits[0, -1, wrong]) - (base[answer] - base[wrong])  # noqa: E731
                deltas[name].append(getattr(tl_patching, sweep.reference)(model, corrupted_tokens, cache, metric).double().cpu().numpy())
    for name in SWEEPS:  # each pair's patched - corrupted, in logits
        difference = np.abs(raw[name] - corrupted[:, None, None] - np.stack(deltas[name])).max()
        assert difference <= 1e-4, f"{name}: {difference:.2e}"


def test_a_request_over_the_patching_budget_says_how_many_pairs_fit(gpt2_shaped):
    """On GPT-2's shape 64 ten-token induction pairs, every position patched, need 14.3 TFLOP of matrix
    products (about 2 minutes here), over LIMITS.max_patching_tflop: refused before any patching, with the
    number of pairs that fits; 64 IOI pairs (head_out, 4.0 TFLOP) fit."""
    with pytest.raises(ValueError, match=r"This task \(64 pairs; resid_pre, attn_out, mlp_out, head_out\) needs 14.3 TFLOP .* at most 22 of these") as raised:
        patch_task(gpt2_shaped, "induction", 64)
    assert task_errors(gpt2_shaped, "induction", 64) == {"n": str(raised.value)}  # the page says it on the Pairs field, before the run
    with pytest.raises(ValueError, match=r"Path patching from embed over 64 pairs needs 19.4 TFLOP .* at most 16 of these"):
        task_path_patching(gpt2_shaped, "embed", "induction", 64)
    pairs = built_in_task(gpt2_shaped, "ioi", 64, seed=0).contrast_pairs(gpt2_shaped)
    assert task_sweeps(pairs) == ("head_out",) and pairs_flops(gpt2_shaped, pairs, ("head_out",)) < LIMITS.max_patching_tflop * 1e12


@pytest.mark.parametrize(
    "inputs, field",
    [
        (dict(task="ioi", n=0), "n"),
        (dict(task="ioi", n=65), "n"),
        (dict(task="ioi", n=8, seed=-1), "seed"),
        (dict(task="nope"), "task"),
        (dict(task="custom", pairs="this is | not right\nfoo"), "pairs"),
        (dict(task="custom", pairs=""), "pairs"),
        (dict(task="ioi", n=8, pairs="x"), "pairs"),  # pairs beside a built-in task: refused, never left out
        (dict(task=["ioi"]), "task"),
    ],
)
def test_a_tasks_bad_inputs_are_named_by_field_before_the_run_with_the_runs_own_message(demo_model, inputs, field):
    """What the page's validator shows on a field (input_errors: no forward pass) is what the run would raise."""
    errors = task_errors(demo_model, **inputs)
    with pytest.raises(ValueError) as raised:
        patch_task(demo_model, **inputs)
    assert errors == {field: str(raised.value)}

