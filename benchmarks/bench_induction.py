"""The Circuit Map's induction scores against their floor, one run.

    python -m benchmarks.bench_induction [--threads 2] [--repeats 5] [--seq-len 50] [--batch 10]

GPT-2 Small-shaped model (random weights). The floor: the matrix products of one forward pass over
batch x (2 seq_len + 1) tokens plus the unembedding the loss needs (every position but the last), at
this machine's measured matrix-multiply rate (as bench_patching).
"""

from __future__ import annotations

import os
import statistics
import tempfile

import torch

os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.bench_patching import matmul_gflops  # noqa: E402
from benchmarks.common import arguments, peak_memory, rss_bytes  # noqa: E402
from core import induction_scores, load_model, save_random_gpt2  # noqa: E402
from core.induction import _bridge_pass, repeated_random_tokens, split_passes  # noqa: E402


def forward_flops(n_layers: int, d: int, d_mlp: int, n_pos: int, rows: int, d_vocab: int) -> float:
    """Multiply-adds x 2 of a forward pass over `rows` sequences of `n_pos` tokens, and the unembedding of
    every position but the last (the next-token loss)."""
    attention = sum(2 * 2 * (p + 1) * d for p in range(n_pos))  # scores and the weighted sum, every head together
    per_layer = n_pos * (2 * d * 3 * d + 2 * d * d + 2 * 2 * d * d_mlp) + attention
    return rows * (n_layers * per_layer + (n_pos - 1) * 2 * d * d_vocab)


@torch.no_grad()
def bridge(model, tokens, seq_len: int) -> list:
    return [_bridge_pass(model, rows, seq_len) for rows in split_passes(tokens)]


def main() -> None:
    args = arguments(repeats=5, seq_len=50, batch=10)
    with tempfile.TemporaryDirectory() as directory:
        model = load_model(save_random_gpt2(directory))
        cfg = model.cfg
        base = rss_bytes()

        tokens = repeated_random_tokens(model, args.seq_len, args.batch, 0)
        calls = {  # the bridge's first, before the fast engine exists: its memory as where the engine is not used
            "bridge": lambda: bridge(model, tokens, args.seq_len),  # the same stripes and losses through its forward pass and hook_pattern
            "ours": lambda: induction_scores(model, args.seq_len, args.batch, 0),  # builds the engine (weights included in its peak)
        }
        timed = {}
        for name, call in calls.items():
            call()  # warm-up
            runs = [peak_memory(call, base) for _ in range(args.repeats)]
            timed[name] = statistics.median(s for _, s, _ in runs), max(m for _, _, m in runs)
        gflops = matmul_gflops(cfg.d_model, cfg.d_mlp)
        flops = forward_flops(cfg.n_layers, cfg.d_model, cfg.d_mlp, 2 * args.seq_len + 1, args.batch, cfg.d_vocab)
        floor_s = flops / (gflops * 1e9)
    print(f"GPT-2 Small-shaped model (random weights), {args.threads} threads; seq_len {args.seq_len}, batch {args.batch}; median of {args.repeats}\n")
    print("| induction scores | median seconds | x the floor | peak memory (MiB) |")
    print("|---|---:|---:|---:|")
    labels = {
        "ours": "`induction_scores` (the fast engine's forward pass, the loss's unembedding in token blocks; memory: the engine included)",
        "bridge": "the same through the TransformerBridge's forward pass and hook_pattern (its fallback)",
    }
    for name in ("ours", "bridge"):
        seconds, peak = timed[name]
        print(f"| {labels[name]} | {seconds:.3f} | {seconds / floor_s:.2f} | {peak / 2**20:.0f} |")
    print(f"| floor: {flops / 1e9:.0f} GFLOP at {gflops:.0f} GFLOP/s measured matmul | {floor_s:.3f} | 1.00 | |")


if __name__ == "__main__":
    main()
