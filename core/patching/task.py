"""Activation patching over a task (a list of contrast pairs), exact, on the fast engine with the
patches of many pairs batched together.

score[sweep][layer, index] = mean over pairs of (patched - corrupted) / mean over pairs of (clean - corrupted):
the task's mean effect, normalised by the task's mean clean - corrupted gap (so 1 = the task's clean
behaviour restored on average). Layer x position sweeps need every pair to have one token length
(positions must mean the same thing); with several lengths only the head sweep is computed and the
result says why. Models the fast engine does not fit run pair after pair through hooks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from core.config import DEFAULTS
from core.contrast import SWEEPS, check_swing
from core.model import Model
from core.patching.exact import run_pair
from core.patching.fast import FastRun, sweep_jobs
from core.registry import Progress
from core.tasks import Task


@dataclass(frozen=True)
class TaskPatchingResult:
    task: str
    n_pairs: int
    lengths: list[int]  # the pairs' token lengths (one: every sweep; several: head_out only)
    clean_values: Float[np.ndarray, " pair"]
    corrupted_values: Float[np.ndarray, " pair"]
    scores: dict[str, np.ndarray]  # sweep -> [layer, pos] or [layer, head], the task's normalised mean
    deltas: dict[str, np.ndarray]  # sweep -> [pair, layer, index]: each pair's patched - corrupted

    @property
    def gap(self) -> float:
        return float((self.clean_values - self.corrupted_values).mean())


def _fast_sweeps(runs: list[FastRun], sweeps: tuple[str, ...], rows_per_pass: int, progress: Progress | None) -> dict[str, np.ndarray]:
    """Raw metrics [pair, layer, index] of every patch of every pair; the pairs of one token length
    go through the engine together (a chunk of jobs mixes pairs)."""
    engine = runs[0].engine
    n_pos = runs[0].corrupted.resid_pre.shape[1]  # one length whenever a by-position sweep is asked for
    raw = {
        name: np.stack([np.full((engine.n_layers, SWEEPS[name].size(n_pos, engine.n_heads)), run.corrupted_value) for run in runs])
        for name in sweeps
    }
    groups: dict[int, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(run.corrupted.resid_pre.shape[1], []).append(i)
    starts = {length: min(runs[i].pair.first_difference for i in members) for length, members in groups.items()}

    def per_layer(length: int) -> int:
        return sum(length - starts[length] if SWEEPS[name].axis == "pos" else engine.n_heads for name in sweeps)

    total = sum(len(members) * engine.n_layers * per_layer(length) for length, members in groups.items())  # at most
    done = 0
    with torch.no_grad():
        for length, members in groups.items():
            start = starts[length]
            jobs = itertools.chain.from_iterable(
                sweep_jobs(engine, runs[i].clean, runs[i].corrupted, start, pair=local, sweeps=sweeps) for local, i in enumerate(members)
            )
            traces, directions = [runs[i].corrupted for i in members], [runs[i].direction for i in members]
            chunk = max(1, rows_per_pass // (length - start))
            while part := list(itertools.islice(jobs, chunk)):
                if progress is not None:
                    progress(done / total, "task patching")
                metrics = engine.patched_metrics(traces, start, [job for _, _, job in part], directions)
                for (name, index, job), value in zip(part, metrics.tolist()):
                    raw[name][members[job.pair]][index] = value
                done += len(part)
    return raw


def task_patching(model: Model, task: Task, progress: Progress | None = None, rows_per_pass: int = DEFAULTS.patch_rows_per_pass) -> TaskPatchingResult:
    pairs = task.contrast_pairs(model)
    lengths = sorted({pair.clean_tokens.shape[-1] for pair in pairs})
    sweeps = tuple(SWEEPS) if len(lengths) == 1 else tuple(name for name, sweep in SWEEPS.items() if sweep.axis == "head")
    first = run_pair(model, pairs[0])  # checks the fast engine against the model once (or falls back to hooks)
    runs = [first] + [run_pair(model, pair) for pair in pairs[1:]]
    clean = np.array([run.clean_value for run in runs])
    corrupted = np.array([run.corrupted_value for run in runs])
    check_swing(float(clean.mean()), float(corrupted.mean()))
    if all(isinstance(run, FastRun) for run in runs):
        raw = _fast_sweeps(runs, sweeps, rows_per_pass, progress)
    else:  # hooks, pair after pair
        per_pair = [run.sweeps(progress) for run in runs]
        raw = {name: np.stack([p[name].numpy() for p in per_pair]) for name in sweeps}
    deltas = {name: raw[name] - corrupted[:, None, None] for name in sweeps}
    gap = float((clean - corrupted).mean())
    return TaskPatchingResult(
        task=task.name,
        n_pairs=len(pairs),
        lengths=lengths,
        clean_values=clean,
        corrupted_values=corrupted,
        scores={name: deltas[name].mean(0) / gap for name in sweeps},
        deltas=deltas,
    )
