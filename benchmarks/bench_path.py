"""Path patching: ours (core.patching.path, the fast engine) against TransformerLens 4.3's
`patching.get_act_patch_direct_path` for the same senders and receivers, side by side, one run.

    python -m benchmarks.bench_path [--threads 2] [--repeats 3] [--pairs 64] [--tl-pairs 1]

GPT-2 Small-shaped model (random weights, GPT-2's real tokenizer). One pair (the app's IOI prompts,
17 tokens, with the answer tokens they move most, as bench_patching), one sender head at layer 0, 5 and 9: every later head's q, k and v as a receiver (396, 216
and 72 receivers). Ours includes tracing both prompts; TransformerLens's includes caching both runs
(its inputs) and one forward pass per receiver and component. Then a task: path patching from the
name movers (9.9, 9.6, 10.0) over `--pairs` IOI pairs, against TransformerLens on the first
`--tl-pairs` pairs, scaled by pairs.
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

from benchmarks.common import arguments, peak_memory, rss_bytes  # noqa: E402
from core import ContrastPair, load_model, save_random_gpt2, to_tokens  # noqa: E402
from core.patching.path import COMPONENTS, parse_senders, path_patching_on, raw_path_values  # noqa: E402
from core.tasks import built_in_task  # noqa: E402
from examples import IOI_CLEAN, IOI_CORRUPTED  # noqa: E402


def transformer_lens(model, pairs: list[ContrastPair], senders) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds, and raw metrics [pair, layer, head] per component, from get_act_patch_direct_path (one
    sender head at a time: several senders cannot be sent together there)."""
    (layer, head), = senders
    out = {c: [] for c in COMPONENTS}
    start = time.perf_counter()
    for pair in pairs:
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(pair.clean_tokens)
            _, corrupted_cache = model.run_with_cache(pair.corrupted_tokens)
            for c in COMPONENTS:
                scores = tl_patching.get_act_patch_direct_path(
                    model, pair.corrupted_tokens, clean_cache, corrupted_cache, lambda x: pair.metric.of_logits(x)[0], layer, head, c, verbose=False
                )
                out[c].append(scores.double().numpy())
    return time.perf_counter() - start, {c: np.stack(v) for c, v in out.items()}


def main() -> None:
    args = arguments(pairs=64, tl_pairs=1)
    with tempfile.TemporaryDirectory() as directory:
        model = load_model(save_random_gpt2(directory))
        base = rss_bytes()
        with torch.no_grad():  # as bench_patching: on random weights " Mary" - " John" barely moves (+0.0073), so the
            # answers are the tokens the prompts move most, which keeps normalising from amplifying float32 rounding
            shift = model(to_tokens(model, IOI_CLEAN))[0, -1] - model(to_tokens(model, IOI_CORRUPTED))[0, -1]
        answer, wrong = model.tokenizer.decode([int(shift.argmax())]), model.tokenizer.decode([int(shift.argmin())])
        pair = ContrastPair.of(model, IOI_CLEAN, IOI_CORRUPTED, answer, wrong)
        print(f"GPT-2 Small-shaped model (random weights), {args.threads} threads, torch {torch.__version__}; answers {answer!r} vs {wrong!r}\n")
        print(
            "| senders | pairs | receivers (q, k, v) | ours | TransformerLens `get_act_patch_direct_path` | speed-up "
            "| max abs difference (normalised) | peak memory |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        path_patching_on(model, pair, "0.0")  # warm-up (the engine is built and checked once per model)
        for sender in ("0.0", "5.0", "9.0"):
            senders = parse_senders(sender, model.cfg.n_layers, model.cfg.n_heads)
            runs = [peak_memory(lambda: raw_path_values(model, [pair], senders), base) for _ in range(args.repeats)]
            ours = statistics.median(seconds for _, seconds, _ in runs)
            clean, corrupted, raw = runs[0][0]
            theirs, reference = transformer_lens(model, [pair], senders)
            receivers = slice(senders[0].layer + 1, None)
            worst = max(np.abs(raw[c][0, receivers] - reference[c][0, receivers]).max() for c in COMPONENTS) / abs(clean[0] - corrupted[0])
            n = 3 * model.cfg.n_heads * (model.cfg.n_layers - senders[0].layer - 1)
            print(
                f"| L{senders[0].layer}H{senders[0].head} | 1 | {n} | {ours:.2f} s | {theirs:.1f} s | {theirs / ours:.0f}x | {worst:.1e} "
                f"| {max(p for _, _, p in runs) / 2**20:.0f} MiB |",
                flush=True,
            )
        task = built_in_task(model, "ioi", args.pairs, seed=0)
        pairs = task.contrast_pairs(model)
        runs = [peak_memory(lambda: path_patching_on(model, task, "9.9 9.6 10.0"), base) for _ in range(args.repeats)]
        ours = statistics.median(seconds for _, seconds, _ in runs)
        tl_seconds = 0.0
        for sender in ("9.9", "9.6", "10.0"):  # TransformerLens takes one sender head at a time
            tl_seconds += transformer_lens(model, pairs[: args.tl_pairs], parse_senders(sender, 12, 12))[0]
        tl = tl_seconds * args.pairs / args.tl_pairs
        print(
            f"| 9.9, 9.6, 10.0 (ioi task) | {args.pairs} | 72 | {ours:.2f} s | {tl:.0f} s (scaled from {args.tl_pairs}; one sender at a time) "
            f"| {tl / ours:.0f}x | - | {max(p for _, _, p in runs) / 2**20:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
