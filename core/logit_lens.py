"""The logit lens (nostalgebraist, 2020): decode the residual stream at every layer.

Checkpoints are the residual stream before each layer and the final residual, labelled as
`ActivationCache.accumulated_resid(incl_mid=False)` labels them. At each checkpoint the
final LayerNorm is applied afresh (that checkpoint's own mean and scale), then the
unembedding and a softmax, so the `final_post` row is exactly the model's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from core import plots
from core.config import DEFAULTS
from core.model import Model, PromptJob, PromptReader, PromptRun, one_pass, single_token_id, str_tokens
from core.patching.exact import checked_engine
from core.products import linear, logsumexp, row_blocks
from core.registry import PROMPT, Input, Technique
from core.results import LogitLensResult
from examples import EIFFEL


def _hooks(model: Model) -> frozenset[str]:  # what accumulated_resid(incl_mid=False) reads
    n_layers = model.cfg.n_layers
    return frozenset({f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)} | {f"blocks.{n_layers - 1}.hook_resid_post"})


def _prepare(model: Model, target: str | None, final_only: bool = False):
    target = target or None
    target_id = single_token_id(model, target, "target") if target is not None else None
    return _hooks(model), (target, target_id, final_only)


def _read(model: Model, run: PromptRun, prepared: tuple[str | None, int | None, bool]) -> LogitLensResult:
    target, target_id, final_only = prepared
    cache = run.cache
    with torch.no_grad():
        resid, labels = cache.accumulated_resid(incl_mid=False, return_labels=True)
        if final_only:
            resid = resid[:, :, -1:]
        normed = cache.apply_ln_to_stack(resid, layer=model.cfg.n_layers, recompute_ln=True)[:, 0]  # [checkpoint, pos, d_model]
        top_logit, top_id, total, target_logit, target_rank = _unembed_summary(model, normed.reshape(-1, normed.shape[-1]), target_id)
    shape = normed.shape[:2]

    def probability(logit: Tensor) -> np.ndarray:  # exp(logit - logsumexp), the subtraction in double
        return torch.exp(logit.double() - total.double()).reshape(shape).cpu().numpy()

    decode = model.tokenizer.decode
    tokens = str_tokens(model, run.tokens)
    return LogitLensResult(
        tokens=tokens[-1:] if final_only else tokens,
        layers=list(labels),
        top_tokens=[[decode([int(i)]) for i in row] for row in top_id.reshape(shape)],
        top_probs=probability(top_logit),
        target=target,
        target_probs=probability(target_logit) if target_id is not None else None,
        target_ranks=target_rank.long().reshape(shape).cpu().numpy() if target_id is not None else None,
    )


def _unembed_summary(model: Model, rows: Float[Tensor, "row d_model"], target_id: int | None):
    """(top logit, its token, logsumexp, the target's logit, its rank: how many logits exceed it) of every
    row's float32 logits, the unembedding taken DEFAULTS.vocab_block tokens at a time so that each
    block's logits are summarised while they are in cache (about 1.5x faster than one [row, vocab] product
    and passes over it), each block's product oneDNN's where it agrees with torch's (core.products). The
    target's block comes first, so its logit is the one every block is compared with."""
    blocks = list(_unembed_blocks(model))
    if target_id is not None:
        first = next(i for i, (start, weight, _) in enumerate(blocks) if start <= target_id < start + weight.shape[0])
        blocks.insert(0, blocks.pop(first))
    top_logit = torch.full((rows.shape[0],), float("-inf"), device=rows.device)
    top_id = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    total = top_logit.clone()
    target_logit, target_rank = None, torch.zeros(rows.shape[0], dtype=torch.int32, device=rows.device)
    for start, weight, bias in blocks:
        logits = linear(rows, weight, bias)
        if target_logit is None and target_id is not None:
            target_logit = logits[:, target_id - start].clone()
        if target_logit is not None:
            target_rank += (logits > target_logit[:, None]).sum(-1, dtype=torch.int32)
        best = logits.max(-1)
        ids = best.indices + start
        better = (best.values > top_logit) | ((best.values == top_logit) & (ids < top_id))  # ties: the lowest token id, as one max would
        top_logit, top_id = torch.where(better, best.values, top_logit), torch.where(better, ids, top_id)
        total = torch.logaddexp(total, logsumexp(logits, best.values))
    return top_logit, top_id, total, target_logit, target_rank


def _unembed_blocks(model: Model) -> Sequence[tuple[int, Float[Tensor, "token d_model"], Float[Tensor, " token"]]]:
    """(first token, weight, bias) of each DEFAULTS.vocab_block tokens of the unembedding: the fast engine's
    prepared blocks (core.products.prepare) where the model has a verified engine whose blocks are views of
    the model's unembedding as it is now (its storage and layout; its bias equal), else the model's own,
    taken now."""
    engine = checked_engine(model)  # never built here: a lens whose pass ran on the model's hooks needs none
    W_U, b_U = model.W_U, model.b_U
    if (
        engine is not None
        and (engine.W_U_T.data_ptr(), engine.W_U_T.shape, engine.W_U_T.stride()) == (W_U.data_ptr(), W_U.T.shape, W_U.T.stride())
        and torch.equal(engine.b_U, b_U)
    ):
        return engine.unembed_blocks
    return row_blocks(W_U.T.contiguous(), b_U, DEFAULTS.vocab_block)  # [vocab, d_model]: a token block is contiguous


READER = PromptReader(_prepare, _read, _hooks)


@one_pass
def logit_lens(model: Model, prompt: str, target: str | None = None) -> PromptJob:
    """Top-1 token and probability at every (checkpoint, position); P and rank of `target`: called, a
    `LogitLensResult` (one_pass runs the job described here)."""
    return PromptJob(prompt, ((READER, (target,)),))


@one_pass
def final_lens(model: Model, prompt: str, *targets: str) -> PromptJob:
    """The logit lens at the final position only (its token, and a pos axis of one: 1/pos of the rows
    unembedded), once for each target, from one pass: a tuple of `LogitLensResult`s (what Contrast Pairs
    draws for each prompt of a pair)."""
    if not targets:
        raise ValueError("final_lens needs at least one target token to follow.")
    return PromptJob(prompt, tuple((READER, (target, True)) for target in targets), every=True)


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
