"""Activation patching on a contrast pair (Meng et al., 2022; Wang et al., 2022), exact.

Clean activations are patched into the corrupted run one component at a time (the sweeps of
`core.contrast.SWEEPS`, with exactly the semantics of `transformer_lens.patching`), and the metric is
normalised, (patched - corrupted) / (clean - corrupted): 0 = no effect, 1 = clean behaviour restored.

Two engines give the same numbers through one interface (a run of one pair: its two unpatched values,
every sweep's raw metrics, head DLA). For GPT-2-style models the fast engine (`core.patching.fast`)
computes only what each patch can change; every other model, and any model whose fast engine
disagrees with its own forward pass, goes through hooks (`core.patching.hooks`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from core import plots
from core.config import DEFAULTS
from core.contrast import ON_A_PAIR, SWEEPS, ContrastPair, check_swing, normalised
from core.model import Model, fixed_prompt, str_tokens
from core.patching.fast import Engine, FastRun
from core.patching.hooks import HookRun
from core.registry import Progress, Technique
from core.results import PatchingResult

_ENGINES: "weakref.WeakKeyDictionary[Model, Engine | None]" = weakref.WeakKeyDictionary()


def fast_engine(model: Model) -> Engine | None:
    """The model's fast engine, built once; None if its architecture is not supported, or once it has
    disagreed with the model."""
    if model not in _ENGINES:
        _ENGINES[model] = Engine(model) if Engine.supports(model) else None
    return _ENGINES[model]


def checked_engine(model: Model) -> Engine | None:
    """The model's fast engine if one has been built and has passed its check (`verified_engine`); builds none."""
    found = _ENGINES.get(model)
    return found if found is not None and found.verified else None


def verified_engine(model: Model, agrees: Callable[[Engine], bool]) -> Engine | None:
    """The model's fast engine, once `agrees(engine)` has seen it answer as the model's own forward pass does
    (asked until one check passes, whichever technique asks: the engine is one model of the forward pass,
    so one check stands for every technique that runs on it); None if the model is not supported or the engine
    ever disagreed (or raised while checked): then it is never used for that model."""
    found = fast_engine(model)
    if found is None or found.verified:
        return found
    try:
        agreed = agrees(found)
    except Exception:  # noqa: BLE001  (an engine that cannot run what the model runs disagrees)
        agreed = False
    if agreed:
        found.verified = True
        return found
    _ENGINES[model] = None
    return None


def prompt_engine(model: Model, names: frozenset[str]) -> Engine | None:
    """The engine for a prompt pass (core.model.read_prompts) that caches `names`, if it gives them all; checked
    once (verified_engine) on a fixed prompt: its logits and every activation it can give, against the model's
    own `run_with_cache`."""
    found = fast_engine(model)
    if found is None or not names <= found.hook_names:
        return None
    return verified_engine(model, _agrees_with_the_cache(model))


def _agrees_with_the_cache(model: Model) -> Callable[[Engine], bool]:
    def agrees(engine: Engine) -> bool:
        tokens = fixed_prompt(model).to(engine.device)
        names = engine.hook_names
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
            ours, our_cache = engine.run_with_cache(tokens, names, range(tokens.shape[-1]))
        found = names <= cache.keys()  # the model's cache may hold more: aliases of the same hooks
        return found and close(ours, logits) and all(value.shape == cache[name].shape and close(value, cache[name]) for name, value in our_cache.items())

    return agrees


def close(ours: float | Tensor, theirs: float | Tensor) -> bool:
    """Whether a fast path's value is the model's own, to DEFAULTS.fast_path_tolerance (relative above 1)."""
    theirs = torch.as_tensor(theirs, dtype=torch.float64)
    difference = (torch.as_tensor(ours, dtype=torch.float64) - theirs).abs()
    return bool((difference <= DEFAULTS.fast_path_tolerance * (1 + theirs.abs())).all())


def run_pair(model: Model, pair: ContrastPair, engine: Literal["auto", "hooks"] = "auto") -> FastRun | HookRun:
    """One pair on the fast engine where the model allows it, else through hooks. The first time on a
    model, the fast engine's unpatched values must match the model's own forward pass
    (DEFAULTS.fast_path_tolerance); if they do not, its numbers are never used for that model."""
    if engine != "auto" or fast_engine(model) is None:
        return HookRun(model, pair)
    runs: dict[str, FastRun | HookRun] = {}

    def agrees(found: Engine) -> bool:  # the check's two runs are kept: whichever is trusted is the answer
        runs["fast"], runs["hooks"] = FastRun(found, pair), HookRun(model, pair)
        return all(close(getattr(runs["fast"], value), getattr(runs["hooks"], value)) for value in ("clean_value", "corrupted_value"))

    found = verified_engine(model, agrees)
    if found is None:  # an architecture detail the engine does not model
        return runs["hooks"] if "hooks" in runs else HookRun(model, pair)
    return runs["fast"] if "fast" in runs else FastRun(found, pair)


def run_pairs(model: Model, pairs: list[ContrastPair], engine: Literal["auto", "hooks"] = "auto"):
    """(each pair's run, the clean values, the corrupted values) of a task's pairs, its mean swing checked."""
    runs = [run_pair(model, pair, engine) for pair in pairs[:1]]  # the first checks the fast engine against the model (or falls back)
    if runs and isinstance(runs[0], FastRun):
        runs += FastRun.many(runs[0].engine, pairs[1:])  # the rest traced together, by token length
    else:
        runs += [HookRun(model, pair) for pair in pairs[1:]]
    clean = np.array([run.clean_value for run in runs])
    corrupted = np.array([run.corrupted_value for run in runs])
    check_swing(float(clean.mean()), float(corrupted.mean()))
    return runs, clean, corrupted


def activation_patching(
    model: Model,
    clean_prompt: str,
    corrupted_prompt: str,
    answer: str,
    wrong_answer: str,
    progress: Progress | None = None,
    rows_per_pass: int = DEFAULTS.patch_rows_per_pass,
    engine: Literal["auto", "hooks"] = "auto",
) -> PatchingResult:
    """All four sweeps, normalised, plus head DLA of the same logit difference on the clean prompt.
    The fast engine evaluates `rows_per_pass` patched positions per pass (memory, not results);
    `engine="hooks"` runs the hook engine whatever the model."""
    pair = ContrastPair.of(model, clean_prompt, corrupted_prompt, answer, wrong_answer)
    run = run_pair(model, pair, engine)
    check_swing(run.clean_value, run.corrupted_value)
    raw = run.sweeps(progress, rows_per_pass)
    return PatchingResult(
        clean_tokens=str_tokens(model, pair.clean_tokens),
        corrupted_tokens=str_tokens(model, pair.corrupted_tokens),
        answer=answer,
        wrong_answer=wrong_answer,
        clean_value=run.clean_value,
        corrupted_value=run.corrupted_value,
        head_dla=run.head_dla(),
        **{name: normalised(raw[name], run.clean_value, run.corrupted_value) for name in SWEEPS},
    )


TECHNIQUE = Technique(
    name="patching",
    run=activation_patching,
    result=PatchingResult,
    summary="Activation patching, exact (resid_pre, attn_out, mlp_out by layer x pos; head_out by layer x head).",
    figures=(*(functools.partial(plots.patching_heatmap, sweep=name) for name in SWEEPS), plots.dla_vs_patching),
    **ON_A_PAIR,
)
