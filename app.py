"""CircuitBreaker: the Gradio app. Wiring only: handlers read widgets, call `core` through a
Runner (one model, one lock, cached results), and return figures and JSON.

    python app.py [--model NAME_OR_DIR] [--host HOST] [--port PORT] [--share]

Environment (for a Hugging Face Space): CIRCUITBREAKER_MODEL, GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT, CIRCUITBREAKER_SHARE=1.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TQDM_DISABLE", "1")

import gradio as gr  # noqa: E402

from core import (  # noqa: E402
    DEFAULTS,
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
from core.induction import max_seq_len  # noqa: E402
from core.model import Model, load_with_fallback, model_label  # noqa: E402
from core.runner import Runner  # noqa: E402

EXAMPLES = json.loads((Path(__file__).resolve().parent / "examples" / "prompts.json").read_text(encoding="utf-8"))
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# Two queues, one running request each: quick techniques never wait behind a line of heavy ones
# (they wait at most for the one heavy request running, which the limits in core/config.py keep
# short). Both still take turns on the model itself (Runner's lock: hooks live on the model).
LIGHT = dict(concurrency_id="light", concurrency_limit=1)  # predictions, logit lens, DLA, attention
HEAVY = dict(concurrency_id="heavy", concurrency_limit=1)  # patching (both kinds), induction
RAW = dict(preprocess=False)  # widgets hand over what was sent; core validates it with a clear message
MAX_DOWNLOADS = 256  # JSON downloads kept on disk (oldest removed first)


def user_errors(fn):
    """Core raises ValueError with a sentence a person can act on; show it as a Gradio error."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def steps(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ValueError as err:
                raise gr.Error(str(err), print_exception=False) from None

        return steps

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapper


class Handlers:
    """Thin handlers: widgets in, core results through the runner, figures/JSON out."""

    def __init__(self, runner: Runner, download_dir: str):
        self.runner = runner
        self.download_dir = Path(download_dir)

    def _download(self, stem: str, data: dict) -> str:
        """Write `data` as JSON; the name is the content's hash, so repeats do not pile up files."""
        text = json.dumps(data, ensure_ascii=False)
        path = self.download_dir / f"{stem}-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}.json"
        if not path.exists():
            path.write_text(text, encoding="utf-8")
            files = sorted(self.download_dir.glob("*.json"), key=lambda f: f.stat().st_mtime)
            for old in files[: max(0, len(files) - MAX_DOWNLOADS)]:
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

    def explore(self, prompt: str, target: str, competing: str, layer: int, persist: bool = False):
        """Prompt Explorer: predictions, logit lens, DLA and one layer's attention."""
        top = self.runner.run(predict, prompt, DEFAULTS.top_k, persist=persist)
        target = target or top.top_tokens[0]  # default: the model's own top prediction
        lens = self.runner.run(logit_lens, prompt, target, persist=persist)
        dla = self.runner.run(direct_logit_attribution, prompt, target, competing or None, persist=persist)
        attention = self.runner.run(attention_patterns, prompt, layer, persist=persist)
        data = {"predictions": top.to_dict(), "logit_lens": lens.to_dict(), "dla": dla.to_dict(), "attention": attention.to_dict()}
        return (
            {repr(token): float(p) for token, p in zip(top.top_tokens, top.top_probs)},
            plots.logit_lens_heatmap(lens),
            plots.logit_lens_final(lens),
            plots.dla_heads(dla),
            plots.dla_components(dla),
            plots.attention_heads(attention),
            self._download("prompt-explorer", data),
        )

    def attention_figure(self, prompt: str, layer: int):
        return plots.attention_heads(self.runner.run(attention_patterns, prompt, layer))

    def contrast_steps(self, clean: str, corrupted: str, answer: str, wrong: str, persist: bool = False, progress=None):
        """Contrast Pairs, in two steps: first the approximate preview (attribution patching) with
        both prompts' logit lens, then exact activation patching beside it, their agreement, and DLA."""
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
            f"**logit({answer!r}) − logit({wrong!r})**: clean **{approximate.clean_value:+.3f}**, "
            f"corrupted **{approximate.corrupted_value:+.3f}**, swing **{approximate.clean_value - approximate.corrupted_value:+.3f}**. "
            "Patching scores: 1 = clean behaviour restored, 0 = no effect."
        )
        yield (
            values + "\n\nShowing the **approximate preview** (attribution patching); exact activation patching is running…",
            lens, *[None] * len(SWEEPS), *approximate_maps, None, None, None,
        )
        report = None if progress is None else (lambda fraction, desc: progress(fraction, desc=desc))
        exact = self.runner.run(activation_patching, clean, corrupted, answer, wrong, progress=report, persist=persist)
        stats = agreement(exact, approximate)
        rows = "\n".join(f"| {name} | {_r(s['pearson_r'])} | {_r(s['slope'])} | {s['top_k_overlap']}/{s['top_k']} |" for name, s in stats.items())
        summary = (
            f"{values} Pearson r (head patching vs head DLA) = **{_r(exact.pearson_r)}**.\n\n"
            "Exact activation patching (left) is the result; attribution patching (right) is its linear "
            "approximation. How well they agree (slope: approximate ≈ slope × exact, 1 = the right size):\n\n"
            "| sweep | Pearson r | slope | top-10 overlap |\n|---|---:|---:|---:|\n" + rows
        )
        data = {"exact": exact.to_dict(), "approximate": approximate.to_dict(), "agreement": stats}
        limits = {name: plots.shared_limit(getattr(exact, name), getattr(approximate, name)) for name in SWEEPS}
        yield (  # exact and approximate side by side on one colour scale per sweep, so sizes compare
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

    def circuit_map(self, seq_len: int, batch: int, seed: int, persist: bool = False):
        """Circuit Map: head scores on repeated random sequences, heads above the threshold."""
        result = self.runner.run(induction_scores, _whole(seq_len), _whole(batch), _whole(seed), persist=persist)
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


def _r(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _whole(value):
    """gr.Number sends floats; pass whole numbers on as int and let core judge the range."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def example_rows(model: Model) -> dict[str, tuple[list[str], list[list]]]:
    """Each tab's examples as (labels, input rows), fitted to the model (layer, context length)."""
    longest = max_seq_len(model)
    explorer = [ex | {"layer": min(ex["layer"], model.cfg.n_layers - 1)} for ex in EXAMPLES["explorer"]]
    circuit = [  # an example longer than the model's context is shown shortened, and says so
        ex if ex["seq_len"] <= longest else ex | {"seq_len": longest, "name": f"{ex['name']} (seq_len {longest}: this model's context)"}
        for ex in EXAMPLES["circuit_map"]
    ]
    return {
        "explorer": ([ex["name"] for ex in explorer], [[ex["prompt"], ex["target"], ex["competing"], ex["layer"]] for ex in explorer]),
        "contrast": ([ex["name"] for ex in EXAMPLES["contrast"]], [[ex["clean"], ex["corrupted"], ex["answer"], ex["wrong"]] for ex in EXAMPLES["contrast"]]),
        "circuit_map": ([ex["name"] for ex in circuit], [[ex["seq_len"], ex["batch"], ex["seed"]] for ex in circuit]),
    }


def warm_examples(handlers: Handlers) -> None:
    """Compute every example once (or load it from disk), so clicking one answers at once."""
    rows = example_rows(handlers.runner.model)
    for tab, handler in (("explorer", handlers.explore), ("contrast", handlers.contrast), ("circuit_map", handlers.circuit_map)):
        for row in rows[tab][1]:
            handler(*row, persist=True)


# --- layout -------------------------------------------------------------------------


def _examples(rows, labels, inputs, outputs, fn, api_name: str) -> gr.Examples:
    """Clicking an example runs the handler, which answers from the runner's warm cache (our cache,
    keyed by model and code, instead of Gradio's, which is keyed by component id and can go stale)."""
    return gr.Examples(
        rows, inputs=inputs, outputs=outputs, fn=user_errors(fn), run_on_click=True, cache_examples=False,
        example_labels=labels, api_name=api_name, api_visibility="private",
    )


def build_prompt_explorer(h: Handlers, model: Model):
    labels, rows = example_rows(model)["explorer"]
    first = rows[0]
    initial = h.explore(*first, persist=True)
    with gr.Row():
        prompt = gr.Textbox(value=first[0], label="Prompt", lines=2, scale=3)
        with gr.Column(scale=1):
            target = gr.Textbox(value=first[1], label="Target token (empty: the model's top prediction)")
            competing = gr.Textbox(value=first[2], label="Competing token (optional: DLA of the difference)")
    with gr.Row():
        layer = gr.Slider(0, model.cfg.n_layers - 1, value=first[3], step=1, label="Attention layer")
        run = gr.Button("Run", variant="primary")
    with gr.Row():
        predictions = gr.Label(value=initial[0], num_top_classes=DEFAULTS.top_k, label="Top predictions (final position)")
        lens_final = gr.Plot(value=initial[2], label="Logit lens, final position")
    lens_heatmap = gr.Plot(value=initial[1], label="Logit lens, every position")
    with gr.Row():
        dla_heads = gr.Plot(value=initial[3], label="DLA per head")
        dla_components = gr.Plot(value=initial[4], label="DLA: MLPs, embeddings, biases")
    attention = gr.Plot(value=initial[5], label="Attention patterns")
    download = gr.File(value=initial[6], label="Download all results (JSON)")
    inputs = [prompt, target, competing, layer]
    outputs = [predictions, lens_heatmap, lens_final, dla_heads, dla_components, attention, download]
    events = LIGHT | RAW
    run.click(user_errors(h.explore), inputs, outputs, api_name="explore", **events)
    prompt.submit(user_errors(h.explore), inputs, outputs, api_name="explore_submit", api_visibility="private", **events)
    layer.release(
        user_errors(h.attention_figure), [prompt, layer], attention, api_name="attention_layer", api_visibility="private", **events
    )
    _examples(rows, labels, inputs, outputs, h.explore, "explore_example")  # after the events: it reuses the fn's name


def build_contrast_pairs(h: Handlers, model: Model):
    labels, rows = example_rows(model)["contrast"]
    first = rows[0]
    with gr.Row():
        clean = gr.Textbox(value=first[0], label="Prompt A (clean)", lines=2)
        corrupted = gr.Textbox(value=first[1], label="Prompt B (corrupted)", lines=2)
    with gr.Row():
        answer = gr.Textbox(value=first[2], label="Answer token (right for A)")
        wrong = gr.Textbox(value=first[3], label="Wrong token (right for B)")
        run = gr.Button("Run patching", variant="primary")
    summary = gr.Markdown()
    lens = gr.Plot(label="Logit lens, both prompts")
    exact, approximate = {}, {}
    for name in SWEEPS:
        with gr.Row():
            exact[name] = gr.Plot(label=f"Activation patching (exact): {name}")
            approximate[name] = gr.Plot(label=f"Attribution patching (approximate): {name}")
    agreement_plot = gr.Plot(label="Approximate vs exact")
    scatter = gr.Plot(label="DLA vs patching")
    download = gr.File(label="Download results (JSON: exact, approximate, agreement)")
    inputs = [clean, corrupted, answer, wrong]
    outputs = [summary, lens, *exact.values(), *approximate.values(), agreement_plot, scatter, download]

    def contrast(clean, corrupted, answer, wrong, progress=gr.Progress()):
        yield from h.contrast_steps(clean, corrupted, answer, wrong, progress=progress)

    run.click(user_errors(contrast), inputs, outputs, api_name="contrast", **HEAVY, **RAW)
    _examples(rows, labels, inputs, outputs, contrast, "contrast_example")


def build_circuit_map(h: Handlers, model: Model):
    labels, rows = example_rows(model)["circuit_map"]
    first = rows[0] if rows else [DEFAULTS.induction_seq_len, DEFAULTS.induction_batch, DEFAULTS.induction_seed]
    max_seq_len = (model.cfg.n_ctx - 1) // 2
    with gr.Row():
        seq_len = gr.Number(value=min(first[0], max_seq_len), precision=0, label=f"seq_len (2-{max_seq_len})")
        batch = gr.Number(value=first[1], precision=0, label=f"batch (1-{DEFAULTS.max_induction_batch})")
        seed = gr.Number(value=first[2], precision=0, label="seed")
        run = gr.Button("Compute head scores", variant="primary")
    gr.Markdown(f"Heads scoring above **{DEFAULTS.induction_threshold}** are listed as induction heads.")
    with gr.Row():
        induction = gr.Plot(label="Induction scores")
        layer_max = gr.Plot(label="Per-layer maximum")
    with gr.Row():
        previous = gr.Plot(label="Previous-token scores")
        duplicate = gr.Plot(label="Duplicate-token scores")
    loss = gr.Plot(label="Loss by position")
    heads = gr.Dataframe(headers=["head", "induction score"], label="Induction heads", interactive=False)
    download = gr.File(label="Download results (JSON)")
    inputs = [seq_len, batch, seed]
    outputs = [induction, previous, duplicate, layer_max, loss, heads, download]
    run.click(user_errors(h.circuit_map), inputs, outputs, api_name="circuit_map", **HEAVY, **RAW)
    if rows:
        _examples(rows, labels, inputs, outputs, h.circuit_map, "circuit_map_example")


def build_api(h: Handlers):
    """JSON endpoints for gradio_client, one per technique (README lists them)."""
    for name in ("predict", "logit_lens", "dla", "attention"):
        gr.api(user_errors(getattr(h, name)), api_name=name, **LIGHT)
    for name in ("induction", "patching", "attribution_patching"):
        gr.api(user_errors(getattr(h, name)), api_name=name, **HEAVY)


def build_demo(
    model: Model | None = None, runner: Runner | None = None, warm: bool = True, notice: str | None = None
) -> gr.Blocks:
    """The whole app around `model` (default: the configured model, or the demo model when it cannot
    be loaded). `warm` precomputes every example; `notice` is shown at the top of the page."""
    if model is None and runner is None:
        model, notice = load_with_fallback(Settings.from_env().model)
    runner = runner or Runner(model)
    model = runner.model
    handlers = Handlers(runner, tempfile.mkdtemp(prefix="circuitbreaker-downloads-"))
    if warm:
        warm_examples(handlers)
    with gr.Blocks(title="CircuitBreaker", delete_cache=(600, 3600)) as demo:  # served files: hourly clean-up
        gr.Markdown(
            f"# CircuitBreaker\nWatch **{model_label(model)}** ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads) "
            "think: logit lens, direct logit attribution, attention, induction heads and activation patching."
        )
        if notice:  # one short line; the reason and what to do sit folded below it
            gr.Markdown(f"⚠️ This is the small **demo model** bundled with CircuitBreaker, not {DEFAULTS.model_name}.", elem_id="model-notice")
            with gr.Accordion("Why, and how to get GPT-2", open=False):
                gr.Textbox(notice, show_label=False, interactive=False, container=False, lines=2)
        with gr.Tabs():
            with gr.Tab("Prompt Explorer", id="explorer"):
                build_prompt_explorer(handlers, model)
            with gr.Tab("Contrast Pairs", id="contrast"):
                build_contrast_pairs(handlers, model)
            with gr.Tab("Circuit Map", id="circuit_map"):
                build_circuit_map(handlers, model)
        build_api(handlers)
    demo.queue(default_concurrency_limit=1, max_size=DEFAULTS.max_queue_size)
    return demo


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


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env(sys.argv[1:] if argv is None else argv)
    try:
        model, notice = load_with_fallback(settings.model)
    except ModelLoadError as err:
        raise SystemExit(f"CircuitBreaker: {err}") from None
    if notice:
        print(f"CircuitBreaker: {notice}", flush=True)
    demo = build_demo(model, notice=notice)
    demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share, theme=THEME, footer_links=["api"])


def __getattr__(name: str):
    """`app.demo` (for `gradio app.py` reload mode) is built on first use, not on import."""
    if name == "demo":
        return build_demo()
    raise AttributeError(name)


if __name__ == "__main__":
    main()
