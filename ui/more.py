"""The "More" tab (more techniques): every technique that no designed tab shows (`tab=None` in its
declaration, core.registry), each as a form made from its declared inputs, a Run button, and its
declared figures. A new technique appears here, and in the JSON API, from its core module alone."""

from __future__ import annotations

import gradio as gr

from core.model import Model
from core.registry import Input, Technique
from ui.common import LANES, RAW, SPACE_HINT, by_component, user_errors, validator
from ui.handlers import Handlers


def field(spec: Input, value) -> gr.components.Component:
    """The widget for one declared input, filled with the technique's example."""
    label = f"{spec.name}: {spec.doc}"
    if spec.kind == "int":
        return gr.Number(value=value, precision=0, label=label, min_width=120)
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=value, label=label)
    info = SPACE_HINT if spec.kind == "token" else None
    return gr.Textbox(value=value, label=label, info=info, lines={"prompt": 2, "text": 6}.get(spec.kind, 1))


def build(h: Handlers, model: Model, registry: dict[str, Technique]) -> None:
    gr.Markdown(
        "**More techniques**: those without a tab of their own. Each runs on its own inputs; its JSON endpoint is listed under \"Use via API\".",
        elem_id="more-techniques",
    )
    for technique in registry.values():
        with gr.Group(elem_id=f"technique-{technique.name}"):
            gr.Markdown(f"### {technique.name}\n{technique.summary}")
            inputs = [field(spec, value) for spec, value in zip(technique.inputs, technique.request())]
            run = gr.Button(f"Run {technique.name}", variant="primary")
            out = {f"figure {i}": gr.Plot(show_label=False) for i in range(len(technique.figures))}
            out["download"] = gr.File(label="Download results (JSON)")

        def figures(*values, technique=technique, progress=gr.Progress()):
            return h.technique(technique, *values, progress=progress)

        checks = {}
        if technique.input_errors is not None:
            checks["validator"] = validator(h, technique.input_errors, [spec.name for spec in technique.inputs])
        run.click(
            user_errors(by_component(figures, out)), inputs, list(out.values()), api_name=f"{technique.name}_figures",
            api_visibility="private", **checks, **LANES[technique.lane], **RAW,
        )
