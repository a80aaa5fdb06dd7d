"""CircuitBreaker: the Gradio app. Wiring only: handlers read widgets, call `core` through a
Runner (one model, one lock, cached results), and return figures and JSON.

    python app.py [--model NAME_OR_DIR] [--host HOST] [--port PORT] [--share]

Environment (for a Hugging Face Space): CIRCUITBREAKER_MODEL, GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT, CIRCUITBREAKER_SHARE=1.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

import serving  # noqa: E402
from core import (  # noqa: E402
    DEFAULTS,
    LIMITS,
    SWEEPS,
    ModelLoadError,
    activation_patching,
    agreement,
    attention_patterns,
    attribution_patching,
    direct_logit_attribution,
    induction_scores,
    logit_lens,
    plots,
    predict,
)
from core.attribution import input_errors as explorer_errors  # noqa: E402
from core.induction import input_errors as induction_errors  # noqa: E402
from core.induction import max_seq_len  # noqa: E402
from core.model import Model, describe_source, load_with_fallback, model_label  # noqa: E402
from core.patching import input_errors as pair_errors  # noqa: E402
from core.runner import Runner, write_whole  # noqa: E402
from examples import EXAMPLES  # noqa: E402

THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
@media (max-width: 520px) {  /* a phone: the three tab names stay visible instead of folding into "..." */
  .tab-wrapper button { padding: 4px 7px !important; font-size: 13px !important; }
  #contrast-summary table { font-size: 12px; }
  #contrast-summary th, #contrast-summary td { padding: 4px 6px !important; word-break: normal; }
}
"""
MAX_UPLOAD = "1kb"  # the app has no upload widget: Gradio's upload route takes nothing bigger


def launch_options() -> dict:
    """What launch() needs besides where to listen (Gradio 6 takes the look there), for main() and the
    tests' servers: theme, CSS, the upload cap, and the request body cap (a fresh dict each launch)."""
    return dict(theme=THEME, css=CSS, max_file_size=MAX_UPLOAD, app_kwargs=serving.app_kwargs(LIMITS.max_request_bytes))

# Two queues, one running request each: quick techniques never wait behind a line of heavy ones
# (they wait at most for the one heavy request running, which the limits in core/config.py keep
# short). Both still take turns on the model itself (Runner's lock: hooks live on the model).
LIGHT = dict(concurrency_id="light", concurrency_limit=1)  # predictions, logit lens, DLA, attention
HEAVY = dict(concurrency_id="heavy", concurrency_limit=1)  # patching (both kinds), induction
RAW = dict(preprocess=False)  # widgets hand over what was sent; core validates it with a clear message


def user_errors(fn):
    """Core raises ValueError with a sentence a person can act on; show it as a Gradio error. An event
    that must not start (the server is restarting) gets its sentence the same way."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def steps(*args, **kwargs):
            try:
                _may_start()
                yield from fn(*args, **kwargs)
            except ValueError as err:
                raise gr.Error(_plain_text(err), print_exception=False) from None

        return steps

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _may_start()
            return fn(*args, **kwargs)
        except ValueError as err:
            raise gr.Error(_plain_text(err), print_exception=False) from None

    return wrapper


def _may_start() -> None:
    reason = serving.refusal()
    if reason is not None:
        raise ValueError(reason)


def _plain_text(err: Exception) -> str:
    """The message safe as HTML: the page's toasts render HTML, and messages quote the user's input.
    Escaping '&' and '<' is enough (no tag can open) and leaves arrows such as '->' as they are."""
    return str(err).replace("&", "&amp;").replace("<", "&lt;")


class Handlers:
    """Thin handlers: widgets in, core results through the runner, figures/JSON out."""

    def __init__(self, runner: Runner, download_dir: str | None, max_downloads: int = LIMITS.max_downloads):
        """`download_dir` None: downloads are off (the page says so); results are shown as usual.
        At most `max_downloads` files are kept (oldest removed first)."""
        self.runner = runner
        self.download_dir = None if download_dir is None else Path(download_dir)
        self.max_downloads = max_downloads

    def _download(self, stem: str, data: dict) -> str | None:
        """Write `data` as JSON; the name is the content's hash, so repeats do not pile up files.
        Written to a temporary name and renamed, so a file under its final name is always whole; when
        the disk refuses, the results are still shown, with a warning instead of a download."""
        if self.download_dir is None:
            return None
        text = json.dumps(data, ensure_ascii=False)
        path = self.download_dir / f"{stem}-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}.json"
        if path.exists():
            return str(path)
        try:
            write_whole(path, text.encode("utf-8"))
        except OSError as err:
            gr.Warning(f"The results are shown, but their JSON download could not be saved on the server ({err.strerror or err}).")
            return None
        files = sorted(self.download_dir.glob("*.json"), key=lambda f: f.stat().st_mtime)
        for old in files[: max(0, len(files) - self.max_downloads)]:
            old.unlink(missing_ok=True)
        return str(path)

    # --- JSON API (gradio_client) ---------------------------------------------------

    def predict(self, prompt: str, k: int = DEFAULTS.top_k) -> dict:
        """Top-k next tokens with probabilities at the final position."""
        return self.runner.run(predict, prompt, k).to_dict()

    def logit_lens(self, prompt: str, target: str = "") -> dict:
        """Logit lens: top-1 token/probability per (checkpoint, position); P and rank of target if given."""
        return self.runner.run(logit_lens, prompt, target or None).to_dict()

    def dla(self, prompt: str, target: str, competing: str = "") -> dict:
        """Direct logit attribution of logit(target) [- logit(competing)] at the final position."""
        return self.runner.run(direct_logit_attribution, prompt, target, competing or None).to_dict()

    def attention(self, prompt: str, layer: int) -> dict:
        """Every head's attention pattern [head][dest][src] in one layer."""
        return self.runner.run(attention_patterns, prompt, layer).to_dict()

    def induction(
        self, seq_len: int = DEFAULTS.induction_seq_len, batch: int = DEFAULTS.induction_batch, seed: int = DEFAULTS.induction_seed
    ) -> dict:
        """Induction, previous-token and duplicate-token scores per head on repeated random tokens."""
        return self.runner.run(induction_scores, seq_len, batch, seed).to_dict()

    def patching(self, clean_prompt: str, corrupted_prompt: str, answer: str, wrong_answer: str) -> dict:
        """Activation patching, exact (resid_pre, attn_out, mlp_out by layer x pos; head_out by layer x head)."""
        return self.runner.run(activation_patching, clean_prompt, corrupted_prompt, answer, wrong_answer).to_dict()

    def attribution_patching(self, clean_prompt: str, corrupted_prompt: str, answer: str, wrong_answer: str) -> dict:
        """Attribution patching: an APPROXIMATION of /patching (same keys, plus "approximate": true)."""
        return self.runner.run(attribution_patching, clean_prompt, corrupted_prompt, answer, wrong_answer).to_dict()

    # --- UI events -------------------------------------------------------------------

    def explore(self, prompt: str, target: str, competing: str, layer: int, head: int = 0, persist: bool = False):
        """Prompt Explorer: predictions, logit lens, DLA and one layer's attention (one head large, all heads small)."""
        top = self.runner.run(predict, prompt, DEFAULTS.top_k, persist=persist)
        target = target or top.top_tokens[0]  # default: the model's own top prediction
        lens = self.runner.run(logit_lens, prompt, target, persist=persist)
        dla = self.runner.run(direct_logit_attribution, prompt, target, competing or None, persist=persist)
        attention = self.runner.run(attention_patterns, prompt, layer, persist=persist)
        data = {"predictions": top.to_dict(), "logit_lens": lens.to_dict(), "dla": dla.to_dict(), "attention": attention.to_dict()}
        return (
            plots.top_predictions(top),
            plots.logit_lens_heatmap(lens),
            plots.logit_lens_final(lens),
            plots.dla_heads(dla),
            plots.dla_components(dla),
            *self._attention_figures(attention, head),
            self._download("prompt-explorer", data),
        )

    @staticmethod
    def _attention_figures(attention, head):
        return plots.attention_head(attention, _whole(head)), plots.attention_heads(attention)

    def attention_figures(self, prompt: str, layer: int, head: int):
        return self._attention_figures(self.runner.run(attention_patterns, prompt, layer), head)

    def contrast_steps(self, clean: str, corrupted: str, answer: str, wrong: str, persist: bool = False, progress=None):
        """Contrast Pairs, in two steps: first the approximate preview (attribution patching) with
        both prompts' logit lens, then exact activation patching beside it, their agreement, and DLA.
        Each step is (status line, summary, figures..., download)."""
        approximate = self.runner.run(attribution_patching, clean, corrupted, answer, wrong, persist=persist)
        lenses = {
            f"clean: ...{plots.escape_token(clean[-40:])}": (
                self.runner.run(logit_lens, clean, answer, persist=persist),
                self.runner.run(logit_lens, clean, wrong, persist=persist),
            ),
            f"corrupted: ...{plots.escape_token(corrupted[-40:])}": (
                self.runner.run(logit_lens, corrupted, answer, persist=persist),
                self.runner.run(logit_lens, corrupted, wrong, persist=persist),
            ),
        }
        lens = plots.contrast_lens(lenses)
        approximate_maps = [plots.patching_heatmap(approximate, name) for name in SWEEPS]
        values = (
            f"**logit({_literal(repr(answer))}) − logit({_literal(repr(wrong))})**: clean **{approximate.clean_value:+.3f}**, "
            f"corrupted **{approximate.corrupted_value:+.3f}**, swing **{approximate.swing:+.3f}**. "
            "Patching scores: 1 = clean behaviour restored, 0 = no effect."
        )
        if approximate.swing_warning:
            values += f"\n\n⚠️ **Small swing.** {approximate.swing_warning}"
        yield (
            "**Running:** showing the **approximate preview** (attribution patching, right); exact activation patching is running…",
            values, lens, *[None] * len(SWEEPS), *approximate_maps, None, None, None,
        )
        report = None if progress is None else (lambda fraction, desc: progress(fraction, desc=desc))
        exact = self.runner.run(activation_patching, clean, corrupted, answer, wrong, progress=report, persist=persist)
        stats = agreement(exact, approximate)
        rows = "\n".join(f"| {name} | {_r(s['pearson_r'])} | {_r(s['slope'])} | {s['top_k_overlap']}/{s['top_k']} |" for name, s in stats.items())
        summary = (
            f"{values}\n\nPearson r (head patching vs head DLA) = **{_r(exact.pearson_r)}**. "
            "Exact activation patching (left) is the result; attribution patching (right) is its linear "
            "approximation. How well they agree (slope: approximate ≈ slope × exact, 1 = the right size):\n\n"
            "| sweep | Pearson r | slope | top-10 overlap |\n|---|---:|---:|---:|\n" + rows
        )
        data = {"exact": exact.to_dict(), "approximate": approximate.to_dict(), "agreement": stats}
        limits = {name: plots.shared_limit(getattr(exact, name), getattr(approximate, name)) for name in SWEEPS}
        yield (  # exact and approximate side by side on one colour scale per sweep, so sizes compare
            "**Done:** exact activation patching (left) beside its approximation (right), on one colour scale per sweep.",
            summary,
            lens,
            *[plots.patching_heatmap(exact, name, limits[name]) for name in SWEEPS],
            *[plots.patching_heatmap(approximate, name, limits[name]) for name in SWEEPS],
            plots.approximation_vs_exact(exact, approximate, stats),
            plots.dla_vs_patching(exact),
            self._download("contrast-pair", data),
        )

    def contrast(self, clean: str, corrupted: str, answer: str, wrong: str, persist: bool = False, progress=None):
        """Contrast Pairs' final outputs (what /contrast returns to gradio_client)."""
        *_, final = self.contrast_steps(clean, corrupted, answer, wrong, persist=persist, progress=progress)
        return final

    def circuit_map(self, seq_len: int, batch: int, seed: int, persist: bool = False, progress=None):
        """Circuit Map: head scores on repeated random sequences, heads above the threshold."""
        report = None if progress is None else (lambda fraction, desc: progress(fraction, desc=desc))
        result = self.runner.run(induction_scores, _whole(seq_len), _whole(batch), _whole(seed), progress=report, persist=persist)
        heads = [[f"L{h['layer']}H{h['head']}", round(h["score"], 4)] for h in result.induction_heads]
        return (
            plots.induction_heatmap(result),
            plots.induction_heatmap(result, "previous-token"),
            plots.induction_heatmap(result, "duplicate-token"),
            plots.induction_layer_max(result),
            plots.loss_by_position(result),
            heads,
            self._download("circuit-map", result.to_dict()),
        )


def _literal(text: str) -> str:
    """User text inside Markdown, shown as typed: every Markdown and HTML character escaped, so a
    token such as '[' or '](' or '<b>' cannot turn the summary into a link or markup."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~&])", r"\\\1", text)


def _r(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _whole(value):
    """gr.Number sends floats; pass whole numbers on as int and let core judge the range."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def example_rows(model: Model) -> dict[str, tuple[list[str], list[list]]]:
    """Each tab's examples as (labels, input rows), fitted to the model (layer, context length)."""
    longest = max_seq_len(model)
    explorer = [
        ex | {"layer": min(ex["layer"], model.cfg.n_layers - 1), "head": min(ex.get("head", 0), model.cfg.n_heads - 1)}
        for ex in EXAMPLES["explorer"]
    ]
    circuit = [  # an example longer than the model's context is shown shortened, and says so
        ex if ex["seq_len"] <= longest else ex | {"seq_len": longest, "name": f"{ex['name']} (seq_len {longest}: this model's context)"}
        for ex in EXAMPLES["circuit_map"]
    ]
    return {
        "explorer": ([ex["name"] for ex in explorer], [[ex["prompt"], ex["target"], ex["competing"], ex["layer"], ex.get("head", 0)] for ex in explorer]),
        "contrast": ([ex["name"] for ex in EXAMPLES["contrast"]], [[ex["clean"], ex["corrupted"], ex["answer"], ex["wrong"]] for ex in EXAMPLES["contrast"]]),
        "circuit_map": ([ex["name"] for ex in circuit], [[ex["seq_len"], ex["batch"], ex["seed"]] for ex in circuit]),
    }


def warm_examples(handlers: Handlers, say=None) -> None:
    """Compute every example once (or load it from disk), so clicking one answers at once.
    `say(line)`, if given, hears one line per example: which, and whether it was computed or cached."""
    rows = example_rows(handlers.runner.model)
    work = [
        (name, handler, row)
        for tab, handler in (("explorer", handlers.explore), ("contrast", handlers.contrast), ("circuit_map", handlers.circuit_map))
        for name, row in zip(*rows[tab])
    ]
    for i, (name, handler, row) in enumerate(work, 1):
        computed, start = handlers.runner.computed, time.perf_counter()
        handler(*row, persist=True)
        if say is not None:
            how = "from the cache" if handlers.runner.computed == computed else f"computed in {time.perf_counter() - start:.1f} s"
            say(f"warming examples {i}/{len(work)}: {name} ({how})")


# --- layout -------------------------------------------------------------------------


def _listed_only(fn, rows):
    """`fn` for example clicks only: arguments that are not one of `rows` are refused (an example event
    is a route any client can call; it must not carry arbitrary work around the Run buttons' checks)."""
    allowed = [[_whole(value) for value in row] for row in rows]

    def check(args):
        if [_whole(value) for value in args[: len(allowed[0])]] not in allowed:
            raise ValueError("An example event runs only the listed examples: use the Run button for your own input.")

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def steps(*args, **kwargs):
            check(args)
            yield from fn(*args, **kwargs)

        return steps

    @functools.wraps(fn)
    def run(*args, **kwargs):
        check(args)
        return fn(*args, **kwargs)

    return run


def _examples(rows, labels, inputs, outputs, fn, api_name: str, lane: dict) -> gr.Examples:
    """Clicking an example fills the inputs and runs the handler, which answers from the runner's warm
    cache (our cache, keyed by model and code, instead of Gradio's, which is keyed by component id and
    can go stale). The run is our own event: in the tab's lane, and for the listed examples only."""
    examples = gr.Examples(
        rows, inputs=inputs, cache_examples=False, example_labels=labels, api_name=f"{api_name}_load", api_visibility="private",
    )
    examples.load_input_event.then(
        user_errors(_listed_only(fn, rows)), inputs, outputs, api_name=api_name, api_visibility="private", **lane, **RAW
    )
    return examples


def _validator(h: Handlers, errors_of, names: list[str]):
    """A Gradio validator: core's checks of the inputs (tokenizing only, no forward pass), each message
    shown on its own field before the run starts, so a bad input never replaces the results shown.
    When the model stays busy for a moment the run itself checks (and reports) instead."""

    def validate(*values):
        errors = h.runner.check(errors_of, *values[: len(names)]) or {}
        return [gr.validate(name not in errors, errors.get(name, "")) for name in names] + [
            gr.validate(True, "") for _ in values[len(names):]
        ]

    return validate


def _about(text: str) -> None:
    """Two or three sentences on what a section computes and how to read it, folded away."""
    with gr.Accordion("What is this? How to read it", open=False, elem_classes="about"):
        gr.Markdown(text)


ABOUT = {
    "lens": (
        "The **logit lens** decodes the residual stream after every layer with the model's final LayerNorm and "
        "unembedding, as if the model stopped there. Each cell shows the top-1 token and (colour) its probability; the "
        "line below follows the target token at the final position. Look for the layer where the answer takes over: "
        "GPT-2 Small settles on ' Paris' for the Eiffel Tower in its later layers. "
        "([nostalgebraist, 2020](https://www.lesswrong.com/posts/AcKRB8wDpdaN6v6ru/interpreting-gpt-the-logit-lens))"
    ),
    "dla": (
        "**Direct logit attribution** splits the final logit of the target (or target minus competing token) into what "
        "each head, MLP, embedding and bias writes straight into the residual stream, scaled by the final LayerNorm: the "
        "parts add up to the model's own logit. Blue pushes towards the target, red against. Look for the few heads that "
        "carry most of it, e.g. the name movers L9H9 and L10H0 on IOI. ([Elhage et al., 2021]"
        "(https://transformer-circuits.pub/2021/framework/index.html); [Wang et al., 2022](https://arxiv.org/abs/2211.00593))"
    ),
    "attention": (
        "Each row is a **destination** token (the query), each column a **source** token it reads from; a row sums to 1. "
        "Pick a head for a large labelled view; the small maps show every head of the layer. Look for previous-token heads "
        "(a stripe just below the diagonal), induction heads (attending to the token after an earlier copy of the current "
        "one) and heads resting on the first token. ([Olsson et al., 2022]"
        "(https://transformer-circuits.pub/2022/in-context-learning-and-induction-heads/index.html))"
    ),
    "patching": (
        "**Activation patching** runs the corrupted prompt with one activation at a time replaced by its value from the "
        "clean prompt, and scores how much of the clean logit difference comes back: 1 = all of it, 0 = none. Left: the "
        "exact result. Right: **attribution patching**, a fast first-order approximation (gradient x activation "
        "difference) that can be wrong in size or sign; the table says how well it matched. On IOI, look for the second "
        "subject name mattering in early layers and the final position in late ones. ([Meng et al., 2022]"
        "(https://arxiv.org/abs/2202.05262); [Wang et al., 2022](https://arxiv.org/abs/2211.00593); "
        "[Heimersheim & Nanda, 2024](https://arxiv.org/abs/2404.15255); "
        "[Nanda, 2023](https://www.neelnanda.io/mechanistic-interpretability/attribution-patching))"
    ),
    "induction": (
        "A sequence of random tokens is repeated twice. An **induction head** at a token of the second copy attends to the "
        "token that followed the same token in the first copy (its score is that attention, averaged; 0 to 1), and the "
        "model's loss drops on the second copy. Previous-token heads attend one token back; duplicate-token heads to the "
        "earlier copy of the same token. In GPT-2 Small look for induction heads in layers 5-7 (L5H1, L5H5, L6H9, L7H2). "
        "([Olsson et al., 2022](https://transformer-circuits.pub/2022/in-context-learning-and-induction-heads/index.html))"
    ),
}
SPACE_HINT = "GPT-2 tokens usually start with a space: ' Paris', not 'Paris'. Figures show a space as ␣."
WIDE = dict(min_width=420)  # side-by-side figures stack on screens narrower than two of these (a phone)


def build_prompt_explorer(h: Handlers, model: Model):
    labels, rows = example_rows(model)["explorer"]
    first = rows[0]
    initial = h.explore(*first, persist=True)
    with gr.Row():
        prompt = gr.Textbox(value=first[0], label="Prompt", lines=2, scale=3)
        with gr.Column(scale=2, min_width=240):
            target = gr.Textbox(value=first[1], label="Target token (empty: the model's top prediction)", info=SPACE_HINT)
            competing = gr.Textbox(value=first[2], label="Competing token (optional: DLA of the difference)")
    with gr.Row():
        layer = gr.Slider(0, model.cfg.n_layers - 1, value=first[3], step=1, label="Attention layer", min_width=200)
        head = gr.Slider(0, model.cfg.n_heads - 1, value=first[4], step=1, label="Attention head (large view)", min_width=200)
        run = gr.Button("Run", variant="primary", min_width=120)
    predictions = gr.Plot(value=initial[0], label="Top predictions", render=False)
    lens_final = gr.Plot(value=initial[2], label="Logit lens: final position", render=False)
    lens_heatmap = gr.Plot(value=initial[1], label="Logit lens: every position", render=False)
    dla_heads = gr.Plot(value=initial[3], label="DLA per head", render=False)
    dla_components = gr.Plot(value=initial[4], label="DLA: MLPs, embeddings, biases", render=False)
    attention_head = gr.Plot(value=initial[5], label="Attention: one head", render=False)
    attention = gr.Plot(value=initial[6], label="Attention: every head", render=False)
    download = gr.File(value=initial[7], label="Download all results (JSON)", render=False)
    inputs = [prompt, target, competing, layer, head]
    outputs = [predictions, lens_heatmap, lens_final, dla_heads, dla_components, attention_head, attention, download]
    events = LIGHT | RAW | dict(validator=_validator(h, explorer_errors, ["prompt", "target", "competing"]))
    run.click(user_errors(h.explore), inputs, outputs, api_name="explore", **events)
    prompt.submit(user_errors(h.explore), inputs, outputs, api_name="explore_submit", api_visibility="private", **events)
    for slider in (layer, head):
        slider.release(
            user_errors(h.attention_figures), [prompt, layer, head], [attention_head, attention],
            api_name=f"attention_{'layer' if slider is layer else 'head'}", api_visibility="private", **LIGHT, **RAW,
        )
    _examples(rows, labels, inputs, outputs, h.explore, "explore_example", LIGHT)
    with gr.Row():
        predictions.render()
        lens_final.render()
    lens_heatmap.render()
    _about(ABOUT["lens"])
    with gr.Row():
        dla_heads.render()
        dla_components.render()
    _about(ABOUT["dla"])
    with gr.Row():
        attention_head.render()
        attention.render()
    _about(ABOUT["attention"])
    download.render()


def build_contrast_pairs(h: Handlers, model: Model):
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
    status = gr.Markdown(initial[0], elem_id="contrast-status", render=False)
    summary = gr.Markdown(initial[1], elem_id="contrast-summary", render=False)
    lens = gr.Plot(initial[2], label="Logit lens, both prompts", render=False)
    exact, approximate = {}, {}
    for i, name in enumerate(SWEEPS):
        exact[name] = gr.Plot(initial[3 + i], label=f"Exact: {name}", render=False, **WIDE)
        approximate[name] = gr.Plot(initial[3 + len(SWEEPS) + i], label=f"Approximate: {name}", render=False, **WIDE)
    agreement_plot = gr.Plot(initial[-3], label="Approximate vs exact", render=False, **WIDE)
    scatter = gr.Plot(initial[-2], label="DLA vs patching", render=False, **WIDE)
    download = gr.File(initial[-1], label="Download results (JSON: exact, approximate, agreement)", render=False)
    inputs = [clean, corrupted, answer, wrong]
    outputs = [status, summary, lens, *exact.values(), *approximate.values(), agreement_plot, scatter, download]

    def contrast(clean, corrupted, answer, wrong, progress=gr.Progress()):
        yield from h.contrast_steps(clean, corrupted, answer, wrong, progress=progress)

    run.click(
        user_errors(contrast), inputs, outputs, api_name="contrast", show_progress_on=[status],
        validator=_validator(h, pair_errors, ["clean_prompt", "corrupted_prompt", "answer", "wrong_answer"]), **HEAVY, **RAW,
    )
    _examples(rows, labels, inputs, outputs, contrast, "contrast_example", HEAVY)
    status.render()
    summary.render()
    _about(ABOUT["patching"])
    lens.render()
    with gr.Tabs(elem_id="sweeps"):  # one sweep at a time keeps the page short; exact left, approximate right
        for name in SWEEPS:
            with gr.Tab(name, id=name), gr.Row():
                exact[name].render()
                approximate[name].render()
    with gr.Row():
        agreement_plot.render()
        scatter.render()
    download.render()


def build_circuit_map(h: Handlers, model: Model):
    labels, rows = example_rows(model)["circuit_map"]
    first = rows[0]
    initial = h.circuit_map(*first, persist=True)
    longest = max_seq_len(model)
    with gr.Row():
        seq_len = gr.Number(value=first[0], precision=0, label=f"seq_len (2-{longest})", min_width=120)
        batch = gr.Number(value=first[1], precision=0, label=f"batch (1-{LIMITS.max_induction_batch})", min_width=120)
        seed = gr.Number(value=first[2], precision=0, label="seed", min_width=120)
        run = gr.Button("Compute head scores", variant="primary", min_width=160)
    induction = gr.Plot(initial[0], label="Induction scores", render=False, **WIDE)
    previous = gr.Plot(initial[1], label="Previous-token scores", render=False, **WIDE)
    duplicate = gr.Plot(initial[2], label="Duplicate-token scores", render=False, **WIDE)
    layer_max = gr.Plot(initial[3], label="Per-layer maximum", render=False, **WIDE)
    loss = gr.Plot(initial[4], label="Loss by position", render=False)
    heads = gr.Dataframe(initial[5], headers=["head", "induction score"], label="Induction heads", interactive=False, render=False)
    download = gr.File(initial[6], label="Download results (JSON)", render=False)
    inputs = [seq_len, batch, seed]
    outputs = [induction, previous, duplicate, layer_max, loss, heads, download]

    def circuit_map(seq_len, batch, seed, progress=gr.Progress()):
        return h.circuit_map(seq_len, batch, seed, progress=progress)

    run.click(
        user_errors(circuit_map), inputs, outputs, api_name="circuit_map",
        validator=_validator(h, induction_errors, ["seq_len", "batch", "seed"]), **HEAVY, **RAW,
    )
    _examples(rows, labels, inputs, outputs, circuit_map, "circuit_map_example", HEAVY)
    gr.Markdown(
        f"Heads scoring above **{DEFAULTS.induction_threshold}** are listed as induction heads. One request reads at most "
        f"{LIMITS.max_induction_tokens:,} tokens, batch x (2 x seq_len + 1): seq_len {longest} allows batch "
        f"{LIMITS.max_induction_tokens // (2 * longest + 1)}."
    )
    _about(ABOUT["induction"])
    with gr.Row():
        induction.render()
        layer_max.render()
    with gr.Row():
        previous.render()
        duplicate.render()
    loss.render()
    heads.render()
    download.render()


def build_api(h: Handlers):
    """JSON endpoints for gradio_client, one per technique (README lists them)."""
    for name in ("predict", "logit_lens", "dla", "attention"):
        gr.api(user_errors(getattr(h, name)), api_name=name, **LIGHT)
    for name in ("induction", "patching", "attribution_patching"):
        gr.api(user_errors(getattr(h, name)), api_name=name, **HEAVY)


def build_demo(
    model: Model | None = None, runner: Runner | None = None, warm: bool = True, notice: str | None = None, say=None
) -> gr.Blocks:
    """The whole app around `model` (default: the configured model, or the demo model when it cannot
    be loaded). `warm` precomputes every example; `notice` is shown at the top of the page;
    `say(line)` hears start-up progress."""
    if model is None and runner is None:
        model, notice = load_with_fallback(Settings.from_env().model)
    runner = runner or Runner(model)
    runner.still_wanted = serving.event_wanted
    model = runner.model
    downloads, downloads_off = download_folder()
    handlers = Handlers(runner, downloads)
    if warm:
        warm_examples(handlers, say)
    with gr.Blocks(title="CircuitBreaker", delete_cache=(600, 3600)) as demo:  # served files: hourly clean-up
        gr.Markdown(
            f"# CircuitBreaker\nWatch **{model_label(model)}** ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads) "
            "think: logit lens, direct logit attribution, attention, induction heads and activation patching."
        )
        if notice:  # one short line; the reason and what to do sit folded below it
            gr.Markdown(f"⚠️ This is the small **demo model** bundled with CircuitBreaker, not {DEFAULTS.model_name}.", elem_id="model-notice")
            with gr.Accordion("Why, and how to get GPT-2", open=False):
                gr.Textbox(notice, show_label=False, interactive=False, container=False, lines=2)
        if downloads_off:
            gr.Markdown(f"⚠️ JSON downloads are off: {downloads_off} Every result is still shown.", elem_id="downloads-notice")
        with gr.Tabs():
            with gr.Tab("Prompt Explorer", id="explorer"):
                build_prompt_explorer(handlers, model)
            with gr.Tab("Contrast Pairs", id="contrast"):
                build_contrast_pairs(handlers, model)
            with gr.Tab("Circuit Map", id="circuit_map"):
                build_circuit_map(handlers, model)
        build_api(handlers)
    # api_open=False: every call goes through the queue and its lanes (gradio_client uses the queue
    # too); Gradio would otherwise leave /gradio_api/run/<name> open, which skips both.
    demo.queue(default_concurrency_limit=1, max_size=LIMITS.max_queue_size, api_open=False)
    serving.guard_queue(demo, LIMITS.max_requests_per_client)
    return demo


def download_folder() -> tuple[str | None, str | None]:
    """(a new folder for this start's JSON downloads, removed at exit; None and why when the temporary
    folder cannot take one: full or read-only. The app starts either way.)"""
    folder = None
    try:
        folder = tempfile.mkdtemp(prefix="circuitbreaker-downloads-")
        write_whole(Path(folder) / "probe", b"{}")  # a folder can be made on a full disk; a file cannot
        (Path(folder) / "probe").unlink()
    except OSError as err:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return None, f"the server's temporary folder ({tempfile.gettempdir()}) cannot take files ({err.strerror or err})."
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # no directory left behind per start
    return folder, None


# --- running it ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULTS.model_name
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> "Settings":
        env = os.environ
        parser = argparse.ArgumentParser(description="CircuitBreaker: mechanistic interpretability of GPT-2 Small.")
        parser.add_argument("--model", default=env.get("CIRCUITBREAKER_MODEL", cls.model), help="model name or local HF model directory")
        parser.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", cls.host))
        parser.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", cls.port)))
        parser.add_argument("--share", action="store_true", default=env.get("CIRCUITBREAKER_SHARE") == "1")
        args = parser.parse_args([] if argv is None else argv)
        return cls(model=args.model, host=args.host, port=args.port, share=args.share)


def say(line: str) -> None:
    """One start-up progress line on the console."""
    print(f"CircuitBreaker: {line}", flush=True)


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    say(f"loading {settings.model} from {describe_source(settings.model)} ...")
    try:
        model, notice = load_with_fallback(settings.model)
    except ModelLoadError as err:
        raise SystemExit(f"CircuitBreaker: {err}") from None
    if notice:
        say(notice)
    say(
        f"loaded {model_label(model)} ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads) in {time.perf_counter() - start:.1f} s; "
        "checking every example against the cache (a first start computes them: a few minutes for GPT-2 on a CPU)"
    )
    demo = build_demo(model, notice=notice, say=say)
    say(f"ready in {time.perf_counter() - start:.1f} s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a Space stopping or Ctrl-C: finish running requests first
        signal.signal(sig, lambda *_: stop.set())
    demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share, footer_links=["api"],
        prevent_thread_lock=True, **launch_options(),
    )
    while not stop.wait(0.5):
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C (or SIGTERM) stops at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    say(f"stopping: refusing new requests, finishing the running ones (at most {LIMITS.drain_s:.0f} s) ...")
    finished = serving.drain(demo, LIMITS.drain_s)
    demo.close()
    say("stopped" if finished else f"stopped; requests still running after {LIMITS.drain_s:.0f} s were cut off")


@functools.cache
def _module_demo() -> gr.Blocks:
    return build_demo()


def __getattr__(name: str):
    """`app.demo` (for `gradio app.py` reload mode) is built on first use, not on import, and once."""
    if name == "demo":
        return _module_demo()
    raise AttributeError(name)


if __name__ == "__main__":
    main()
