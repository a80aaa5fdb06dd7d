"""The Circuit Map tab: induction, previous-token and duplicate-token scores for every head."""

from __future__ import annotations

import gradio as gr

from core import DEFAULTS, LIMITS
from core.induction import input_errors, max_seq_len
from core.model import Model
from ui.common import ABOUT, HEAVY, RAW, WIDE, about, by_component, examples, user_errors, validator
from ui.handlers import Handlers, example_rows


def build(h: Handlers, model: Model) -> None:
    labels, rows = example_rows(model)["circuit_map"]
    first = rows[0]
    initial = h.circuit_map(*first, persist=True)
    longest = max_seq_len(model)
    with gr.Row():
        seq_len = gr.Number(value=first[0], precision=0, label=f"seq_len (2-{longest})", min_width=120)
        batch = gr.Number(value=first[1], precision=0, label=f"batch (1-{LIMITS.max_induction_batch})", min_width=120)
        seed = gr.Number(value=first[2], precision=0, label="seed", min_width=120)
        run = gr.Button("Compute head scores", variant="primary", min_width=160)
    out = {  # in the order /circuit_map returns them
        "induction": gr.Plot(initial["induction"], label="Induction scores", render=False, **WIDE),
        "previous": gr.Plot(initial["previous"], label="Previous-token scores", render=False, **WIDE),
        "duplicate": gr.Plot(initial["duplicate"], label="Duplicate-token scores", render=False, **WIDE),
        "layer_max": gr.Plot(initial["layer_max"], label="Per-layer maximum", render=False, **WIDE),
        "loss": gr.Plot(initial["loss"], label="Loss by position", render=False),
        "heads": gr.Dataframe(initial["heads"], headers=["head", "induction score"], label="Induction heads", interactive=False, render=False),
        "download": gr.File(initial["download"], label="Download results (JSON)", render=False),
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
