"""The Contrast Pairs tab: exact activation patching beside its approximation on a clean / corrupted
pair, or exact patching over a task (many pairs, mean scores); then path patching from the heads
patching singled out, on the same pair or task."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from core import LIMITS, SWEEPS
from core.contrast import input_errors
from core.model import Model
from core.patching.path import COMPONENTS
from core.patching.task import input_errors as task_errors
from core.tasks import BUILT_IN
from ui.common import (
    ABOUT,
    HEAVY,
    LIGHT,
    ON_THEIR_WAY,
    RAW,
    SPACE_HINT,
    WIDE,
    about,
    by_component,
    choose_custom,
    examples,
    user_errors,
    validator,
    waiting_figure,
)
from ui.handlers import NOTHING_SHOWN, TASK_MODE, Handlers, example_rows, is_shown, page_task_errors, task_tab_id

PAIR_MODE = "One pair"


def sender_choices(model: Model) -> list[str]:
    """Every component a path can start from, in the order the model computes them."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    return ["embed", *(name for layer in range(n_layers) for name in (*(f"L{layer}H{head}" for head in range(n_heads)), f"MLP{layer}"))]


NO_SENDERS = "Choose at least one sender in the list: a head, an MLP or the embeddings."


def read_upload(path: str | None) -> tuple[str, str]:
    """An uploaded CSV / JSONL / text file of pairs into the pairs box (task: custom). Gradio's
    max_file_size has already refused anything too big; the task's checks read the text."""
    if not path:
        return gr.skip(), gr.skip()
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # without the byte order mark spreadsheets write
    except UnicodeDecodeError:
        raise gr.Error("The file is not UTF-8 text: upload a .csv, .jsonl or .txt file of pairs.", print_exception=False) from None
    return text, "custom"


def build(h: Handlers, model: Model):
    """The tab; returns (fill, outputs) where its first example is filled when the tab is opened (else None)."""
    labels, rows = example_rows(model)["contrast"]
    first = rows[0]
    prefilled = h.first_example(h.contrast, *first)
    initial = prefilled or {"status": ON_THEIR_WAY}
    waiting = None if prefilled else waiting_figure()
    mode = gr.Radio(
        [PAIR_MODE, TASK_MODE], value=PAIR_MODE, label="Analyse", elem_id="contrast-mode",
        info="one contrast pair, or a task: many pairs, every score averaged over them",
    )
    with gr.Column(visible=True) as pair_inputs:
        with gr.Row():
            clean = gr.Textbox(value=first[0], label="Prompt A (clean)", lines=2, min_width=280)
            corrupted = gr.Textbox(value=first[1], label="Prompt B (corrupted: same number of tokens)", lines=2, min_width=280)
        with gr.Row():
            answer = gr.Textbox(value=first[2], label="Answer token (right for A)", info=SPACE_HINT, min_width=200)
            wrong = gr.Textbox(value=first[3], label="Wrong token (right for B)", min_width=200)
            run = gr.Button("Run patching", variant="primary", min_width=120)
    with gr.Column(visible=False) as task_inputs:
        with gr.Row():
            task = gr.Dropdown([*BUILT_IN, "custom"], value="ioi", label="Task", info="built in, or custom: your pairs below", min_width=160)
            n = gr.Number(32, precision=0, label=f"Pairs n (1-{LIMITS.max_task_patching_pairs})", min_width=100)
            seed = gr.Number(0, precision=0, label="Seed (same seed, same pairs)", min_width=100)
            run_task = gr.Button("Run task patching", variant="primary", min_width=120)
        pairs = gr.Textbox(
            label="Your pairs (task custom): one per line, clean | corrupted | answer | wrong; or CSV / JSONL with those fields",
            placeholder="When Mary and John went to the store, John gave a drink to | When Mary and John went to the store, Mary gave a drink to | Mary | John",
            lines=4, max_lines=12,
        )
        upload = gr.UploadButton("Upload pairs (.csv, .jsonl, .txt)", file_types=[".csv", ".jsonl", ".txt"], size="sm")
    out = {  # in the order /contrast returns them
        # labels (not shown) name these outputs on the API page and in gradio_client's view_api
        "status": gr.Markdown(initial.get("status"), label="Status", show_label=False, elem_id="contrast-status", render=False),
        "summary": gr.Markdown(initial.get("summary"), label="Summary", show_label=False, elem_id="contrast-summary", render=False),
        "lens": gr.Plot(initial.get("lens", waiting), label="Logit lens, both prompts", render=False),
        **{f"exact {name}": gr.Plot(initial.get(f"exact {name}", waiting), label=f"Exact: {name}", render=False, **WIDE) for name in SWEEPS},
        **{
            f"approximate {name}": gr.Plot(initial.get(f"approximate {name}", waiting), label=f"Approximate: {name}", render=False, **WIDE)
            for name in SWEEPS
        },
        "agreement": gr.Plot(initial.get("agreement", waiting), label="Approximate vs exact", render=False, **WIDE),
        "scatter": gr.Plot(initial.get("scatter", waiting), label="DLA vs patching", render=False, **WIDE),
        "download": gr.File(initial.get("download"), label="Download results (JSON: exact, approximate, agreement)", render=False),
    }
    inputs = [clean, corrupted, answer, wrong]
    outputs = list(out.values())

    def contrast(clean, corrupted, answer, wrong, progress=gr.Progress()):
        yield from h.contrast_steps(clean, corrupted, answer, wrong, progress=progress)

    contrast = by_component(contrast, out)
    with pair_inputs:  # the examples belong to the pair's inputs (hidden with them in task mode)
        example_run = examples(rows, labels, inputs, outputs, contrast, "contrast_example", HEAVY)
    with gr.Column(visible=True) as pair_results:
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
    with gr.Column(visible=False) as task_results:
        task_out = {
            "task_summary": gr.Markdown("Pick a task and **Run task patching**: every sweep, averaged over the task's pairs.", elem_id="task-summary"),
        }
        about(ABOUT["task"])
        with gr.Tabs(elem_id="task-sweeps") as task_tabs:
            for name in SWEEPS:
                with gr.Tab(name, id=task_tab_id(name)):
                    task_out[f"task {name}"] = gr.Plot(label=f"Task: {name}")
        task_out["task_download"] = gr.File(label="Download results (JSON: means, each pair's values and head effects)")
        task_out["task_tab"] = task_tabs

    gr.Markdown("### Path patching: where does a component's effect go?", elem_id="path-heading")
    about(ABOUT["path"])
    with gr.Row():
        senders = gr.Dropdown(
            sender_choices(model), value=h.top_senders("pair", list(first)) if prefilled else [], multiselect=True, label="Senders",
            info="proposed: the heads patching ranked first; add or remove any head, MLP or the embeddings", elem_id="path-senders", scale=4,
        )
        trace = gr.Button("Trace paths", variant="primary", min_width=120, scale=1)
    path_out = {}
    with gr.Tabs(elem_id="path-receivers"):
        for c in COMPONENTS:
            with gr.Tab(f"→ {c}", id=f"path-{c}"):
                path_out[f"path {c}"] = gr.Plot(label=f"Path patching into {c}", **WIDE)
        with gr.Tab("→ logits", id="path-logits"):
            path_out["path logits"] = gr.Plot(label="Path patching into the logits", **WIDE)
    path_out["path_download"] = gr.File(label="Download path patching (JSON)")

    views = [pair_inputs, pair_results, task_inputs, task_results]
    stale = {component: None for component in path_out.values()}  # path results of another pair or task: cleared, never shown beside new ones

    def show(chosen):
        return {view: gr.update(visible=(chosen == TASK_MODE) == is_task) for view, is_task in zip(views, (False, False, True, True))} | stale

    mode.change(show, mode, [*views, *path_out.values()], api_visibility="private", **LIGHT)  # in a lane, like every event

    # What path patching traces: the pair and the task whose results are shown (a run's click-time inputs,
    # kept as `pending` until the run succeeds), never what the fields say now.
    # (hidden components, not gr.State: the server keeps nothing per visitor, and the page opens no heartbeat)
    shown = gr.JSON({"pair": list(first), "task": None}, visible=False)
    pending = gr.JSON(None, visible=False)

    def accept(kind: str, values: list | None, now: dict) -> dict:
        if values is None:  # never expected (hold runs first); keep what is shown
            return {shown: gr.skip(), senders: gr.skip()}
        now = (now if isinstance(now, dict) else {}) | {kind: values}
        return {shown: now, senders: h.top_senders(kind, values)} | stale

    def then_accept(event, kind: str, fields: list | None = None) -> None:
        """After a successful run: it is what is shown; the senders its head patching proposes; old paths cleared.
        `fields`: read the run's inputs from these (an example's, just filled) instead of `pending`."""
        if fields is None:
            fn, args = (lambda values, now: accept(kind, values, now)), [pending, shown]
        else:
            fn, args = (lambda *values: accept(kind, list(values[:-1]), values[-1])), [*fields, shown]
        event.success(user_errors(fn), args, [shown, senders, *path_out.values()], api_visibility="private", **HEAVY, **RAW)

    def hold(*values):
        return list(values)

    # in the heavy lane and registered first: it runs before the run it belongs to (one at a time, in order)
    run.click(hold, inputs, pending, api_visibility="private", **HEAVY, **RAW)
    then_accept(run.click(
        user_errors(contrast), inputs, outputs, api_name="contrast", show_progress_on=[out["status"]],
        validator=validator(h, input_errors, ["clean_prompt", "corrupted_prompt", "answer", "wrong_answer"]), **HEAVY, **RAW,
    ), "pair")
    then_accept(example_run, "pair", inputs)

    def task_patching(task, n, seed, pairs, progress=gr.Progress()):
        return h.task(task, n, seed, pairs, progress=progress)

    task_fields = dict(task=task, n=n, seed=seed, pairs=pairs)
    run_task.click(hold, list(task_fields.values()), pending, api_visibility="private", **HEAVY, **RAW)
    then_accept(run_task.click(
        user_errors(by_component(task_patching, task_out)), list(task_fields.values()), list(task_out.values()),
        api_name="task_figures", api_visibility="private", show_progress_on=[task_out["task_summary"]],
        validator=validator(h, page_task_errors(task_errors), list(task_fields)), **HEAVY, **RAW,
    ), "task")
    choose_custom(pairs, task)

    def traced(chosen, now) -> tuple[str, list | None]:  # the kind the tab shows, and its inputs as run (None: not run yet)
        kind = "task" if chosen == TASK_MODE else "pair"
        return kind, now.get(kind) if isinstance(now, dict) else None

    def paths(chosen, now, chosen_senders, progress=gr.Progress()):
        return h.paths(*traced(chosen, now), chosen_senders, progress=progress)

    def some_senders(chosen, now, chosen_senders) -> list:  # on the list, before the run: not a toast, not the API's text syntax
        ran = is_shown(traced(chosen, now)[1])  # a task chosen but not run yet
        return [gr.validate(True, ""), gr.validate(True, ""), gr.validate(ran and bool(chosen_senders), NO_SENDERS if ran else NOTHING_SHOWN)]

    trace.click(
        user_errors(by_component(paths, path_out)), [mode, shown, senders], list(path_out.values()),
        api_name="path_figures", api_visibility="private", validator=some_senders, **HEAVY, **RAW,
    )
    upload.upload(read_upload, upload, [pairs, task], api_visibility="private", **LIGHT)
    if prefilled is not None:
        return None

    def fill() -> dict:
        return h.contrast(*first, persist=True) | {"senders": h.top_senders("pair", list(first))}

    return by_component(fill, out | {"senders": senders}), [*outputs, senders]
