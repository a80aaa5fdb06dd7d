"""The Circuit Map tab: induction, previous-token and duplicate-token scores for every head; then a
task's circuit: edge scores over the whole graph, the circuit they pick, verified exactly."""

from __future__ import annotations

import gradio as gr

from core import DEFAULTS, LIMITS
from core.edges import ABLATIONS, METHODS, SELECTIONS, build_graph
from core.edges import input_errors as circuit_errors
from core.induction import input_errors, max_seq_len
from core.model import Model
from core.tasks import BUILT_IN
from ui.common import ABOUT, HEAVY, RAW, WIDE, about, by_component, choose_custom, examples, user_errors, validator, waiting_figure
from ui.handlers import Handlers, example_rows, page_task_errors


def build(h: Handlers, model: Model):
    """The tab; returns (fill, outputs) where its first example is filled when the tab is opened (else None)."""
    labels, rows = example_rows(model)["circuit_map"]
    first = rows[0]
    prefilled = h.first_example(h.circuit_map, *first)
    initial = prefilled or {}
    waiting = None if prefilled else waiting_figure()
    longest = max_seq_len(model)
    with gr.Row():
        seq_len = gr.Number(value=first[0], precision=0, label=f"seq_len (2-{longest})", min_width=120)
        batch = gr.Number(value=first[1], precision=0, label=f"batch (1-{LIMITS.max_induction_batch})", min_width=120)
        seed = gr.Number(value=first[2], precision=0, label="seed", min_width=120)
        run = gr.Button("Compute head scores", variant="primary", min_width=160)
    out = {  # in the order /circuit_map returns them
        "induction": gr.Plot(initial.get("induction", waiting), label="Induction scores", render=False, **WIDE),
        "previous": gr.Plot(initial.get("previous", waiting), label="Previous-token scores", render=False, **WIDE),
        "duplicate": gr.Plot(initial.get("duplicate", waiting), label="Duplicate-token scores", render=False, **WIDE),
        "layer_max": gr.Plot(initial.get("layer_max", waiting), label="Per-layer maximum", render=False, **WIDE),
        "loss": gr.Plot(initial.get("loss", waiting), label="Loss by position", render=False),
        "heads": gr.Dataframe(initial.get("heads"), headers=["head", "induction score"], label="Induction heads", interactive=False, render=False),
        "download": gr.File(initial.get("download"), label="Download results (JSON)", render=False),
    }
    inputs = [seq_len, batch, seed]
    outputs = list(out.values())

    def circuit_map(seq_len, batch, seed, progress=gr.Progress()):
        return h.circuit_map(seq_len, batch, seed, progress=progress)

    circuit_map = by_component(circuit_map, out)
    run.click(
        user_errors(circuit_map), inputs, outputs, api_name="circuit_map",
        validator=validator(h, input_errors, ["seq_len", "batch", "seed"]), **HEAVY, **RAW,
    )
    examples(rows, labels, inputs, outputs, circuit_map, "circuit_map_example", HEAVY)
    gr.Markdown(
        f"Heads scoring above **{DEFAULTS.induction_threshold}** are listed as induction heads. One request reads at most "
        f"{LIMITS.max_induction_tokens:,} tokens, batch x (2 x seq_len + 1): seq_len {longest} allows batch "
        f"{LIMITS.max_induction_tokens // (2 * longest + 1)}."
    )
    about(ABOUT["induction"])
    with gr.Row():
        out["induction"].render()
        out["layer_max"].render()
    with gr.Row():
        out["previous"].render()
        out["duplicate"].render()
    out["loss"].render()
    out["heads"].render()
    out["download"].render()

    build_task_circuit(h, model)
    if prefilled is not None:
        return None
    return by_component(lambda: h.circuit_map(*first, persist=True), out), outputs


def build_task_circuit(h: Handlers, model: Model) -> None:
    """The task view: pick a task and how to find its circuit; the graph, the faithfulness curve, the exact
    checks, the table of edges and the downloads."""
    n_edges = build_graph(model.cfg.n_layers, model.cfg.n_heads).n_edges
    gr.Markdown(f"### A task's circuit: every edge scored, the circuit checked exactly ({n_edges:,} edges)", elem_id="circuit-heading")
    about(ABOUT["circuit"])
    with gr.Row():
        task = gr.Dropdown([*BUILT_IN, "custom"], value="ioi", label="Task", info="built in, or custom: your pairs below", min_width=140)
        n = gr.Number(32, precision=0, label=f"Pairs n (1-{LIMITS.max_task_patching_pairs})", min_width=100)
        seed = gr.Number(0, precision=0, label="Seed", min_width=80)
        method = gr.Radio(list(METHODS), value="eap", label="Edge scores", info="eap: one gradient; eap-ig: integrated over steps", min_width=160)
        steps = gr.Number(DEFAULTS.eap_ig_steps, precision=0, label=f"EAP-IG steps (1-{LIMITS.max_eap_ig_steps})", min_width=100)
    with gr.Row():
        selection = gr.Radio(list(SELECTIONS), value="greedy", label="Circuit", info="greedy: connected, from the logits; top: largest |score|", min_width=160)
        k = gr.Number(DEFAULTS.circuit_edges, precision=0, label=f"Edges k (1-{n_edges:,})", min_width=100)
        target = gr.Number(0, precision=0, label="or target faithfulness % (0: use k)", min_width=120)
        ablation = gr.Radio(list(ABLATIONS), value="corrupted", label="Edges outside carry", info="the corrupted output, or the task's mean", min_width=160)
        checks = gr.Number(DEFAULTS.edge_checks, precision=0, label=f"Exact checks (0-{LIMITS.max_edge_checks})", min_width=100)
        run = gr.Button("Find the circuit", variant="primary", min_width=140)
    pairs = gr.Textbox(
        label="Your pairs (task custom): one per line, clean | corrupted | answer | wrong; or CSV / JSONL with those fields",
        placeholder="When Mary and John went to the store, John gave a drink to | When Mary and John went to the store, Mary gave a drink to | Mary | John",
        lines=2, max_lines=12,
    )
    out = {
        "circuit_summary": gr.Markdown("Pick a task and **Find the circuit** (32 IOI pairs take seconds on the demo model, about a minute on GPT-2).",
                                       elem_id="circuit-summary"),
        "circuit_graph": gr.Plot(label="Circuit graph", render=False),
        "circuit_curve": gr.Plot(label="Faithfulness curve", render=False, **WIDE),
        "circuit_checks": gr.Plot(label="Approximate vs exact", render=False, **WIDE),
        "circuit_table": gr.Dataframe(headers=["writer", "reader", "score", "exact"], label="The circuit's edges (largest |score| first; exact: checked alone)",
                                      interactive=False, render=False, elem_id="circuit-table"),
        "circuit_json": gr.File(label="Download the circuit (JSON: edges, nodes, curve, checks)", render=False),
        "circuit_csv": gr.File(label="Download the table (CSV)", render=False),
    }
    out["circuit_graph"].render()
    with gr.Row():
        out["circuit_curve"].render()
        out["circuit_checks"].render()
    out["circuit_table"].render()
    with gr.Row():
        out["circuit_json"].render()
        out["circuit_csv"].render()

    def task_circuit(task, n, seed, pairs, method, steps, selection, k, target, ablation, checks, progress=gr.Progress()):
        return h.task_circuit(task, n, seed, pairs, method, steps, selection, k, target, ablation, checks, progress=progress)

    fields = dict(task=task, n=n, seed=seed, pairs=pairs, method=method, steps=steps, selection=selection, k=k, target=target, ablation=ablation, checks=checks)
    run.click(
        user_errors(by_component(task_circuit, out)), list(fields.values()), list(out.values()),
        api_name="circuit_figures", api_visibility="private", show_progress_on=[out["circuit_summary"]],
        validator=validator(h, page_task_errors(circuit_errors), list(fields)), **HEAVY, **RAW,
    )
    choose_custom(pairs, task)
