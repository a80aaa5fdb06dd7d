"""Circuits (core.edges): the graph's size; EAP edge scores against TransformerLens 4.3's
attribution_patch(granularity="edge") summed over positions; exact faithfulness against its
faithfulness; exact single-edge effects against path patching and TransformerLens hooks; the known
circuits of a hand-built model and of the demo model."""

from __future__ import annotations

import numpy as np
import pytest
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

from core.contrast import ContrastPair
from core.edges import build_graph, circuit, edge_attribution, edge_scores, exact_edge_effects, faithfulness, greedy_edges, top_edges
from core.edges import input_errors as circuit_errors
from core.patching.exact import run_pairs
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
    """Measured (32 pairs, seed 0). IOI: the greedy 5-edge circuit by |EAP| is embed -> MLP0 -> L4H0.v,
    L4H0 -> MLP4 -> logits and L4H0 -> logits; with the task-mean ablation it recovers 0.965 of the gap
    (with the corrupted ablation 0.73: the rest is spread over many small edges, 0.87 at 30).
    Induction: L1H2 -> L2H2.k is 7th (the previous-token head into the induction head's keys)."""
    from core.tasks import built_in_task

    graph = build_graph(5, 4)
    ioi = built_in_task(demo_model, "ioi", 32, seed=0).contrast_pairs(demo_model)
    scores = edge_scores(demo_model, ioi)
    circuit = greedy_edges(graph, scores, 5)
    kept = {(graph.writers[i], graph.readers[j]) for i, j in zip(*np.nonzero(circuit))}
    assert ("L4H0", "logits") in kept and ("MLP0", "L4H0.v") in kept
    assert faithfulness(demo_model, ioi, circuit, "mean") >= 0.9
    induction = edge_scores(demo_model, built_in_task(demo_model, "induction", 32, seed=0).contrast_pairs(demo_model))
    order = np.argsort(-np.abs(induction), axis=None)[:10]
    assert ("L1H2", "L2H2.k") in [(graph.writers[i], graph.readers[j]) for i, j in zip(*np.unravel_index(order, induction.shape))]


INDUCTION_PAIRS = [("PQRSTPQ", "PQZSTPQ", "R", "Z"), ("ABCDEFAB", "ABKDEFAB", "C", "K")]  # the earlier token after the repeat changed


def test_a_hand_built_circuit_is_recovered_exactly(induction_circuit):
    """tests/circuits.py: the induction head L1H0 copies the token after the earlier occurrence (its value
    input reads the embeddings) into the logits; the changed token reaches the answer through exactly
    embed -> L1H0.v and L1H0 -> logits. Those two edges score, nothing else does, and they recover the
    whole gap; their exact effects are equal (the path is one chain)."""
    model = induction_circuit
    pairs = [ContrastPair.of(model, *pair) for pair in INDUCTION_PAIRS]
    graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
    circuit = {("embed", "L1H0.v"), ("L1H0", "logits")}
    for method in ("eap", "eap-ig"):
        scores = edge_scores(model, pairs, method)
        found = {(graph.writers[i], graph.readers[j]) for i, j in zip(*np.nonzero(np.abs(scores) > 1e-3 * np.abs(scores).max()))}
        assert found == circuit, (method, found)
        assert faithfulness(model, pairs, greedy_edges(graph, scores, 2)) == pytest.approx(1.0, abs=1e-4)
        assert faithfulness(model, pairs, greedy_edges(graph, scores, 1)) == pytest.approx(0.0, abs=1e-4)
    exact = exact_edge_effects(model, pairs, sorted(circuit))
    assert exact[0] == pytest.approx(exact[1], rel=1e-4) and exact[0] > 10


def test_eap_ig_with_one_step_is_the_gradient_at_the_clean_run(demo_model):
    """EAP-IG's last point (alpha = 1) is the clean run: with one step, its scores are TransformerLens's
    attribution patching with the two prompts swapped (gradient on the clean run, corrupted - clean
    outputs), negated. TransformerLens 4.3 has no EAP-IG (ig_steps > 1 raises)."""
    model = demo_model
    pair = ContrastPair.of(model, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John")
    graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
    a, w = pair.metric.answer_id, pair.metric.wrong_id
    swapped = attribution_patch(
        model, pair.corrupted_tokens, pair.clean_tokens, lambda logits: logits[0, -1, a] - logits[0, -1, w], EdgeAttributionConfig(granularity="edge")
    )
    theirs = np.zeros(graph.edges.shape)
    writer, reader = {n: i for i, n in enumerate(graph.writers)}, {n: i for i, n in enumerate(graph.readers)}
    for (u, v), score in swapped.edge_scores.items():
        theirs[writer[_name(u)], reader[_name(v)]] -= score
    ours = edge_scores(model, [pair], "eap-ig", steps=1)
    assert np.abs(ours - theirs).max() <= 1e-4 * (1 + np.abs(theirs).max())


def test_pairs_batched_equal_each_pair_alone(demo_model):
    """Pairs of several token lengths, batched (and cut into passes): the mean of each pair's own scores and
    faithfulness terms; several circuits at once equal each alone; read from the traces, the same."""
    from core.tasks import built_in_task

    model = demo_model
    pairs = built_in_task(model, "ioi", 6, seed=1).contrast_pairs(model)
    assert len({p.clean_tokens.shape[-1] for p in pairs}) > 1
    graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
    together = edge_scores(model, pairs, rows=40)
    alone = np.mean([edge_scores(model, [p]) for p in pairs], 0)
    assert np.abs(together - alone).max() <= 1e-5 * np.abs(alone).max()
    circuits = np.stack([top_edges(graph, together, k) for k in (3, 30, 300)])
    batched = faithfulness(model, pairs, circuits, rows=40)
    assert np.allclose(batched, [faithfulness(model, pairs, c) for c in circuits], atol=1e-5)
    # the circuit view reads the prefix, the writers' outputs and the reference metrics from the pairs' traces instead
    runs = run_pairs(model, pairs)[0]
    assert np.abs(edge_scores(model, pairs, runs=runs) - together).max() <= 1e-5 * np.abs(together).max()
    for ablation in ("corrupted", "mean"):
        assert np.allclose(faithfulness(model, pairs, circuits, ablation, runs=runs), faithfulness(model, pairs, circuits, ablation), atol=1e-5)


def test_mean_ablation_over_one_corrupted_prompt_is_the_corrupted_ablation(demo_model):
    """When every pair has the same corrupted prompt, each writer's task mean is its corrupted output."""
    model = demo_model
    pairs = [ContrastPair.of(model, clean, IOI_CORRUPTED, " Mary", " John") for clean in (IOI_CLEAN, IOI_CLEAN.replace("store", "park"))]
    graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
    circuits = np.stack([top_edges(graph, edge_scores(model, pairs), k) for k in (4, 40)])
    assert np.allclose(faithfulness(model, pairs, circuits, "mean"), faithfulness(model, pairs, circuits, "corrupted"), atol=1e-5)
    with pytest.raises(ValueError, match="ablation"):
        faithfulness(model, pairs, circuits, "zero")


def test_exact_edge_effects_equal_path_patching_and_hooks(demo_model):
    """An edge into a head's q, k or v input is path patching from its writer alone (core.patching.path,
    itself checked against TransformerLens's get_act_patch_direct_path); into an MLP or the logits, the
    corrupted run with the writer's clean - corrupted output added at that hook (TransformerLens hooks)."""
    import torch

    from core.patching.path import parse_senders, path_patching_on

    model = demo_model
    pair = ContrastPair.of(model, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John")
    edges = [("MLP0", "L4H0.v"), ("L2H1", "L4H3.k"), ("embed", "L1H0.q"), ("embed", "MLP0"), ("L3H2", "MLP3"), ("MLP4", "logits"), ("L4H0", "logits")]
    ours = exact_edge_effects(model, [pair], edges)
    gap = None
    for (writer, reader), value in zip(edges, ours):
        if "." in reader:
            paths = path_patching_on(model, pair, parse_senders(writer, model.cfg.n_layers, model.cfg.n_heads))
            gap = float(paths.gap)
            head, component = reader.split(".")
            layer, index = (int(x) for x in head[1:].split("H"))
            assert value == pytest.approx(getattr(paths, component)[layer, index] * gap, abs=1e-4), (writer, reader)
            continue
        with torch.no_grad():
            _, clean = model.run_with_cache(pair.clean_tokens)
            _, corrupted = model.run_with_cache(pair.corrupted_tokens)

            def output(cache):
                if writer == "embed":
                    return cache["hook_embed"]
                if writer.startswith("MLP"):
                    return cache[f"blocks.{writer[3:]}.hook_mlp_out"]
                layer, head = (int(x) for x in writer[1:].split("H"))
                return torch.einsum("bphd,hdm->bpm", cache[f"blocks.{layer}.attn.hook_z"][:, :, head : head + 1], model.W_O[layer, head : head + 1])

            write = output(clean) - output(corrupted)
            hook = f"blocks.{reader[3:]}.hook_mlp_in" if reader.startswith("MLP") else f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
            model.set_use_hook_mlp_in(True)
            try:
                logits = model.run_with_hooks(pair.corrupted_tokens, fwd_hooks=[(hook, lambda act, hook: act + write)])
            finally:
                model.set_use_hook_mlp_in(False)
            base = model(pair.corrupted_tokens)
        a, w = pair.metric.answer_id, pair.metric.wrong_id
        expected = float((logits[0, -1, a] - logits[0, -1, w]) - (base[0, -1, a] - base[0, -1, w]))
        assert value == pytest.approx(expected, abs=1e-4), (writer, reader)
    assert gap is not None and np.abs(ours).max() > 0.1


def test_the_circuit_view_and_its_downloads(demo_model, tmp_path):
    """The Circuit Map's task view (what its button runs) on 8 IOI pairs: the graph holds the circuit's
    edges in bands the slider hides, the curve ends at 1 (every edge), the table and the CSV list the
    same edges as /circuit's JSON, and a target is met by the smallest circuit the bisection finds."""
    import csv
    import json

    from serving.runner import Runner
    from ui.handlers import Handlers

    h = Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    out = h.task_circuit("ioi", 8, 0, "", "eap-ig", 3, "greedy", 6, 0, "mean", 6)
    data = json.loads(open(out["circuit_json"]).read())
    assert data["k"] == 6 and len(data["edges"]) == 6 and data["method"] == "eap-ig" and data["steps"] == 3
    assert data["curve_k"][-1] == data["n_edges"] == 761 and data["curve_faithfulness"][-1] == pytest.approx(1.0, abs=1e-6)
    assert [row[:2] for row in out["circuit_table"]] == [[e["writer"], e["reader"]] for e in data["edges"]]
    rows = list(csv.DictReader(open(out["circuit_csv"])))
    assert [(r["writer"], r["reader"], float(r["score"])) for r in rows] == [(e["writer"], e["reader"], e["score"]) for e in data["edges"]]
    assert len(data["checks"]) == 6 and all(c["exact"] is not None for c in data["checks"])
    graph = out["circuit_graph"]
    segments = sum(len([x for x in trace.x if x is None]) for trace in graph.data if trace.mode == "lines")
    assert segments == 6 and len(graph.layout.sliders[0].steps) > 1
    nodes = next(trace for trace in graph.data if trace.meta == -1)
    assert sorted(a.text for a in graph.layout.annotations) == sorted(nodes.text) == sorted(data["nodes"])  # each node named above the edges
    assert "Faithfulness" in out["circuit_summary"] and "Pearson r" in out["circuit_summary"]
    targeted = h.task_circuit("ioi", 8, 0, "", "eap", 5, "greedy", 20, 90, "mean", 0)
    reached = json.loads(open(targeted["circuit_json"]).read())
    assert reached["faithfulness"] >= 0.9 and reached["target"] == 0.9 and reached["checks"] == []
    assert reached["k"] > 1  # one edge cannot carry IOI
    smaller = json.loads(open(h.task_circuit("ioi", 8, 0, "", "eap", 5, "greedy", reached["k"] - 1, 0, "mean", 0)["circuit_json"]).read())
    assert smaller["faithfulness"] < 0.9


@pytest.mark.gpt2
def test_gpt2_ioi_circuit_has_the_name_movers_and_s_inhibition_edges(gpt2):
    """Wang et al. (2022) on real GPT-2 Small, IOI, 32 pairs: among the top 100 edges by |EAP-IG score|, the
    name movers (9.9, 9.6, 10.0) into the logits, and the S-inhibition heads (7.3, 7.9, 8.6, 8.10) into a
    name mover's query."""
    from core.tasks import built_in_task

    graph = build_graph(12, 12)
    scores = edge_scores(gpt2, built_in_task(gpt2, "ioi", 32, seed=0).contrast_pairs(gpt2), "eap-ig")
    top = {(graph.writers[i], graph.readers[j]) for i, j in zip(*np.nonzero(top_edges(graph, scores, 100)))}
    movers = ("L9H9", "L9H6", "L10H0")
    assert sum((mover, "logits") in top for mover in movers) >= 2, sorted(top)[:20]
    inhibition = {(s, f"{m}.q") for s in ("L7H3", "L7H9", "L8H6", "L8H10") for m in movers}
    assert len(inhibition & top) >= 2, sorted(inhibition & top)


@pytest.mark.parametrize(
    "inputs, field",
    [
        (dict(k=0), "k"),
        (dict(target=101), "target"),
        (dict(checks=-1), "checks"),
        (dict(method="nope"), "method"),
        (dict(method="eap-ig", steps=0), "steps"),
        (dict(selection="best"), "selection"),
        (dict(ablation="zero"), "ablation"),
        (dict(n=0), "n"),
        (dict(task="custom", pairs="a | b"), "pairs"),
        (dict(pairs="x"), "pairs"),  # pairs beside a built-in task: refused, never left out
        (dict(task={"ioi": 1}), "task"),
    ],
)
def test_a_circuits_bad_inputs_are_named_by_field_before_the_run_with_the_runs_own_message(demo_model, inputs, field):
    """What the Circuit Map's validator shows on a field (input_errors: no forward pass) is what the run would raise."""
    inputs = dict(task="ioi", n=8) | inputs
    errors = circuit_errors(demo_model, **inputs)
    with pytest.raises(ValueError) as raised:
        circuit(demo_model, **inputs)
    assert errors == {field: str(raised.value)}


def test_edge_attribution_lists_every_edge_of_the_graph_zeros_included(demo_model):
    """/edge_attribution's `edges` has one row per edge (n_edges), as its JSON says: an edge that scores exactly
    0.0 (here the embeddings' direct edge to the logits: IOI's corruption leaves the final token alone) is
    listed, last; a pair that is not an edge never is."""
    result = edge_attribution(demo_model, "ioi", 4)
    graph = build_graph(demo_model.cfg.n_layers, demo_model.cfg.n_heads)
    rows = result.to_dict()["edges"]
    assert len(rows) == result.n_edges == graph.n_edges == 761
    index = {(w, r) for w in range(len(graph.writers)) for r in range(len(graph.readers)) if graph.edges[w, r]}
    assert {(graph.writers.index(w), graph.readers.index(r)) for w, r, _ in rows} == index
    assert ["embed", "logits", 0.0] in rows and rows[-1][2] == 0.0
    sizes = [abs(score) for _, _, score in rows]
    assert sizes == sorted(sizes, reverse=True)
