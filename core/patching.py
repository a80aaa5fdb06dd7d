"""Activation patching on a clean / corrupted prompt pair (Meng et al., 2022; Wang et al., 2022).

Metric: logit(answer) - logit(wrong) at the final position. Clean activations are patched
into the corrupted run one component at a time and the metric is normalised,
(patched - corrupted) / (clean - corrupted): 0 = no effect, 1 = clean behaviour restored.
The sweeps have exactly the semantics of `transformer_lens.patching`:
`resid_pre`, `attn_out`, `mlp_out` by [layer, pos] (get_act_patch_resid_pre etc.) and
`head_out` by [layer, head], a head's output at all positions (get_act_patch_attn_head_out_all_pos).

Two engines give the same numbers. For GPT-2-style models `core.fast_patching` computes only
what each patch can change (from the patched layer on, at positions from the first that
differs, two logits at the final position) for all patches at once; every other model goes
through hooks, many patches per batched forward pass (`patch_sweep`).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from core import plots
from core.attribution import direct_logit_attribution
from core.config import DEFAULTS, LIMITS
from core.fast_patching import Engine, exact_sweeps
from core.model import Model, run_cached, single_token_id, str_tokens, to_tokens
from core.registry import Input, Technique
from core.results import PatchingResult
from examples import IOI_CLEAN, IOI_CORRUPTED

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Sweep:
    hook: str  # hook name inside a block, e.g. "hook_resid_pre" -> blocks.{layer}.hook_resid_pre
    axis: Literal["pos", "head"]  # what one patch replaces: one position, or one head at all positions


SWEEPS: dict[str, Sweep] = {
    "resid_pre": Sweep("hook_resid_pre", "pos"),
    "attn_out": Sweep("hook_attn_out", "pos"),
    "mlp_out": Sweep("hook_mlp_out", "pos"),
    "head_out": Sweep("attn.hook_z", "head"),
}


PAIR = (
    Input("clean_prompt", "prompt", "the prompt whose behaviour patching restores"),
    Input("corrupted_prompt", "prompt", "the same number of tokens, changed so the answer changes"),
    Input("answer", "token", "the clean prompt's answer, e.g. ' Mary'"),
    Input("wrong_answer", "token", "the answer the corruption favours, e.g. ' John'"),
)
PAIR_EXAMPLE = {"clean_prompt": IOI_CLEAN, "corrupted_prompt": IOI_CORRUPTED, "answer": " Mary", "wrong_answer": " John"}


SWEEP_HOOKS = tuple(sweep.hook for sweep in SWEEPS.values())  # every hook a sweep patches


def _logit_diff(logits: Float[Tensor, "batch pos vocab"], answer_id: int, wrong_id: int) -> Float[Tensor, " batch"]:
    return (logits[:, -1, answer_id] - logits[:, -1, wrong_id]).double()


def _patch_hook(indices: Int[Tensor, " batch"], clean: Tensor, axis: str):
    """Row b of the batch gets the clean activation at position (or head) indices[b]."""

    def hook(activation, hook):
        activation = activation.clone()
        rows = torch.arange(len(indices), device=activation.device)
        if axis == "pos":
            activation[rows, indices] = clean[0, indices]
        else:  # [batch, pos, head, d_head]: head indices[b] at every position
            activation[rows, :, indices] = clean[0][:, indices].transpose(0, 1)
        return activation

    return hook


def patch_sweep(
    model: Model,
    corrupted_tokens: Int[Tensor, "1 pos"],
    clean_cache,
    answer_id: int,
    wrong_id: int,
    sweep: Sweep,
) -> Float[Tensor, "layer index"]:
    """Raw metric (not normalised) for every single-component patch of one sweep."""
    n_pos = corrupted_tokens.shape[-1]
    size = n_pos if sweep.axis == "pos" else model.cfg.n_heads
    chunk = max(1, min(DEFAULTS.patch_batch_size, DEFAULTS.tokens_per_forward // n_pos))
    out = torch.zeros(model.cfg.n_layers, size, dtype=torch.float64)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.{sweep.hook}"
        for indices in torch.arange(size).split(chunk):
            batch = corrupted_tokens.expand(len(indices), -1)
            hook = _patch_hook(indices.to(corrupted_tokens.device), clean_cache[name], sweep.axis)
            logits = model.run_with_hooks(batch, fwd_hooks=[(name, hook)])
            out[layer, indices] = _logit_diff(logits, answer_id, wrong_id).cpu()
    return out


_ENGINES: "weakref.WeakKeyDictionary[Model, Engine | None]" = weakref.WeakKeyDictionary()


def _engine_agrees(model: Model, tokens, values, answer_id: int, wrong_id: int) -> bool:
    """Whether the engine's unpatched runs give the model's own metric."""
    with torch.no_grad():
        theirs = [float(_logit_diff(model(t), answer_id, wrong_id)[0]) for t in tokens]
    return all(abs(ours - value) <= DEFAULTS.fast_path_tolerance * (1 + abs(value)) for ours, value in zip(values, theirs))


def _engine(model: Model) -> Engine | None:
    """The model's fast-path engine, built once; None if its architecture is not supported."""
    if model not in _ENGINES:
        _ENGINES[model] = Engine(model) if Engine.supports(model) else None
    return _ENGINES[model]


def _hook_sweeps(model: Model, clean_tokens, corrupted_tokens, answer_id: int, wrong_id: int, progress) -> dict[str, Tensor]:
    """Every sweep through hooks: one batched forward pass per chunk of patches."""
    raw = {}
    with torch.no_grad():
        _, clean_cache = run_cached(model, clean_tokens, lambda name: name.endswith(SWEEP_HOOKS))
        for step, (name, sweep) in enumerate(SWEEPS.items()):
            if progress is not None:
                progress(step / len(SWEEPS), f"patching {name}")
            raw[name] = patch_sweep(model, corrupted_tokens, clean_cache, answer_id, wrong_id, sweep)
    return raw


def _prompt_tokens(model: Model, prompt: str, role: str):
    return to_tokens(model, prompt, LIMITS.max_patching_tokens, f"The {role} prompt")


def _check_lengths(model: Model, clean_tokens, corrupted_tokens) -> None:
    """Same number of tokens (positions line up), and not the very same tokens (nothing to patch)."""
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            "The clean and corrupted prompts must have the same number of tokens so positions line up: "
            f"clean has {clean_tokens.shape[-1]} {str_tokens(model, clean_tokens)}, "
            f"corrupted has {corrupted_tokens.shape[-1]} {str_tokens(model, corrupted_tokens)}."
        )
    if torch.equal(clean_tokens, corrupted_tokens):
        raise ValueError(
            "The clean and corrupted prompts are the same tokens, so they give the same logit difference and there "
            "is nothing for patching to restore: change the corrupted prompt (e.g. swap a name)."
        )


def _check_different(answer: str, answer_id: int, wrong_id: int) -> None:
    if answer_id == wrong_id:
        raise ValueError(f"The answer and the wrong answer are the same token ({answer!r}): pick two different tokens.")


def _check_pair(model: Model, clean_prompt: str, corrupted_prompt: str):
    clean_tokens = _prompt_tokens(model, clean_prompt, "clean")
    corrupted_tokens = _prompt_tokens(model, corrupted_prompt, "corrupted")
    _check_lengths(model, clean_tokens, corrupted_tokens)
    return clean_tokens, corrupted_tokens


def _answer_ids(model: Model, answer: str, wrong_answer: str) -> tuple[int, int]:
    answer_id = single_token_id(model, answer, "answer")
    wrong_id = single_token_id(model, wrong_answer, "wrong answer")
    _check_different(answer, answer_id, wrong_id)
    return answer_id, wrong_id


def input_errors(model: Model, clean_prompt: str, corrupted_prompt: str, answer: str, wrong_answer: str) -> dict[str, str]:
    """What is wrong with each argument of a contrast pair, keyed by argument name, without running
    the model (the same checks and messages as activation_patching): {} when all are fine."""
    errors: dict[str, str] = {}
    values = {}
    checks = {
        "clean_prompt": lambda: _prompt_tokens(model, clean_prompt, "clean"),
        "corrupted_prompt": lambda: _prompt_tokens(model, corrupted_prompt, "corrupted"),
        "answer": lambda: single_token_id(model, answer, "answer"),
        "wrong_answer": lambda: single_token_id(model, wrong_answer, "wrong answer"),
    }
    for name, check in checks.items():
        try:
            values[name] = check()
        except ValueError as err:
            errors[name] = str(err)
    pairs = {
        "corrupted_prompt": (("clean_prompt", "corrupted_prompt"), lambda: _check_lengths(model, values["clean_prompt"], values["corrupted_prompt"])),
        "wrong_answer": (("answer", "wrong_answer"), lambda: _check_different(answer, values["answer"], values["wrong_answer"])),
    }
    for name, (needs, check) in pairs.items():
        if all(n in values for n in needs):
            try:
                check()
            except ValueError as err:
                errors[name] = str(err)
    return errors


def _check_swing(clean_value: float, corrupted_value: float) -> None:
    """Scores are normalised by clean - corrupted: refuse a pair where that is (near) zero."""
    if abs(clean_value - corrupted_value) < DEFAULTS.same_metric_tolerance:
        raise ValueError(
            f"The clean and corrupted prompts give the same logit difference ({clean_value:.4f}), "
            "so there is nothing for patching to restore: make the prompts differ in a way that "
            "changes the answer."
        )


def activation_patching(
    model: Model,
    clean_prompt: str,
    corrupted_prompt: str,
    answer: str,
    wrong_answer: str,
    progress: Progress | None = None,
    rows_per_pass: int = DEFAULTS.patch_rows_per_pass,
) -> PatchingResult:
    """All four sweeps, normalised, plus head DLA of the same logit difference on the clean prompt.
    The fast engine evaluates `rows_per_pass` patched positions per pass (memory, not results)."""
    clean_tokens, corrupted_tokens = _check_pair(model, clean_prompt, corrupted_prompt)
    answer_id, wrong_id = _answer_ids(model, answer, wrong_answer)
    engine = _engine(model)
    if engine is not None:
        direction = engine.metric_direction(answer_id, wrong_id)
        with torch.no_grad():
            clean, corrupted = engine.trace(clean_tokens[0], direction), engine.trace(corrupted_tokens[0], direction)
        if not engine.verified:  # the first time on this model: do its unpatched runs match the model's own?
            if _engine_agrees(model, (clean_tokens, corrupted_tokens), (clean.metric, corrupted.metric), answer_id, wrong_id):
                engine.verified = True
            else:  # an architecture detail the engine does not model: never use its numbers
                _ENGINES[model] = engine = None
    if engine is not None:
        clean_value, corrupted_value = clean.metric, corrupted.metric
    else:
        with torch.no_grad():
            clean_value, corrupted_value = (float(_logit_diff(model(t), answer_id, wrong_id)[0]) for t in (clean_tokens, corrupted_tokens))
    _check_swing(clean_value, corrupted_value)
    if engine is not None:
        raw = exact_sweeps(
            engine, clean, corrupted, clean_tokens[0], corrupted_tokens[0], direction, rows_per_pass, progress
        )
        head_dla = engine.head_dla(clean, direction).double().cpu().numpy()
    else:
        raw = _hook_sweeps(model, clean_tokens, corrupted_tokens, answer_id, wrong_id, progress)
        head_dla = direct_logit_attribution(model, clean_prompt, answer, wrong_answer).heads
    scores = {name: ((raw[name] - corrupted_value) / (clean_value - corrupted_value)).numpy() for name in SWEEPS}
    return PatchingResult(
        clean_tokens=str_tokens(model, clean_tokens),
        corrupted_tokens=str_tokens(model, corrupted_tokens),
        answer=answer,
        wrong_answer=wrong_answer,
        clean_value=clean_value,
        corrupted_value=corrupted_value,
        head_dla=head_dla,
        **scores,
    )


TECHNIQUE = Technique(
    name="patching",
    run=activation_patching,
    result=PatchingResult,
    summary="Activation patching, exact (resid_pre, attn_out, mlp_out by layer x pos; head_out by layer x head).",
    inputs=PAIR,
    lane="heavy",
    example=PAIR_EXAMPLE,
    figures=(*(functools.partial(plots.patching_heatmap, sweep=name) for name in SWEEPS), plots.dla_vs_patching),
    input_errors=input_errors,
    tab="Contrast Pairs",
    progress=True,
)
