"""What exact patching costs: the floating-point operations of the matrix products exact answers need.
The benchmarks divide it by the machine's measured matrix-multiply rate (the floor they compare our
time with); the server holds a request's patching to LIMITS.max_patching_tflop with it, so a task's
limit is its real work (64 IOI pairs fit; 64 ten-token induction pairs, every position patched, do not).
"""

from __future__ import annotations

from collections.abc import Sequence

from core.config import LIMITS
from core.contrast import SWEEPS, ContrastPair
from core.model import Model


def minimum_flops(
    n_layers: int, d: int, d_mlp: int, n_heads: int, n_pos: int, start: int, sweeps=tuple(SWEEPS), head_from: int = 0, head_copies: int = 1
) -> float:
    """Multiply-adds x 2 of every matrix product exact answers need: two unpatched runs, then for
    each patch of `sweeps` only what it can change (from its layer on, positions >= its position, the last
    layer only at the final position, two logits). Elementwise work (LayerNorm, GELU) is not counted.
    Head patches from layer `head_from` on, `head_copies` per head (path patching: q, k and v: 3)."""

    def layer(rows: int, first_row: int, queries_at_end_only: bool, attention: bool = True, mlp_rows: int | None = None) -> float:
        q_rows = 1 if queries_at_end_only else rows
        q_positions = [n_pos - 1] if queries_at_end_only else range(first_row, n_pos)
        flops = 0.0
        if attention:
            flops += 2 * rows * d * 2 * d  # keys and values
            flops += 2 * q_rows * d * d * 2  # queries and the output projection
            flops += sum(2 * 2 * (p + 1) * d for p in q_positions)  # scores and the weighted sum of values
        mlp = q_rows if mlp_rows is None else mlp_rows
        return flops + 2 * mlp * d * d_mlp * 2

    def run_from(first_layer: int, first_row: int, mid: bool, mlp_rows_at_first: int | None = None) -> float:
        rows = n_pos - first_row
        total = 0.0
        for j in range(first_layer, n_layers):
            last = j == n_layers - 1
            at_first = j == first_layer and mid
            mlp_rows = mlp_rows_at_first if at_first else None
            total += layer(rows, first_row, last, attention=not at_first, mlp_rows=None if last else mlp_rows)
        return total + 2 * d * 2

    total = 2 * (sum(layer(n_pos, 0, False) for _ in range(n_layers)) + 2 * d * 2)
    for l in range(n_layers):
        for p in range(start, n_pos):
            total += run_from(l, p, mid=False) if "resid_pre" in sweeps else 0.0
            total += run_from(l, p, mid=True, mlp_rows_at_first=1) if "attn_out" in sweeps else 0.0  # the MLP at l only where it changed
            total += run_from(l + 1, p, mid=False) if "mlp_out" in sweeps else 0.0
        if "head_out" in sweeps and l >= head_from:
            total += head_copies * n_heads * (run_from(l, start, mid=True, mlp_rows_at_first=n_pos - start) + 2 * (n_pos - start) * (d // n_heads) * d)
    return total


def pairs_flops(model: Model, pairs: Sequence[ContrastPair], sweeps=tuple(SWEEPS), head_from: int = 0, head_copies: int = 1) -> float:
    """minimum_flops summed over pairs (each from its own first difference)."""
    cfg = model.cfg
    return sum(
        minimum_flops(cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, pair.clean_tokens.shape[-1], pair.first_difference, sweeps, head_from, head_copies)
        for pair in pairs
    )


def check_budget(flops: float, n_pairs: int, what: str) -> None:
    """Refuse a request whose exact patching needs more than LIMITS.max_patching_tflop, saying how many
    such pairs would fit."""
    budget = LIMITS.max_patching_tflop * 1e12
    if flops > budget:
        fit = max(1, int(budget // (flops / n_pairs)))
        raise ValueError(
            f"{what} needs {flops / 1e12:.1f} TFLOP of exact patching; one request may need at most {LIMITS.max_patching_tflop:g} "
            f"(about a minute on a 2-core CPU): use at most {fit} of these pairs."
        )
