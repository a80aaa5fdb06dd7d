"""What every tab's wiring shares: the two lanes, the error wrapper, examples, validators, the
"What is this?" texts. No model, no maths."""

from __future__ import annotations

import functools
import inspect
import json
import re

import gradio as gr
import plotly.graph_objects as go

import serving
from core.config import LIMITS
from core.model import ModelLoadError
from core.plots import message_figure
from serving.runner import ModelChanged

NOT_LOADED = (ModelLoadError, ModelChanged)  # the model failed to load behind the page: the app stops, or starts again

# Two queues: quick techniques never wait behind a line of heavy ones (they wait at most for the
# one heavy request running, which the limits in core/config.py keep short). Both take turns on the
# model itself (Runner's lock: hooks live on the model). The light lane runs as many requests as one
# batched pass answers: they wait for the model together and share its forward passes (Runner).
LIGHT = dict(concurrency_id="light", concurrency_limit=LIMITS.max_batch_calls)  # predictions, logit lens, DLA, attention, the Explorer
HEAVY = dict(concurrency_id="heavy", concurrency_limit=1)  # patching (all kinds), induction, circuits
LANES = {"light": LIGHT, "heavy": HEAVY}  # a technique's declared lane (core.registry) -> its queue
RAW = dict(preprocess=False)  # widgets hand over what was sent; core validates it with a clear message


def user_errors(fn):
    """Core raises ValueError with a sentence a person can act on; show it as a Gradio error. An event
    that must not start (the server is restarting), or whose model failed to load behind the page, gets
    its sentence the same way."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def steps(*args, **kwargs):
            try:
                _may_start()
                yield from fn(*args, **kwargs)
            except ValueError as err:
                raise gr.Error(plain_text(err), print_exception=False) from None
            except NOT_LOADED as err:
                raise gr.Error(not_loaded(err), print_exception=False) from None

        return steps

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _may_start()
            return fn(*args, **kwargs)
        except ValueError as err:
            raise gr.Error(plain_text(err), print_exception=False) from None
        except NOT_LOADED as err:
            raise gr.Error(not_loaded(err), print_exception=False) from None

    return wrapper


def not_loaded(err: Exception) -> str:
    return f"The model could not be loaded: the app is starting again, or stopping. Reload this page in a minute. ({plain_text(err)})"


def _may_start() -> None:
    reason = serving.refusal()
    if reason is not None:
        raise ValueError(reason)


def plain_text(err: Exception) -> str:
    """The message safe as HTML: the page's toasts render HTML, and messages quote the user's input.
    Escaping '&' and '<' is enough (no tag can open) and leaves arrows such as '->' as they are."""
    return str(err).replace("&", "&amp;").replace("<", "&lt;")


ON_THEIR_WAY = "The example's results are on their way (the app has just started)."


WAITING = "circuitbreaker-waiting"  # a waiting figure's layout.meta: what the browser looks for (SHOW_IF_WAITING)


def waiting_figure() -> go.Figure:
    """What a figure of a tab's first example shows until the tab fills it (`fill_when_opened`, `fill_on_load`)."""
    figure = message_figure(ON_THEIR_WAY, height=240, size=14)
    figure.update_layout(meta=WAITING, margin=dict(l=10, r=10, t=10, b=10))
    return figure


def fill_when_opened(tab: gr.Tab, fill, outputs: list) -> None:
    """A tab whose first example the page was built without (a first start: the page does not wait for
    the tabs not shown first) fills it the first time it is opened in a page: `fill()` gives the outputs
    keyed by component, from the warming's cache or computed then; meanwhile its figures say the results
    are on their way (`waiting_figure`). Opened again, nothing changes (the flag is a hidden component:
    the server keeps nothing per visitor)."""
    filled = gr.JSON({"filled": False}, visible=False)

    def once(done):
        if isinstance(done, dict) and done.get("filled"):
            return {component: gr.skip() for component in [*outputs, filled]}
        return fill() | {filled: {"filled": True}}

    # In the heavy lane, which starts its events one at a time in the order they came: whatever a visitor
    # runs in the tab after opening it runs after the fill, which can never cover newer results. Without a
    # progress overlay: opening the tab again waits there for nothing, unseen.
    tab.select(user_errors(once), filled, [*outputs, filled], api_visibility="private", show_progress="hidden", **HEAVY, **RAW)


def fill_on_load(compute, fill, inputs: list, outputs: list, lane: dict) -> None:
    """The first example of the tab shown first, where the page was built without it (a first start: the
    page serves before the example is computed, or before the model has loaded): each page fills it when it
    loads, `compute(*inputs)` computing it (the runner's cache keeps it; nothing drawn) and then `fill(*inputs)`
    drawing it, from the cache, at `inputs` as they are then, into hidden copies of `outputs`; meanwhile the
    figures say the results are on their way (`waiting_figure`). The browser then shows those copies only where
    the first output still waits (`SHOW_IF_WAITING`), at the moment they arrive: a visitor's run that has
    answered by then keeps its results, one that answers later covers the example, and one that was refused
    (its input checked bad) leaves the example to fill the tab. (Gradio's cancel of a pending event came too
    late in a browser: its output still arrived after the visitor's run's.)"""
    staged = [type(component)(visible=False) for component in outputs]

    def warm(*values) -> None:  # Gradio hears nothing back: no outputs
        compute(*values)

    def draw(*values) -> dict:
        drawn = fill(*values)
        return {copy: drawn[component] for copy, component in zip(staged, outputs)}

    # no triggers: the page's load; Gradio's progress (its timer) over the figures while the model loads and computes
    loaded = gr.on(None, user_errors(warm), inputs, None, api_visibility="private", show_progress_on=outputs, **lane, **RAW)
    drawn = loaded.success(user_errors(draw), inputs, staged, api_visibility="private", show_progress="hidden", **lane, **RAW)
    drawn.success(None, [*staged, *outputs], outputs, js=SHOW_IF_WAITING, api_visibility="private", queue=False)


# (staged values..., shown values...) -> the staged ones where the first shown value is still a waiting figure
# (or empty), else the shown ones as they are: in the browser, with no request
SHOW_IF_WAITING = f"""(...values) => {{
    const half = values.length / 2, first = values[half];
    return first == null || JSON.stringify(first).includes({json.dumps(WAITING)}) ? values.slice(0, half) : values.slice(half);
}}"""


def choose_custom(pairs: gr.Textbox, task: gr.Dropdown) -> None:
    """Pairs typed or pasted are for the custom task: choose it, in the browser (no request)."""
    pairs.change(None, [pairs, task], task, js="(text, chosen) => (text ?? '').trim() ? 'custom' : chosen", api_visibility="private", queue=False)


def by_component(fn, outputs: dict):
    """`fn` returns (or yields) its outputs keyed by name; Gradio takes them keyed by component:
    `outputs` maps each name to its component, so nothing is matched by position."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def steps(*args, **kwargs):
            for values in fn(*args, **kwargs):
                yield {outputs[name]: value for name, value in values.items()}

        return steps

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return {outputs[name]: value for name, value in fn(*args, **kwargs).items()}

    return run


def literal(text: str) -> str:
    """User text inside Markdown, shown as typed: every Markdown and HTML character escaped, so a
    token such as '[' or '](' or '<b>' cannot turn the summary into a link or markup."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~&])", r"\\\1", text)


def three_places(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def whole(value):
    """gr.Number sends floats; pass whole numbers on as int and let core judge the range."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def listed_only(fn, rows):
    """`fn` for example clicks only: arguments that are not one of `rows` are refused (an example event
    is a route any client can call; it must not carry arbitrary work around the Run buttons' checks)."""
    allowed = [[whole(value) for value in row] for row in rows]

    def check(args):
        if [whole(value) for value in args[: len(allowed[0])]] not in allowed:
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


def examples(rows, labels, inputs, outputs, fn, api_name: str, lane: dict):
    """Clicking an example fills the inputs and runs the handler, which answers from the runner's warm
    cache (our cache, keyed by model and code, instead of Gradio's, which is keyed by component id and
    can go stale). The run is our own event: in the tab's lane, and for the listed examples only.
    Returns that event (to chain what follows a run)."""
    examples = gr.Examples(
        rows, inputs=inputs, cache_examples=False, example_labels=labels, api_name=f"{api_name}_load", api_visibility="private",
    )
    return examples.load_input_event.then(
        user_errors(listed_only(fn, rows)), inputs, outputs, api_name=api_name, api_visibility="private", **lane, **RAW
    )


def validator(h, errors_of, names: list[str]):
    """A Gradio validator: core's checks of the inputs (tokenizing only, no forward pass), each message
    shown on its own field before the run starts, so a bad input never replaces the results shown.
    It does not wait for a busy model (`Runner.check`); while the model is still loading, the run
    itself checks (and reports) instead."""

    def validate(*values):
        errors = h.runner.check(errors_of, *values[: len(names)]) or {}
        return [gr.validate(name not in errors, errors.get(name, "")) for name in names] + [
            gr.validate(True, "") for _ in values[len(names):]
        ]

    return validate


def about(text: str) -> None:
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
        "carry most of it, e.g. GPT-2 Small's name movers L9H9 and L10H0 on IOI. ([Elhage et al., 2021]"
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
    "task": (
        "A **task** is many contrast pairs of one kind (IOI from Wang et al.'s templates, induction, factual recall, or your "
        "own). Each score is the mean over the pairs of (patched − corrupted) divided by the task's mean clean − corrupted "
        "gap: 1 = the task's clean behaviour restored on average. One pair can mislead (a small swing makes large scores); "
        "a task's mean comes with its standard error. By-position sweeps need pairs of one token length (positions must "
        "mean the same thing); with several lengths only the head sweep is computed, and the summary says so."
    ),
    "path": (
        "**Path patching** sends the senders' clean − corrupted output to ONE receiver at a time: a later head's query, key "
        "or value input, or the logits (the final residual stream alone: through no MLP, not even the sender's own layer's), while "
        "everything else sees the corrupted run. A large "
        "score in the k map means the senders matter through that head's keys (where it looks), in v through what it "
        "copies, in q through what it looks for. Exact, with the semantics of TransformerLens's "
        "`get_act_patch_direct_path`; on a task, averaged like the task's patching. ([Wang et al., 2022]"
        "(https://arxiv.org/abs/2211.00593); [Goldowsky-Dill et al., 2023](https://arxiv.org/abs/2304.05969))"
    ),
    "circuit": (
        "The model as a **graph**: writers (the embeddings, every head, every MLP) and readers (every head's query, key and "
        "value input, every MLP's input, the logits); an edge joins a writer to every later reader, summed over positions. "
        "**EAP** scores every edge at once from one gradient (the corrupted run's), **EAP-IG** averages the gradient over "
        "steps from the corrupted embeddings to the clean ones: both APPROXIMATE what restoring that edge alone does. The "
        "circuit is the top edges (greedy: connected, grown from the logits); its **faithfulness** is EXACT: the clean run "
        "with every other edge carrying the corrupted (or task-mean) output, the fraction of the gap it keeps. The top "
        "edges are also patched alone, exactly, beside their scores. Drag the graph's slider to hide weak edges; hover an "
        "edge's middle for its scores. ([Syed et al., 2023](https://arxiv.org/abs/2310.10348); "
        "[Hanna et al., 2024](https://arxiv.org/abs/2403.17806); [Conmy et al., 2023](https://arxiv.org/abs/2304.14997))"
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
