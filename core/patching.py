"""Activation patching on a clean / corrupted prompt pair (Meng et al., 2022; Wang et al., 2022).

Metric: logit(answer) - logit(wrong) at the final position. Clean activations are patched
into the corrupted run one component at a time and the metric is normalised,
(patched - corrupted) / (clean - corrupted): 0 = no effect, 1 = clean behaviour restored.
The sweeps have exactly the semantics of `transformer_lens.patching`:
`resid_pre`, `attn_out`, `mlp_out` by [layer, pos] (get_act_patch_resid_pre etc.) and
`head_out` by [layer, head], a head's output at all positions (get_act_patch_attn_head_out_all_pos).
Here one engine evaluates many patches in one batched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.attribution import direct_logit_attribution
from core.config import DEFAULTS
from core.model import Model, run_cached, single_token_id, str_tokens, to_tokens
from core.results import PatchingResult

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


def _logit_diff(logits: Float[Tensor, "batch pos vocab"], answer_id: int, wrong_id: int) -> Float[Tensor, "batch"]:
    return (logits[:, -1, answer_id] - logits[:, -1, wrong_id]).double()


def _patch_hook(indices: Int[Tensor, "batch"], clean: Tensor, axis: str):
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


def _check_pair(model: Model, clean_prompt: str, corrupted_prompt: str):
    clean_tokens = to_tokens(model, clean_prompt)
    corrupted_tokens = to_tokens(model, corrupted_prompt)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            "The clean and corrupted prompts must have the same number of tokens so positions line up: "
            f"clean has {clean_tokens.shape[-1]} {str_tokens(model, clean_tokens)}, "
            f"corrupted has {corrupted_tokens.shape[-1]} {str_tokens(model, corrupted_tokens)}."
        )
    return clean_tokens, corrupted_tokens


def activation_patching(
    model: Model,
    clean_prompt: str,
    corrupted_prompt: str,
    answer: str,
    wrong_answer: str,
    progress: Progress | None = None,
) -> PatchingResult:
    """All four sweeps, normalised, plus head DLA of the same logit difference on the clean prompt."""
    clean_tokens, corrupted_tokens = _check_pair(model, clean_prompt, corrupted_prompt)
    answer_id = single_token_id(model, answer, "answer")
    wrong_id = single_token_id(model, wrong_answer, "wrong answer")
    if answer_id == wrong_id:
        raise ValueError(f"The answer and the wrong answer are the same token ({answer!r}): pick two different tokens.")
    hooks = tuple(sweep.hook for sweep in SWEEPS.values())
    with torch.no_grad():
        clean_logits, clean_cache = run_cached(model, clean_tokens, lambda name: name.endswith(hooks))
        clean_value = float(_logit_diff(clean_logits, answer_id, wrong_id)[0])
        corrupted_value = float(_logit_diff(model(corrupted_tokens), answer_id, wrong_id)[0])
        if abs(clean_value - corrupted_value) < DEFAULTS.same_metric_tolerance:
            raise ValueError(
                f"The clean and corrupted prompts give the same logit difference ({clean_value:.4f}), "
                "so there is nothing for patching to restore: make the prompts differ in a way that "
                "changes the answer."
            )
        scores = {}
        for step, (name, sweep) in enumerate(SWEEPS.items()):
            if progress is not None:
                progress(step / len(SWEEPS), f"patching {name}")
            raw = patch_sweep(model, corrupted_tokens, clean_cache, answer_id, wrong_id, sweep)
            scores[name] = ((raw - corrupted_value) / (clean_value - corrupted_value)).numpy()
    dla = direct_logit_attribution(model, clean_prompt, answer, wrong_answer)
    return PatchingResult(
        clean_tokens=str_tokens(model, clean_tokens),
        corrupted_tokens=str_tokens(model, corrupted_tokens),
        answer=answer,
        wrong_answer=wrong_answer,
        clean_value=clean_value,
        corrupted_value=corrupted_value,
        head_dla=dla.heads,
        **scores,
    )
