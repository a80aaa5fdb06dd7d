"""Circuits: ours (core.edges, the pairs batched, from each length's first difference) against
TransformerLens 4.3's own `attribution_patch(granularity="edge")`, `faithfulness` and
`patching.get_act_patch_direct_path` on the same work, side by side, one run.

    python -m benchmarks.bench_circuits [--threads 2] [--repeats 3] [--pairs 32] [--tl-pairs 2] [--checks 50]

GPT-2 Small-shaped model (random weights, GPT-2's real tokenizer), the built-in IOI task of `--pairs`
pairs (seed 0; several token lengths). Parts: EAP scores for all 32,491 edges; EAP-IG with 5 steps; a
12-point exact faithfulness curve (the greedy circuits of 1 ... 32,491 edges, corrupted ablation); the
exact effect of the top `--checks` edges alone; then the whole circuit view (`core.edges.circuit`: EAP,
the curve, the circuit, the checks). TransformerLens runs pair by pair (its functions take one pair):
its time for the first `--tl-pairs` pairs is scaled by pairs; its faithfulness is timed on two of the
curve's circuits and scaled to twelve; its direct path patching (one sender head, every later head's
query: one forward per receiver) gives its time per single-edge patch, scaled to the checks. It has
no EAP-IG.
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
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch  # noqa: E402
from transformer_lens.tools.analysis.attribution_patching import faithfulness as tl_faithfulness

from benchmarks.common import arguments, peak_memory, rss_bytes  # noqa: E402
from core import load_model, save_random_gpt2  # noqa: E402
from core.edges import build_graph, circuit, curve_sizes, edge_scores, exact_edge_effects, faithfulness, greedy_edges, top_edges  # noqa: E402
from core.tasks import built_in_task  # noqa: E402


def _name(node) -> str:
    """Our writer or reader name of a TransformerLens graph node (tests/test_edges.py has the same map)."""
    if node.kind in ("embed", "logits"):
        return node.kind
    if node.kind == "attn_head_out":
        return f"L{node.layer}H{node.head}"
    if node.kind in ("mlp_out", "mlp_in"):
        return f"MLP{node.layer}"
    return f"L{node.layer}H{node.head}.{node.kind[0]}"


def main() -> None:
    args = arguments(pairs=32, tl_pairs=2, checks=50)
    with tempfile.TemporaryDirectory() as directory:
        model = load_model(save_random_gpt2(directory))
        base = rss_bytes()
        pairs = built_in_task(model, "ioi", args.pairs, seed=0).contrast_pairs(model)
        graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
        lengths = sorted({p.clean_tokens.shape[-1] for p in pairs})
        print(f"GPT-2 Small-shaped model (random weights), {args.threads} threads, torch {torch.__version__}; IOI, {args.pairs} pairs "
              f"(seed 0, {lengths[0]}-{lengths[-1]} tokens), {graph.n_edges:,} edges\n")
        edge_scores(model, pairs[:2])  # warm-up (the engine is built once per model)

        def timed(fn):
            runs = [peak_memory(fn, base) for _ in range(args.repeats)]
            return runs[0][0], statistics.median(s for _, s, _ in runs), max(m for _, _, m in runs)

        eap, t_eap, m_eap = timed(lambda: edge_scores(model, pairs))
        _, t_ig, m_ig = timed(lambda: edge_scores(model, pairs, "eap-ig", 5))
        circuits = np.stack([greedy_edges(graph, eap, int(k)) for k in curve_sizes(graph.n_edges)])
        curve, t_curve, m_curve = timed(lambda: faithfulness(model, pairs, circuits))
        top = top_edges(graph, eap, args.checks)
        checked = [(graph.writers[w], graph.readers[r]) for w, r in zip(*np.nonzero(top))]
        _, t_checks, m_checks = timed(lambda: exact_edge_effects(model, pairs, checked))
        view, t_view, m_view = timed(lambda: circuit(model, "ioi", args.pairs, 0, "", "eap", 5, "greedy", 20, 0, "corrupted", args.checks))

        # TransformerLens, pair by pair, on the first tl_pairs pairs
        k = args.tl_pairs
        tl_scores, tl_edges = np.zeros(graph.edges.shape), []
        writer, reader = {n: i for i, n in enumerate(graph.writers)}, {n: i for i, n in enumerate(graph.readers)}
        start = time.perf_counter()
        for pair in pairs[:k]:
            a, w = pair.metric.answer_id, pair.metric.wrong_id
            result = attribution_patch(
                model, pair.clean_tokens, pair.corrupted_tokens, lambda logits: logits[0, -1, a] - logits[0, -1, w], EdgeAttributionConfig(granularity="edge")
            )
            tl_edges.append(list(result.edge_scores))
            for (u, v), score in result.edge_scores.items():
                tl_scores[writer[_name(u)], reader[_name(v)]] += score / k
        tl_eap = (time.perf_counter() - start) * args.pairs / k
        eap_difference = float(np.abs(edge_scores(model, pairs[:k]) - tl_scores).max())
        chosen = [len(circuits) // 3, 2 * len(circuits) // 3]  # two of the curve's circuits
        start = time.perf_counter()
        faith_difference = 0.0
        for c in chosen:
            for i, pair in enumerate(pairs[:k]):
                a, w = pair.metric.answer_id, pair.metric.wrong_id
                kept = [(u, v) for u, v in tl_edges[i] if circuits[c][writer[_name(u)], reader[_name(v)]]]
                theirs = tl_faithfulness(model, pair.clean_tokens, pair.corrupted_tokens, lambda logits: logits[0, -1, a] - logits[0, -1, w], kept).recovered
                faith_difference = max(faith_difference, abs(theirs - faithfulness(model, [pair], circuits[c])))
        tl_curve = (time.perf_counter() - start) * args.pairs / k * len(circuits) / len(chosen)
        pair = pairs[0]
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(pair.clean_tokens)
            _, corrupted_cache = model.run_with_cache(pair.corrupted_tokens)
        a, w = pair.metric.answer_id, pair.metric.wrong_id
        start = time.perf_counter()
        tl_patching.get_act_patch_direct_path(
            model, pair.corrupted_tokens, clean_cache, corrupted_cache, lambda logits: logits[0, -1, a] - logits[0, -1, w], 5, 0, "q", verbose=False
        )
        per_edge = (time.perf_counter() - start) / ((model.cfg.n_layers - 6) * model.cfg.n_heads)
        tl_checks = per_edge * len(checked) * args.pairs

        print("| part | ours | TransformerLens 4.3 (scaled) | speed-up | peak memory (ours) |")
        print("|---|---:|---:|---:|---:|")
        rows = [
            (f"EAP scores, all {graph.n_edges:,} edges", t_eap, tl_eap, m_eap),
            ("EAP-IG scores, 5 steps", t_ig, None, m_ig),
            (f"faithfulness curve, {len(circuits)} circuits (exact)", t_curve, tl_curve, m_curve),
            (f"top {len(checked)} edges alone (exact)", t_checks, tl_checks, m_checks),
        ]
        for name, ours, theirs, memory in rows:
            tl = "no EAP-IG" if theirs is None else f"{theirs:.1f} s"
            ratio = "" if theirs is None else f"{theirs / ours:.0f}x"
            print(f"| {name} | {ours:.1f} s | {tl} | {ratio} | {memory / 2**20:.0f} MiB |")
        together = tl_eap + tl_curve + tl_checks
        print(f"| the whole circuit view (`circuit`: EAP, curve, circuit, {args.checks} checks) | {t_view:.1f} s | {together:.1f} s (EAP + curve + checks) "
              f"| {together / t_view:.0f}x | {m_view / 2**20:.0f} MiB |")
        print(f"\nmax |ours - TransformerLens|: EAP scores {eap_difference:.1e} (largest score {np.abs(tl_scores).max():.2f}); "
              f"faithfulness {faith_difference:.1e}. Curve (k: faithfulness): "
              + ", ".join(f"{int(s)}: {f:.2f}" for s, f in zip(curve_sizes(graph.n_edges), curve))
              + f". Circuit of 20 edges: {view.faithfulness:.3f}; checks r = {view.agreement['pearson_r']:.3f}. "
              f"TransformerLens timed on {k} pairs ({len(chosen)} circuits for faithfulness, one sender's 72 receivers for checks); "
              f"medians of {args.repeats}.")


if __name__ == "__main__":
    main()
