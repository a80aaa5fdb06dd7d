"""Exact activation patching: ours against `transformer_lens.patching`, side by side, one run.

    python -m benchmarks.bench_patching [--threads 2] [--repeats 3]

GPT-2 Small-shaped model (random weights, GPT-2's real tokenizer), the seed's IOI pair, the
four sweeps (resid_pre, attn_out, mlp_out by layer x position; head_out by layer x head).
Prints the times, the ratio, the largest difference of the normalised scores, peak memory (the
process's resident memory above what it was with the model loaded, sampled while ours runs),
and how close we are to the floor: the floating-point operations that exact answers need
(counted below) divided by this machine's measured matrix-multiply throughput. Then attribution
patching (the gradient approximation): ours against TransformerLens 4.3's `attribution_patch` (node
granularity: each head's output and each MLP's, at every position) on the same pair and model, and
how far their shared scores (head_out summed over positions, mlp_out) are apart once normalised.

Answer tokens: on random weights " Mary" - " John" barely moves between the two prompts, so
normalising by it would divide float32 rounding by a tiny number. Like the tests, the bench
uses the token pair whose logit difference the prompts move most (printed).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformer_lens import patching as tl_patching  # noqa: E402

from benchmarks.common import arguments, median_seconds, peak_memory, rss_bytes, torch_products  # noqa: E402
from core import LIMITS, SWEEPS, activation_patching, attribution_patching, load_model, products, save_random_gpt2  # noqa: E402
from core.model import to_tokens  # noqa: E402
from core.patching.cost import minimum_flops  # noqa: E402
from examples import IOI_CLEAN, IOI_CORRUPTED  # noqa: E402

TL_SWEEPS = {name: getattr(tl_patching, sweep.reference) for name, sweep in SWEEPS.items()}  # the same semantics


def matmul_gflops(d_model: int, d_mlp: int, rows: int = 2048, repeats: int = 7) -> float:
    """Measured float32 matrix-multiply throughput at the engine's typical shape: the fastest of torch's own
    product, core.products.linear (oneDNN's where it agrees with torch's: twice MKL's on AMD processors) and
    linear on a prepared weight (core.products.prepare, as the engine's are), so that a floor is the
    machine's, not one library's."""
    a, b = torch.randn(rows, d_model), torch.randn(d_model, d_mlp)
    prepared = products.prepare(b.T.contiguous())
    rates = []
    for product in (lambda: torch.mm(a, b), lambda: products.linear(a, b.T), lambda: products.linear(a, prepared)):
        product()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        rates.append(2 * rows * d_model * d_mlp / statistics.median(times) / 1e9)
    return max(rates)


def tl_attribution(model, clean_tokens, corrupted_tokens, answer_id: int, wrong_id: int, swing: float) -> dict[str, np.ndarray]:
    """TransformerLens's `attribution_patch` at node granularity, as our head_out [layer, head] (its per-position
    head scores summed) and mlp_out [layer, pos], normalised by `swing` (the clean - corrupted metric)."""
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    cfg = model.cfg
    nodes = attribution_patch(model, clean_tokens, corrupted_tokens, lambda logits: logits[0, -1, answer_id] - logits[0, -1, wrong_id]).node_scores
    scores = {"head_out": np.zeros((cfg.n_layers, cfg.n_heads)), "mlp_out": np.zeros((cfg.n_layers, clean_tokens.shape[-1]))}
    for node, score in nodes.items():
        if node.kind == "attn_head_out":
            scores["head_out"][node.layer, node.head] += score
        elif node.kind == "mlp_out":
            scores["mlp_out"][node.layer, node.position] = score
    return {name: value / swing for name, value in scores.items()}


def main() -> None:
    args = arguments()
    with tempfile.TemporaryDirectory() as directory:
        model = load_model(save_random_gpt2(directory))
        clean_tokens, corrupted_tokens = to_tokens(model, IOI_CLEAN), to_tokens(model, IOI_CORRUPTED)
        with torch.no_grad():
            shift = model(clean_tokens)[0, -1] - model(corrupted_tokens)[0, -1]
        answer, wrong = model.tokenizer.decode([int(shift.argmax())]), model.tokenizer.decode([int(shift.argmin())])
        mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
        run = lambda: activation_patching(model, IOI_CLEAN, IOI_CORRUPTED, answer, wrong)  # noqa: E731
        base = rss_bytes()  # with the model loaded, before any patching
        run()  # warm-up (builds the engine once per model)
        times, peaks = [], []
        for _ in range(args.repeats):
            ours, seconds, peak = peak_memory(run, base)
            times.append(seconds)
            peaks.append(peak)
        ours_s = statistics.median(times)
        answer_id, wrong_id = model.to_single_token(answer), model.to_single_token(wrong)

        def normalised(logits):
            value = logits[0, -1, answer_id] - logits[0, -1, wrong_id]
            return (value - ours.corrupted_value) / (ours.clean_value - ours.corrupted_value)

        tl_times, differences = {}, {}
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(clean_tokens)

            def tl_all(times: dict):
                for name, sweep in TL_SWEEPS.items():
                    start = time.perf_counter()
                    reference = sweep(model, corrupted_tokens, clean_cache, normalised).double().numpy()
                    times[name] = time.perf_counter() - start
                    differences[name] = max(differences.get(name, 0.0), float(np.abs(getattr(ours, name) - reference).max()))

            start = time.perf_counter()
            tl_all(tl_times)
            tl_s = time.perf_counter() - start
            start = time.perf_counter()
            torch_products(lambda: tl_all({}))  # TransformerLens as it ships: torch's own products
            shipped_s = time.perf_counter() - start
        cfg = model.cfg
        n_pos = clean_tokens.shape[-1]
        start = int((clean_tokens[0] != corrupted_tokens[0]).nonzero()[0])
        flops = minimum_flops(cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, n_pos, start)
        gflops = matmul_gflops(cfg.d_model, cfg.d_mlp)
        floor_s = flops / (gflops * 1e9)
        print(f"GPT-2 Small-shaped model (random weights), {args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
        print(f"pair: the seed's IOI prompts, {n_pos} tokens, first difference at position {start}; answers {answer!r} vs {wrong!r}")
        moved, names_moved = ours.clean_value - ours.corrupted_value, float(shift[mary] - shift[john])
        print(f"(clean - corrupted logit difference {moved:+.4f}; for ' Mary' - ' John' it is {names_moved:+.4f})\n")
        print("| what | TransformerLens `patching` | CircuitBreaker (exact) |")
        print("|---|---:|---:|")
        for name in SWEEPS:
            print(f"| {name} | {tl_times[name]:.1f} s | |")
        print(f"| **all four sweeps** | **{tl_s:.1f} s** | **{ours_s:.3f} s** (median of {args.repeats}) |")
        print(f"| speed-up | | **{tl_s / ours_s:.0f}x** |")
        print(f"| all four sweeps, TransformerLens on torch's own products (as it ships) | {shipped_s:.1f} s | |")
        print(f"| speed-up over TransformerLens as it ships | | {shipped_s / ours_s:.0f}x |")
        print(f"| max abs difference of normalised scores | | {max(differences.values()):.1e} ({', '.join(f'{k} {v:.1e}' for k, v in differences.items())}) |")
        print(f"| peak resident memory above the loaded model (engine included) | | {max(peaks) / 2**20:.0f} MiB |")
        print(f"| floor: {flops / 1e9:.1f} GFLOP at {gflops:.0f} GFLOP/s measured matmul | | {floor_s:.3f} s (ours = {ours_s / floor_s:.1f}x the floor) |")
        approximate, ours_attribution_s = median_seconds(lambda: attribution_patching(model, IOI_CLEAN, IOI_CORRUPTED, answer, wrong), args.repeats)
        swing = float(shift[answer_id] - shift[wrong_id])  # the bridge's own logits, not ours
        reference = lambda: tl_attribution(model, clean_tokens, corrupted_tokens, answer_id, wrong_id, swing)  # noqa: E731
        tl_scores, tl_attribution_s = median_seconds(reference, args.repeats)
        _, shipped_attribution_s = torch_products(lambda: median_seconds(reference, args.repeats))
        apart = {name: float(np.abs(getattr(approximate, name) - tl_scores[name]).max()) for name in tl_scores}
        print("\nAttribution patching (the gradient approximation), the same pair and model:\n")
        print("| what | TransformerLens `attribution_patch` (node granularity) | CircuitBreaker (attribution, 4 sweeps) |")
        print("|---|---:|---:|")
        print(f"| median of {args.repeats} | {tl_attribution_s:.3f} s | {ours_attribution_s:.3f} s |")
        print(f"| speed-up | | {tl_attribution_s / ours_attribution_s:.1f}x |")
        print(f"| TransformerLens on torch's own products (as it ships) | {shipped_attribution_s:.3f} s | {shipped_attribution_s / ours_attribution_s:.1f}x |")
        shown = ", ".join(f"{k} {v:.1e}" for k, v in apart.items())
        print(f"| max abs difference of normalised scores (head_out, mlp_out: the nodes both score) | | {max(apart.values()):.1e} ({shown}) |")
        print("\nWorst case by length (prompts that differ at their first word, so every position is patched):\n")
        print("| tokens (with BOS) | exact patching, 4 sweeps | floor | peak resident memory above the model so far |")
        print("|---:|---:|---:|---:|")
        words = " the cat sat on the mat and then it went to the store with a dog" * 4
        for n in (16, 24, LIMITS.max_patching_tokens):
            ids = model.tokenizer.encode("Once" + words, add_special_tokens=False)[: n - 1]
            clean = model.tokenizer.decode(ids)
            corrupted = "When" + clean[len("Once"):]
            _, seconds, peak = peak_memory(lambda: activation_patching(model, clean, corrupted, " the", " a"), base)
            floor = minimum_flops(cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, n, 1) / (gflops * 1e9)
            print(f"| {n} | {seconds:.2f} s | {floor:.2f} s | {peak / 2**20:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
