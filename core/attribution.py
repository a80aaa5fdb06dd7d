"""Direct logit attribution (Elhage et al., 2021): split a final logit into per-component parts.

The final residual stream at the last position is the sum of the token embedding, the
positional embedding, every head's output (`stack_head_results`), every MLP's output and
the attention output biases. Each part, centred and divided by the final LayerNorm's
scale on the actual residual (`apply_ln_to_stack`), dotted with the unembedding direction
of the target (minus the competing token), is that part's share of the logit (difference).
With the unembedding bias counted in `bias`, the parts add up to the model's own value.
"""

from __future__ import annotations

import einops
import torch

from core import plots
from core.contrast import LogitDiff
from core.model import Model, PromptJob, PromptReader, PromptRun, one_pass, single_token_id, str_tokens, to_tokens
from core.registry import PROMPT, Input, Technique
from core.results import DLAResult
from examples import IOI_CLEAN


def _check_different(target: str, target_id: int, competing_id: int | None) -> None:
    if competing_id == target_id:
        raise ValueError(f"The target and the competing token are the same ({target!r}): pick two different tokens.")


def input_errors(model: Model, prompt: str, target: str = "", competing: str = "") -> dict[str, str]:
    """What is wrong with each argument of a prompt + optional target/competing token (the Prompt
    Explorer's inputs), keyed by argument name, without running the model: {} when all are fine."""
    errors: dict[str, str] = {}
    ids: dict[str, int] = {}
    checks = {
        "prompt": lambda: to_tokens(model, prompt),
        "target": lambda: target and single_token_id(model, target, "target"),
        "competing": lambda: competing and single_token_id(model, competing, "competing token"),
    }
    for name, check in checks.items():
        try:
            ids[name] = check()
        except ValueError as err:
            errors[name] = str(err)
    if target and competing and not errors.keys() & {"target", "competing"}:
        try:
            _check_different(target, ids["target"], ids["competing"])
        except ValueError as err:
            errors["competing"] = str(err)
    return errors


@one_pass
def direct_logit_attribution(
    model: Model,
    prompt: str,
    target: str,
    competing: str | None = None,
    scale_by_ln: bool = True,
) -> PromptJob:
    """Attribution of logit(target) - logit(competing) (or logit(target) alone) at the final position:
    called, a `DLAResult` (one_pass runs the job described here).

    `scale_by_ln=False` gives the raw projections with no LayerNorm scale (as the seed
    notebook reported them); those do not add up to the logit.
    """
    return PromptJob(prompt, ((READER, (target, competing, scale_by_ln)),))


def _prepare(model: Model, target: str, competing: str | None = None, scale_by_ln: bool = True):
    target_id = single_token_id(model, target, "target")
    competing = competing or None
    competing_id = single_token_id(model, competing, "competing token") if competing is not None else None
    _check_different(target, target_id, competing_id)
    return _hooks(model), (target, competing, LogitDiff(target_id, competing_id), scale_by_ln)


def _hooks(model: Model):
    n_layers = model.cfg.n_layers
    needed = {"hook_embed", "hook_pos_embed", f"blocks.{n_layers - 1}.hook_resid_post", "ln_final.hook_scale"}
    needed |= {f"blocks.{layer}.{hook}" for layer in range(n_layers) for hook in ("attn.hook_z", "hook_mlp_out")}
    return frozenset(needed)


def _read(model: Model, run: PromptRun, prepared: tuple[str, str | None, LogitDiff, bool]) -> DLAResult:
    target, competing, metric, scale_by_ln = prepared
    cache, n_layers = run.cache, model.cfg.n_layers
    with torch.no_grad():
        direction, unembed_bias = metric.direction(model.W_U, model.b_U)
        value = metric.of_logits(run.logits)[0]
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)  # [layer*head, batch, d_model]
        mlps = torch.stack([cache["mlp_out", layer][:, -1] for layer in range(n_layers)])
        embed = cache["hook_embed"][:, -1]
        pos_embed = cache["hook_pos_embed"][:, -1]
        final_resid = cache["resid_post", n_layers - 1][:, -1]
        rest = final_resid - heads.sum(0) - mlps.sum(0) - embed - pos_embed  # attention output biases
        stack = torch.cat([heads, mlps, embed[None], pos_embed[None], rest[None]])
        if scale_by_ln:
            stack = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
        parts = (stack[:, 0] @ direction).double().cpu()
    n_heads = n_layers * model.cfg.n_heads
    return DLAResult(
        tokens=str_tokens(model, run.tokens),
        target=target,
        competing=competing,
        value=float(value),
        heads=einops.rearrange(parts[:n_heads], "(layer head) -> layer head", layer=n_layers).numpy(),
        mlps=parts[n_heads : n_heads + n_layers].numpy(),
        embed=float(parts[-3]),
        pos_embed=float(parts[-2]),
        bias=float(parts[-1]) + float(unembed_bias),
        ln_scaled=scale_by_ln,
    )


READER = PromptReader(_prepare, _read, _hooks)


TECHNIQUE = Technique(
    name="dla",
    run=direct_logit_attribution,
    result=DLAResult,
    summary="Direct logit attribution of logit(target) [- logit(competing)] at the final position.",
    inputs=(
        PROMPT,
        Input("target", "token", "the token whose logit is split into parts"),
        Input("competing", "token", "a token whose logit is subtracted (optional)", default=""),
    ),
    lane="light",
    example={"prompt": IOI_CLEAN, "target": " Mary", "competing": " John"},
    figures=(plots.dla_heads, plots.dla_components),
    input_errors=input_errors,
    tab="Prompt Explorer",
    reads_prompt=READER,
)
