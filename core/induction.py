"""Induction, previous-token and duplicate-token head scores (Olsson et al., 2022).

The model reads `batch` sequences of `seq_len` random tokens repeated twice with BOS in
front: positions 0 = BOS, 1..seq_len = first copy, seq_len+1..2*seq_len = second copy.
- induction score: mean attention from each second-copy token to the token *after* its
  first copy (the stripe at offset 1 - seq_len, second half only);
- previous-token score: mean attention from each position to the one before it;
- duplicate-token score: mean attention from each second-copy token to its first copy.
All are averaged over the batch and positions. A head that does induction drives the loss
on the second copy far below the first, which `loss_by_position` shows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from core import plots
from core.config import DEFAULTS, LIMITS
from core.model import Model, check_int
from core.patching.exact import close, verified_engine
from core.patching.fast import Engine
from core.registry import Input, Progress, Technique
from core.results import InductionResult


def repeated_random_tokens(model: Model, seq_len: int, batch: int, seed: int) -> Int[Tensor, "batch pos"]:
    """BOS + seq_len random non-special tokens + the same tokens again; seeded, so reproducible."""
    special = set(model.tokenizer.all_special_ids)
    candidates = torch.tensor([i for i in range(model.cfg.d_vocab) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    half = candidates[torch.randint(0, len(candidates), (batch, seq_len), generator=generator)]
    bos = torch.full((batch, 1), model.tokenizer.bos_token_id)
    return torch.cat([bos, half, half], dim=1).to(model.cfg.device)


def _stripe_sums(pattern: Float[Tensor, "batch head dest src"], seq_len: int) -> Float[Tensor, "3 head"]:
    """Summed (over batch and positions) induction, previous-token and duplicate-token attention."""
    induction = pattern.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1)[..., 2:]  # dest = seq_len+1..2*seq_len
    previous = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # dest = 1..2*seq_len
    duplicate = pattern.diagonal(offset=-seq_len, dim1=-2, dim2=-1)[..., 1:]  # dest = seq_len+1..2*seq_len
    return torch.stack(
        [einops.reduce(stripe, "batch head pos -> head", "sum") for stripe in (induction, previous, duplicate)]
    )


def split_passes(tokens: Int[Tensor, "batch pos"], tokens_per_forward: int = DEFAULTS.tokens_per_forward) -> tuple[Tensor, ...]:
    """The sequences of `tokens`, as many per forward pass as fit in `tokens_per_forward` (at least one)."""
    return tokens.split(max(1, tokens_per_forward // tokens.shape[1]))


def _engine_pass(engine: Engine, rows: Int[Tensor, "batch pos"], seq_len: int, on_layer: Callable[[], None] = lambda: None):
    """(summed stripes [layer, 3, head], next-token losses [batch, pos - 1]) of `rows` on the fast engine."""
    sums = []
    for step in engine.layers(rows):
        sums.append(_stripe_sums(step.pattern, seq_len).double().cpu())
        on_layer()
    return torch.stack(sums), engine.next_token_losses(step.resid_post, rows)


def _bridge_pass(model: Model, rows: Int[Tensor, "batch pos"], seq_len: int, on_layer: Callable[[], None] = lambda: None):
    """The same as _engine_pass, through the model's own forward pass and hook_pattern."""
    sums = torch.zeros(model.cfg.n_layers, 3, model.cfg.n_heads, dtype=torch.float64)

    def accumulate(pattern, hook):
        sums[hook.layer()] += _stripe_sums(pattern, seq_len).double().cpu()
        on_layer()

    logits = model.run_with_hooks(rows, fwd_hooks=[(lambda name: name.endswith("hook_pattern"), accumulate)])
    # float32, fused, on the logits as they are: slicing off the last position first would copy
    # [rows, pos, d_vocab] (206 MB at 1,024 tokens); its next token is ignored instead (-100)
    following = torch.nn.functional.pad(rows[:, 1:], (0, 1), value=-100)
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), following.flatten(), reduction="none")
    return sums, losses.view(len(rows), -1)[:, :-1]


def _agree(ours: tuple[Tensor, Tensor], theirs: tuple[Tensor, Tensor]) -> bool:
    return all(close(a, b) for a, b in zip(ours, theirs))


def max_seq_len(model: Model) -> int:
    """The longest `seq_len` the model's context holds: BOS + two copies."""
    return (model.cfg.n_ctx - 1) // 2


def _ranges(model: Model) -> dict[str, tuple[int, int]]:
    """The allowed range of each whole-number argument."""
    return {"seq_len": (2, max_seq_len(model)), "batch": (1, LIMITS.max_induction_batch), "seed": (0, 2**32 - 1)}


def _check_size(seq_len: int, batch: int) -> None:
    if batch * (2 * seq_len + 1) > LIMITS.max_induction_tokens:
        raise ValueError(
            f"batch x (2 x seq_len + 1) = {batch * (2 * seq_len + 1):,} tokens is more than the limit of "
            f"{LIMITS.max_induction_tokens:,} per request: lower seq_len or batch."
        )


def input_errors(model: Model, seq_len, batch, seed) -> dict[str, str]:
    """What is wrong with each argument of induction_scores, keyed by name: {} when all are fine."""
    errors, values = {}, {}
    for name, value in (("seq_len", seq_len), ("batch", batch), ("seed", seed)):
        try:
            values[name] = check_int(value, name, *_ranges(model)[name])
        except ValueError as err:
            errors[name] = str(err)
    if not errors.keys() & {"seq_len", "batch"}:
        try:
            _check_size(values["seq_len"], values["batch"])
        except ValueError as err:
            errors["batch"] = str(err)
    return errors


def induction_scores(
    model: Model,
    seq_len: int = DEFAULTS.induction_seq_len,
    batch: int = DEFAULTS.induction_batch,
    seed: int = DEFAULTS.induction_seed,
    threshold: float = DEFAULTS.induction_threshold,
    progress: Progress | None = None,
    tokens_per_forward: int = DEFAULTS.tokens_per_forward,
) -> InductionResult:
    """Head scores and per-position loss, `tokens_per_forward` tokens per forward pass; `progress(fraction,
    description)`, if given, hears every layer of every pass (a step boundary where work can stop)."""
    limits = _ranges(model)
    seq_len, batch, seed = (check_int(value, name, *limits[name]) for name, value in (("seq_len", seq_len), ("batch", batch), ("seed", seed)))
    _check_size(seq_len, batch)
    tokens = repeated_random_tokens(model, seq_len, batch, seed)
    passes = split_passes(tokens, tokens_per_forward)
    steps = iter(range(1, len(passes) * model.cfg.n_layers + 1))

    def on_layer() -> None:
        if progress is not None:
            progress(next(steps) / (len(passes) * model.cfg.n_layers), "induction scores")

    with torch.no_grad():
        engine = verified_engine(model, lambda engine: _agree(_engine_pass(engine, tokens[:1], seq_len), _bridge_pass(model, tokens[:1], seq_len)))
        run = functools.partial(_bridge_pass, model) if engine is None else functools.partial(_engine_pass, engine)
        sums = torch.zeros(model.cfg.n_layers, 3, model.cfg.n_heads, dtype=torch.float64)
        loss_sum = torch.zeros(2 * seq_len, dtype=torch.float64)
        for rows in passes:
            stripes, losses = run(rows, seq_len, on_layer)
            sums += stripes
            loss_sum += losses.double().sum(0).cpu()
    counts = torch.tensor([seq_len, 2 * seq_len, seq_len], dtype=torch.float64)[None, :, None] * batch
    means = (sums / counts).numpy()
    return InductionResult(
        seq_len=seq_len,
        batch=batch,
        seed=seed,
        scores=means[:, 0],
        prev_token_scores=means[:, 1],
        duplicate_token_scores=means[:, 2],
        loss_by_position=(loss_sum / batch).numpy(),
        threshold=float(threshold),
    )


TECHNIQUE = Technique(
    name="induction",
    run=induction_scores,
    result=InductionResult,
    summary="Induction, previous-token and duplicate-token scores per head on repeated random tokens.",
    inputs=(
        Input("seq_len", "int", "random tokens per copy", default=DEFAULTS.induction_seq_len),
        Input("batch", "int", "random sequences averaged over", default=DEFAULTS.induction_batch),
        Input("seed", "int", "the random sequences' seed", default=DEFAULTS.induction_seed),
    ),
    lane="heavy",
    example={"seq_len": 10, "batch": 3, "seed": 4},
    figures=(plots.induction_heatmap, plots.induction_layer_max, plots.loss_by_position),
    input_errors=input_errors,
    tab="Circuit Map",
    progress=True,
    fitted_defaults=lambda model: {"seq_len": min(DEFAULTS.induction_seq_len, max_seq_len(model))},  # a short context: its longest
)
