"""Activation patching over a task (a list of contrast pairs), exact, on the fast engine with the
patches of many pairs batched together.

score[sweep][layer, index] = mean over pairs of (patched - corrupted) / mean over pairs of (clean - corrupted):
the task's mean effect, normalised by the task's mean clean - corrupted gap (so 1 = the task's clean
behaviour restored on average). Layer x position sweeps need every pair to have one token length
(positions must mean the same thing); with several lengths only the head sweep is computed and the
result says why. Models the fast engine does not fit run pair after pair through hooks.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from core import plots
from core.config import DEFAULTS
from core.contrast import SWEEPS, ContrastPair
from core.model import Model, str_tokens
from core.patching.cost import check_budget, pairs_flops
from core.patching.exact import run_pairs
from core.patching.fast import FastRun, evaluate_jobs, sweep_jobs
from core.registry import Progress, Technique
from core.results import TaskPatchingResult
from core.tasks import TASK_INPUTS, Task, checked_inputs, chosen_task, size_field


def _fast_sweeps(runs: list[FastRun], sweeps: tuple[str, ...], rows_per_pass: int, progress: Progress | None) -> dict[str, np.ndarray]:
    """Raw metrics [pair, layer, index] of every patch of every pair; the pairs of one token length
    go through the engine together (a chunk of jobs mixes pairs)."""
    engine = runs[0].engine
    n_pos = runs[0].corrupted.resid_pre.shape[1]  # one length whenever a by-position sweep is asked for
    raw = {
        name: np.stack([np.full((engine.n_layers, SWEEPS[name].size(n_pos, engine.n_heads)), run.corrupted_value) for run in runs])
        for name in sweeps
    }

    def jobs_of(run: FastRun, start: int, local: int):
        return sweep_jobs(engine, run.clean, run.corrupted, start, pair=local, sweeps=sweeps)

    def count(run: FastRun, start: int) -> int:
        length = run.corrupted.resid_pre.shape[1]
        return engine.n_layers * sum(length - start if SWEEPS[name].axis == "pos" else engine.n_heads for name in sweeps)

    with torch.no_grad():
        for i, name, index, value in evaluate_jobs(runs, jobs_of, count, rows_per_pass, progress, "task patching"):
            raw[name][i][index] = value
    return raw


def task_sweeps(pairs: list[ContrastPair]) -> tuple[str, ...]:
    """The sweeps a task gets: all of them for pairs of one token length, else the by-head one only."""
    one_length = len({pair.clean_tokens.shape[-1] for pair in pairs}) == 1
    return tuple(SWEEPS) if one_length else tuple(name for name, sweep in SWEEPS.items() if sweep.axis == "head")


def _raw_sweeps(model: Model, pairs: list[ContrastPair], progress: Progress | None, rows_per_pass: int):
    """(each pair's clean and corrupted values, raw metrics [pair, layer, index] per sweep computed)."""
    sweeps = task_sweeps(pairs)
    runs, clean, corrupted = run_pairs(model, pairs)
    if all(isinstance(run, FastRun) for run in runs):
        raw = _fast_sweeps(runs, sweeps, rows_per_pass, progress)
    else:  # hooks, pair after pair
        per_pair = [run.sweeps(progress) for run in runs]
        raw = {name: np.stack([p[name].numpy() for p in per_pair]) for name in sweeps}
    return clean, corrupted, raw


def raw_task_sweeps(model: Model, task: Task, progress: Progress | None = None, rows_per_pass: int = DEFAULTS.patch_rows_per_pass):
    """(pairs, their token lengths, each pair's clean and corrupted values, raw metrics [pair, layer, index] per sweep computed)."""
    pairs = task.contrast_pairs(model)
    return pairs, sorted({pair.clean_tokens.shape[-1] for pair in pairs}), *_raw_sweeps(model, pairs, progress, rows_per_pass)


def task_patching(
    model: Model, task: Task, progress: Progress | None = None, rows_per_pass: int = DEFAULTS.patch_rows_per_pass, budget: bool = False
) -> TaskPatchingResult:
    """Every sweep over the task's pairs: mean (patched - corrupted) / mean (clean - corrupted). `budget`:
    refuse (before any patching) a task that needs more than LIMITS.max_patching_tflop, as the server does."""
    pairs = task.contrast_pairs(model)
    if budget:
        _check_budget(model, pairs)
    lengths = sorted({pair.clean_tokens.shape[-1] for pair in pairs})
    clean, corrupted, raw = _raw_sweeps(model, pairs, progress, rows_per_pass)
    gap = float((clean - corrupted).mean())
    scores = {name: (raw[name] - corrupted[:, None, None]).mean(0) / gap if name in raw else None for name in SWEEPS}
    return TaskPatchingResult(
        task=task.name,
        description=task.description,
        lengths=lengths,
        positions=str_tokens(model, pairs[0].clean_tokens) if len(lengths) == 1 else [],
        clean_values=clean,
        corrupted_values=corrupted,
        pairs=[[pair.clean, pair.corrupted, pair.answer, pair.wrong] for pair in task.pairs],
        head_out_effects=raw["head_out"] - corrupted[:, None, None],
        **scores,
    )


def _check_budget(model: Model, pairs: list[ContrastPair]) -> None:
    sweeps = task_sweeps(pairs)
    check_budget(pairs_flops(model, pairs, sweeps), len(pairs), f"This task ({len(pairs)} pairs; {', '.join(sweeps)})")


def input_errors(model: Model, task: str = "ioi", n: int = 32, seed: int = 0, pairs: str = "") -> dict[str, str]:
    """What is wrong with patch_task's inputs, keyed by input, without running the model: the task's own
    checks (core.tasks.checked_inputs), then the server's budget, on the input that sets the task's size."""
    errors, contrast = checked_inputs(model, task, n, seed, pairs)
    if not errors:
        try:
            _check_budget(model, contrast)
        except ValueError as err:
            errors = {size_field(task): str(err)}
    return errors


def patch_task(
    model: Model, task: str = "ioi", n: int = 32, seed: int = 0, pairs: str = "", progress: Progress | None = None
) -> TaskPatchingResult:
    """Task patching on a built-in task (`task`, `n` pairs drawn with `seed`) or on your own `pairs`
    (task "custom": one per line, clean | corrupted | answer | wrong), within the server's budget."""
    return task_patching(model, chosen_task(model, task, n, seed, pairs), progress, budget=True)


TECHNIQUE = Technique(
    name="task_patching",
    run=patch_task,
    result=TaskPatchingResult,
    summary="Activation patching over a task (many pairs): each sweep's mean effect / the task's mean clean - corrupted gap.",
    inputs=TASK_INPUTS,
    lane="heavy",
    example={"task": "induction", "n": 8, "seed": 0},
    figures=tuple(functools.partial(plots.task_heatmap, sweep=name) for name in SWEEPS),
    progress=True,
    input_errors=input_errors,
    tab="Contrast Pairs",
)
