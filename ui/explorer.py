"""The Prompt Explorer tab: predictions, logit lens, DLA and attention for one prompt."""

from __future__ import annotations

import gradio as gr

from core.attribution import input_errors
from core.model import Model
from ui.common import ABOUT, LIGHT, RAW, SPACE_HINT, about, by_component, examples, fill_on_load, user_errors, validator, waiting_figure
from ui.handlers import Handlers, example_rows


def build(h: Handlers, model: Model) -> None:
    """The tab, shown first. Its first example is in the page, or (`h.defer_examples` and not in the cache
    yet: a first start) filled when the page loads, unless the visitor's own results are shown by then."""
    labels, rows = example_rows(model)["explorer"]
    first = rows[0]
    prefilled = h.first_example(h.explore, *first)
    initial = prefilled or {}
    waiting = None if prefilled else waiting_figure()
    with gr.Row():
        prompt = gr.Textbox(value=first[0], label="Prompt", info="Enter runs it (Shift+Enter: a new line).", lines=1, max_lines=8, scale=3)
        with gr.Column(scale=2, min_width=240):
            target = gr.Textbox(value=first[1], label="Target token (empty: the model's top prediction)", info=SPACE_HINT)
            competing = gr.Textbox(value=first[2], label="Competing token (optional: DLA of the difference)")
    with gr.Row():
        layer = gr.Slider(0, model.cfg.n_layers - 1, value=first[3], step=1, label="Attention layer", min_width=200)
        head = gr.Slider(0, model.cfg.n_heads - 1, value=first[4], step=1, label="Attention head (large view)", min_width=200)
        run = gr.Button("Run", variant="primary", min_width=120)
    labels_of = {  # in the order /explore returns them
        "predictions": "Top predictions",
        "lens_heatmap": "Logit lens: every position",
        "lens_final": "Logit lens: final position",
        "dla_heads": "DLA per head",
        "dla_components": "DLA: MLPs, embeddings, biases",
        "attention_head": "Attention: one head",
        "attention": "Attention: every head",
    }
    out = {
        name: gr.Plot(value=initial.get(name, waiting), label=label, render=False, elem_id=name.replace("_", "-")) for name, label in labels_of.items()
    }
    out["download"] = gr.File(value=initial.get("download"), label="Download all results (JSON)", render=False)
    inputs = [prompt, target, competing, layer, head]
    outputs = list(out.values())
    explore = by_component(h.explore, out)
    if prefilled is None:  # the page lacks the first example: it fills it when it loads, at the layer and head the sliders show then
        fill_on_load(
            lambda layer, head: h.explore_results(*first[:3], layer, persist=True),
            by_component(lambda layer, head: h.explore(*first[:3], layer, head, persist=True), out), [layer, head], outputs, LIGHT,
        )
    events = LIGHT | RAW | dict(validator=validator(h, input_errors, ["prompt", "target", "competing"]))
    run.click(user_errors(explore), inputs, outputs, api_name="explore", **events)
    prompt.submit(user_errors(explore), inputs, outputs, api_name="explore_submit", api_visibility="private", **events)
    attention = by_component(h.attention_figures, out)
    for slider in (layer, head):
        slider.release(
            user_errors(attention), [prompt, layer, head], [out["attention_head"], out["attention"]],
            api_name=f"attention_{'layer' if slider is layer else 'head'}", api_visibility="private", **LIGHT, **RAW,
        )
    examples(rows, labels, inputs, outputs, explore, "explore_example", LIGHT)
    with gr.Row():
        out["predictions"].render()
        out["lens_final"].render()
    out["lens_heatmap"].render()
    about(ABOUT["lens"])
    with gr.Row():
        out["dla_heads"].render()
        out["dla_components"].render()
    about(ABOUT["dla"])
    with gr.Row():
        out["attention_head"].render()
        out["attention"].render()
    about(ABOUT["attention"])
    out["download"].render()
