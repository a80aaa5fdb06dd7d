"""Attribution patching: a linear approximation of activation patching (Nanda, 2023;
Syed et al., 2023), two forward passes and one backward pass for every patch at once.

For a component with clean activation a_c and corrupted activation a_x, patching changes the
metric by approximately (a_c - a_x) . d metric / d a, the gradient taken on the corrupted run.
Scores are normalised like the exact ones, (approx change) / (clean - corrupted), over the same
components: resid_pre, attn_out, mlp_out by [layer, pos] and head_out by [layer, head] (a head's
output at all positions). They are an APPROXIMATION: exact patching stays the truth, and
`agreement` says how closely the two match.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from core import plots
from core.contrast import ON_A_PAIR, SWEEPS, ContrastPair, check_swing
from core.model import Model, keeping_logits, prompt_pass, str_tokens
from core.patching.exact import prompt_engine
from core.registry import Progress, Technique
from core.results import ApproximatePatchingResult, PatchingResult, agreement_stats


def attribution_patching(
    model: Model, clean_prompt: str, corrupted_prompt: str, answer: str, wrong_answer: str, progress: Progress | None = None
) -> ApproximatePatchingResult:
    """`progress(fraction, description)`, if given, hears each of its three steps (clean run, corrupted
    run with its backward pass, scores) as it begins."""
    report = progress or (lambda fraction, description: None)
    pair = ContrastPair.of(model, clean_prompt, corrupted_prompt, answer, wrong_answer)
    report(0.0, "attribution patching: clean run")
    n_layers, final = model.cfg.n_layers, pair.clean_tokens.shape[-1] - 1
    hook = {(name, layer): f"blocks.{layer}.{sweep.hook}" for name, sweep in SWEEPS.items() for layer in range(n_layers)}
    names = frozenset(hook.values())
    clean_logits, clean_cache = prompt_pass(model, pair.clean_tokens, names, [final])  # the fast engine's pass where it is checked
    clean_value = float(pair.metric.of_logits(clean_logits)[0])
    report(1 / 3, "attribution patching: corrupted run and gradients")
    corrupted_value, corrupted_acts, grads = _corrupted_run(model, pair, names)
    check_swing(clean_value, corrupted_value)
    swing = clean_value - corrupted_value
    report(2 / 3, "attribution patching: scores")
    scores = {}
    with torch.no_grad():
        for name, sweep in SWEEPS.items():
            rows = []
            for layer in range(n_layers):
                at = hook[name, layer]
                product = ((clean_cache[at] - corrupted_acts[at]) * grads[at])[0].double()  # [pos, d] or [pos, head, d_head]
                rows.append(product.sum((0, 2)) if sweep.axis == "head" else product.sum(-1))
            scores[name] = (torch.stack(rows).cpu() / swing).numpy()
    return ApproximatePatchingResult(
        clean_tokens=str_tokens(model, pair.clean_tokens),
        corrupted_tokens=str_tokens(model, pair.corrupted_tokens),
        answer=answer,
        wrong_answer=wrong_answer,
        clean_value=clean_value,
        corrupted_value=corrupted_value,
        **scores,
    )


def _corrupted_run(model: Model, pair: ContrastPair, names: frozenset[str]) -> tuple[float, dict[str, Tensor], dict[str, Tensor]]:
    """The corrupted run's metric, its activations `names`, and the metric's gradient with respect to each
    (one backward pass): on the fast engine where it is checked (its products and their gradients on oneDNN),
    else through the model's hooks. Only the final position, which the metric reads, is unembedded."""
    final, order = pair.corrupted_tokens.shape[-1] - 1, sorted(names)
    engine = prompt_engine(model, names)
    with torch.enable_grad():
        if engine is not None:
            logits, acts = engine.run_with_cache(pair.corrupted_tokens, names, [final], differentiable=True)
        else:
            acts = {}

            def keep(name: str):
                def hook(activation, hook):
                    acts[name] = activation
                    return activation

                return hook

            run = functools.partial(model.run_with_hooks, pair.corrupted_tokens, fwd_hooks=[(name, keep(name)) for name in order])
            logits = keeping_logits(run, 1)
        metric = pair.metric.of_logits(logits)[0]
        grads = dict(zip(order, torch.autograd.grad(metric, [acts[name] for name in order])))
    return float(metric.detach()), {name: value.detach() for name, value in acts.items()}, grads


def agreement(exact: PatchingResult, approximate: ApproximatePatchingResult, top: int = 10) -> dict[str, dict]:
    """agreement_stats per sweep."""
    return {name: agreement_stats(getattr(exact, name), getattr(approximate, name), top) for name in SWEEPS}


TECHNIQUE = Technique(
    name="attribution_patching",
    run=attribution_patching,
    result=ApproximatePatchingResult,
    summary='Attribution patching: an APPROXIMATION of /patching (same keys, plus "approximate": true).',
    figures=tuple(functools.partial(plots.patching_heatmap, sweep=name) for name in SWEEPS),
    **ON_A_PAIR,
)
