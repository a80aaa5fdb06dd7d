"""The logit lens (nostalgebraist, 2020): decode the residual stream at every layer.

Checkpoints are the residual stream before each layer and the final residual, labelled as
`ActivationCache.accumulated_resid(incl_mid=False)` labels them. At each checkpoint the
final LayerNorm is applied afresh (that checkpoint's own mean and scale), then the
unembedding and a softmax, so the `final_post` row is exactly the model's output.
"""

from __future__ import annotations

import torch

from core import plots
from core.model import Model, PromptReader, PromptRun, read_prompt, single_token_id, str_tokens
from core.registry import PROMPT, Input, Technique
from core.results import LogitLensResult
from examples import EIFFEL

_RESID_HOOKS = ("hook_resid_pre", "hook_resid_post")


def _prepare(model: Model, target: str | None):
    target = target or None
    target_id = single_token_id(model, target, "target") if target is not None else None
    return (lambda name: name.endswith(_RESID_HOOKS)), (target, target_id)


def _read(model: Model, run: PromptRun, prepared: tuple[str | None, int | None]) -> LogitLensResult:
    target, target_id = prepared
    cache = run.cache
    with torch.no_grad():
        resid, labels = cache.accumulated_resid(incl_mid=False, return_labels=True)
        normed = cache.apply_ln_to_stack(resid, layer=model.cfg.n_layers, recompute_ln=True)
        top_probs, top_ids, target_probs, target_ranks = [], [], [], []
        for checkpoint in normed[:, 0]:  # [pos, d_model] at a time keeps memory at one [pos, vocab]
            logits = model.unembed(checkpoint[None])[0].double()
            probs = torch.softmax(logits, dim=-1)
            best = probs.max(dim=-1)
            top_probs.append(best.values)
            top_ids.append(best.indices)
            if target_id is not None:
                target_logit = logits[:, target_id : target_id + 1]
                target_probs.append(probs[:, target_id])
                target_ranks.append((logits > target_logit).sum(dim=-1))
    decode = model.tokenizer.decode
    return LogitLensResult(
        tokens=str_tokens(model, run.tokens),
        layers=list(labels),
        top_tokens=[[decode([int(i)]) for i in row] for row in top_ids],
        top_probs=torch.stack(top_probs).cpu().numpy(),
        target=target,
        target_probs=torch.stack(target_probs).cpu().numpy() if target_id is not None else None,
        target_ranks=torch.stack(target_ranks).cpu().numpy() if target_id is not None else None,
    )


READER = PromptReader(_prepare, _read)


def logit_lens(model: Model, prompt: str, target: str | None = None) -> LogitLensResult:
    """Top-1 token and probability at every (checkpoint, position); P and rank of `target`."""
    (result,) = read_prompt(model, prompt, (READER, (target,)))
    return result


TECHNIQUE = Technique(
    name="logit_lens",
    run=logit_lens,
    result=LogitLensResult,
    summary="Logit lens: top-1 token/probability per (checkpoint, position); P and rank of target if given.",
    inputs=(PROMPT, Input("target", "token", "a token to follow through the layers (optional)", default="")),
    lane="light",
    example={"prompt": EIFFEL, "target": " Paris"},
    figures=(plots.logit_lens_heatmap, plots.logit_lens_final),
    tab="Prompt Explorer",
    reads_prompt=READER,
)
