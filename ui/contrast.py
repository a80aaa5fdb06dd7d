"""The Contrast Pairs tab: exact activation patching beside its approximation, on a clean / corrupted pair."""

from __future__ import annotations

import gradio as gr

from core import SWEEPS
from core.contrast import input_errors
from core.model import Model
from ui.common import ABOUT, HEAVY, RAW, SPACE_HINT, WIDE, about, by_component, examples, user_errors, validator
from ui.handlers import Handlers, example_rows


def build(h: Handlers, model: Model) -> None:
    labels, rows = example_rows(model)["contrast"]
    first = rows[0]
    initial = h.contrast(*first, persist=True)
    with gr.Row():
        clean = gr.Textbox(value=first[0], label="Prompt A (clean)", lines=2, min_width=280)
        corrupted = gr.Textbox(value=first[1], label="Prompt B (corrupted: same number of tokens)", lines=2, min_width=280)
    with gr.Row():
        answer = gr.Textbox(value=first[2], label="Answer token (right for A)", info=SPACE_HINT, min_width=200)
        wrong = gr.Textbox(value=first[3], label="Wrong token (right for B)", min_width=200)
        run = gr.Button("Run patching", variant="primary", min_width=120)
    out = {  # in the order /contrast returns them
        "status": gr.Markdown(initial["status"], elem_id="contrast-status", render=False),
        "summary": gr.Markdown(initial["summary"], elem_id="contrast-summary", render=False),
        "lens": gr.Plot(initial["lens"], label="Logit lens, both prompts", render=False),
        **{f"exact {name}": gr.Plot(initial[f"exact {name}"], label=f"Exact: {name}", render=False, **WIDE) for name in SWEEPS},
        **{
            f"approximate {name}": gr.Plot(initial[f"approximate {name}"], label=f"Approximate: {name}", render=False, **WIDE)
            for name in SWEEPS
        },
        "agreement": gr.Plot(initial["agreement"], label="Approximate vs exact", render=False, **WIDE),
        "scatter": gr.Plot(initial["scatter"], label="DLA vs patching", render=False, **WIDE),
        "download": gr.File(initial["download"], label="Download results (JSON: exact, approximate, agreement)", render=False),
    }
    inputs = [clean, corrupted, answer, wrong]
    outputs = list(out.values())

    def contrast(clean, corrupted, answer, wrong, progress=gr.Progress()):
        yield from h.contrast_steps(clean, corrupted, answer, wrong, progress=progress)

    contrast = by_component(contrast, out)
    run.click(
        user_errors(contrast), inputs, outputs, api_name="contrast", show_progress_on=[out["status"]],
        validator=validator(h, input_errors, ["clean_prompt", "corrupted_prompt", "answer", "wrong_answer"]), **HEAVY, **RAW,
    )
    examples(rows, labels, inputs, outputs, contrast, "contrast_example", HEAVY)
    out["status"].render()
    out["summary"].render()
    about(ABOUT["patching"])
    out["lens"].render()
    with gr.Tabs(elem_id="sweeps"):  # one sweep at a time keeps the page short; exact left, approximate right
        for name in SWEEPS:
            with gr.Tab(name, id=name), gr.Row():
                out[f"exact {name}"].render()
                out[f"approximate {name}"].render()
    with gr.Row():
        out["agreement"].render()
        out["scatter"].render()
    out["download"].render()
