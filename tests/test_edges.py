"""Edge attribution patching (core.edges): the graph's size, and every edge's score against
TransformerLens 4.3's attribution_patch(granularity="edge") summed over positions."""

from __future__ import annotations

import numpy as np
import pytest
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

from core.contrast import ContrastPair
from core.edges import build_graph, edge_scores
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED
from tests.test_crosscheck import _best_conditioned_answers


def test_gpt2_small_has_32491_edges():
    graph = build_graph(12, 12)
    assert graph.n_edges == 32_491 and len(graph.writers) == 1 + 12 * 13 and len(graph.readers) == 12 * 37 + 1


def _name(node) -> str:
    """TransformerLens's node by our writer or reader name."""
    if node.kind == "embed":
        return "embed"
    if node.kind == "attn_head_out":
        return f"L{node.layer}H{node.head}"
    if node.kind == "mlp_out" or node.kind == "mlp_in":
        return f"MLP{node.layer}"
    if node.kind == "logits":
        return "logits"
    return f"L{node.layer}H{node.head}.{node.kind[0]}"


@pytest.mark.parametrize("fixture", ["demo_model", "gpt2_shaped"])
def test_edge_scores_equal_transformer_lens_summed_over_positions(request, fixture):
    model = request.getfixturevalue(fixture)
    pair = ContrastPair.of(model, IOI_CLEAN, IOI_CORRUPTED, *_best_conditioned_answers(model, IOI_CLEAN, IOI_CORRUPTED))
    ours = edge_scores(model, [pair])
    graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
    a, w = pair.metric.answer_id, pair.metric.wrong_id
    result = attribution_patch(
        model, pair.clean_tokens, pair.corrupted_tokens, lambda logits: logits[0, -1, a] - logits[0, -1, w], EdgeAttributionConfig(granularity="edge")
    )
    theirs = np.zeros_like(ours)
    writer, reader = {n: i for i, n in enumerate(graph.writers)}, {n: i for i, n in enumerate(graph.readers)}
    for (u, v), score in result.edge_scores.items():
        theirs[writer[_name(u)], reader[_name(v)]] += score
    assert np.all(theirs[~graph.edges] == 0)  # the same edges
    difference = np.abs(ours - theirs).max()
    assert difference <= 1e-4 * (1 + np.abs(theirs).max()), difference
    assert np.abs(theirs).max() > 1e-3


def test_faithfulness_is_exact_and_equals_transformer_lens(demo_model):
    """Keeping every edge gives the clean run (1), keeping none the corrupted run (0), and a top-k circuit
    equals TransformerLens 4.3's faithfulness (one forward with the excluded edges swapped at each reader)
    given the same edges at every position."""
    from transformer_lens.tools.analysis.attribution_patching import faithfulness as tl_faithfulness

    from core.edges import faithfulness

    model = demo_model
    pair = ContrastPair.of(model, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John")
    graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
    assert faithfulness(model, [pair], graph.edges) == pytest.approx(1.0, abs=1e-5)
    assert faithfulness(model, [pair], np.zeros_like(graph.edges)) == pytest.approx(0.0, abs=1e-5)
    scores = edge_scores(model, [pair])
    a, w = pair.metric.answer_id, pair.metric.wrong_id
    metric = lambda logits: logits[0, -1, a] - logits[0, -1, w]  # noqa: E731
    per_position = attribution_patch(model, pair.clean_tokens, pair.corrupted_tokens, metric, EdgeAttributionConfig(granularity="edge")).edge_scores
    writer, reader = {n: i for i, n in enumerate(graph.writers)}, {n: i for i, n in enumerate(graph.readers)}
    for k in (5, 20, 100):
        circuit = np.zeros_like(graph.edges)
        top = np.argsort(-np.abs(scores), axis=None)[:k]
        circuit[np.unravel_index(top, scores.shape)] = True
        ours = faithfulness(model, [pair], circuit)
        kept = [(u, v) for (u, v) in per_position if circuit[writer[_name(u)], reader[_name(v)]]]
        theirs = tl_faithfulness(model, pair.clean_tokens, pair.corrupted_tokens, metric, kept).recovered
        assert ours == pytest.approx(theirs, abs=1e-4), (k, ours, theirs)


def test_the_demo_models_circuits_contain_the_known_edges(demo_model):
    """Measured (32 pairs, seed 0). IOI: the top edges by |EAP| are MLP0 -> L4H0.v, MLP4 -> logits,
    embed -> MLP0, L4H0 -> MLP4, L4H0 -> logits (faithfulness of those 5: 0.73; top 100: 0.91).
    Induction: L1H2 -> L2H2.k is 7th (the previous-token head into the induction head's keys)."""
    from core.tasks import built_in_task

    graph = build_graph(5, 4)

    def top(task: str, k: int) -> list[tuple[str, str]]:
        scores = edge_scores(demo_model, built_in_task(demo_model, task, 32, seed=0).contrast_pairs(demo_model))
        order = np.argsort(-np.abs(scores), axis=None)[:k]
        return [(graph.writers[i], graph.readers[j]) for i, j in zip(*np.unravel_index(order, scores.shape))]

    ioi = top("ioi", 5)
    assert ("L4H0", "logits") in ioi and ("MLP0", "L4H0.v") in ioi
    assert ("L1H2", "L2H2.k") in top("induction", 10)
