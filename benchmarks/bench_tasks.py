"""Task-level patching: ours (the fast engine, the pairs batched) against TransformerLens's
`patching` module run pair by pair, side by side, one run.

    python -m benchmarks.bench_tasks [--threads 2] [--repeats 3] [--pairs 64] [--tl-pairs 2]

GPT-2 Small-shaped model (random weights, GPT-2's real tokenizer), built-in tasks of `--pairs` pairs
(seed 0): `induction` (one token length: all four sweeps) and `ioi` (eight templates, several
lengths: head_out only, as the result says). TransformerLens runs the same sweeps on the first
`--tl-pairs` pairs (it takes about half a minute per pair per sweep here); its time for the whole
task is that, scaled by pairs (linear: one forward pass per patch per pair). Also ours pair after
pair (`activation_patching` on each), to show what batching the pairs buys.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformer_lens import patching as tl_patching  # noqa: E402

from benchmarks.bench_patching import matmul_gflops  # noqa: E402
from benchmarks.common import arguments, peak_memory, rss_bytes  # noqa: E402
from core import SWEEPS, activation_patching, load_model, save_random_gpt2  # noqa: E402
from core.patching.cost import pairs_flops  # noqa: E402
from core.patching.task import raw_task_sweeps, task_patching  # noqa: E402
from core.tasks import built_in_task  # noqa: E402


def transformer_lens_seconds(model, task, sweeps, k: int) -> tuple[float, float]:
    """TransformerLens's time for the first k pairs (the same sweeps), and the largest difference of
    its per-pair effects from ours."""
    _, _, _, corrupted, raw = raw_task_sweeps(model, type(task)(task.name, task.description, task.pairs[:k]))
    worst, start = 0.0, time.perf_counter()
    for i, pair in enumerate(task.contrast_pairs(model)[:k]):
        answer, wrong = pair.metric.answer_id, pair.metric.wrong_id
        with torch.no_grad():
            _, cache = model.run_with_cache(pair.clean_tokens)
            base = model(pair.corrupted_tokens)[0, -1]
            for name in sweeps:
                delta = lambda logits: (logits[0, -1, answer] - logits[0, -1, wrong]) - (base[answer] - base[wrong])  # noqa: E731
                ref = getattr(tl_patching, SWEEPS[name].reference)(model, pair.corrupted_tokens, cache, delta).double().numpy()
                worst = max(worst, float(np.abs(raw[name][i] - corrupted[i] - ref).max()))
    return time.perf_counter() - start, worst


def main() -> None:
    args = arguments(pairs=64, tl_pairs=2)
    with tempfile.TemporaryDirectory() as directory:
        model = load_model(save_random_gpt2(directory))
        base = rss_bytes()
        print(f"GPT-2 Small-shaped model (random weights), {args.threads} threads, torch {torch.__version__}; {args.pairs} pairs, seed 0\n")
        cfg = model.cfg
        gflops = matmul_gflops(cfg.d_model, cfg.d_mlp)
        print(f"float32 matrix products at {gflops:.0f} GFLOP/s (measured); floor = the FLOPs exact answers need / that\n")
        print(
            "| task | sweeps | ours, batched | floor | ours, pair after pair | TransformerLens `patching` (scaled) | speed-up "
            "| max abs difference | peak memory |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name in ("induction", "ioi"):
            task = built_in_task(model, name, args.pairs, seed=0)
            task_patching(model, task)  # warm-up (the engine is built once per model)
            runs = [peak_memory(lambda: task_patching(model, task), base) for _ in range(args.repeats)]
            result = runs[0][0]
            ours = statistics.median(seconds for _, seconds, _ in runs)
            sweeps = [sweep for sweep in SWEEPS if getattr(result, sweep) is not None]
            floor = pairs_flops(model, task.contrast_pairs(model), sweeps) / gflops / 1e9
            start = time.perf_counter()
            for pair in task.pairs:
                activation_patching(model, pair.clean, pair.corrupted, pair.answer, pair.wrong)
            serial = time.perf_counter() - start
            tl_part, worst = transformer_lens_seconds(model, task, sweeps, args.tl_pairs)
            tl = tl_part * args.pairs / args.tl_pairs
            print(
                f"| {name} ({', '.join(map(str, result.lengths))} tokens) | {', '.join(sweeps)} | {ours:.2f} s | {floor:.1f} s ({ours / floor:.1f}x) "
                f"| {serial:.2f} s (all four sweeps) "
                f"| {tl:.0f} s ({tl_part:.0f} s for {args.tl_pairs}) | {tl / ours:.0f}x | {worst:.1e} | {max(p for _, _, p in runs) / 2**20:.0f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
