"""Pure functions result -> plotly Figure. Never touches a model.

One TEMPLATE is passed explicitly to every figure (global plotly defaults are left alone).
Token labels are `"{i}: {token}"`, HTML-escaped, with leading and trailing spaces shown as "␣",
so repeated tokens stay distinct, " Paris" is told from "Paris", and a token such as `<b>` or
`<script>` is shown, never interpreted.

Figures are drawn to be read at half width (about 650 px) and on a phone (about 390 px): a title's
main line is short (at most MAX_TITLE_CHARS) and left-aligned, any detail goes on a smaller second
line, axes make room for their tick labels, and numbers never carry SI prefixes (plotly's default
writes 2e-6 as "2µ").
"""

from __future__ import annotations

import functools
import html
import re
import textwrap

import numpy as np
import plotly.express as px
import plotly.graph_objects as go

from core.contrast import SWEEPS
from core.model import check_int
from core.results import (
    ApproximatePatchingResult,
    AttentionResult,
    CircuitResult,
    DLAResult,
    EdgeAttributionResult,
    InductionResult,
    LogitLensResult,
    PatchingResult,
    PathPatchingResult,
    Predictions,
    TaskPatchingResult,
)

MAX_TITLE_CHARS = 52  # a main line this long (mostly capitals) spans ~340 px at 14 px (Chromium, Arial metrics): fits a phone
NO_SI = dict(exponentformat="e")  # 2e-06, never plotly's default "2µ"
_AXIS = dict(automargin=True, title_standoff=8, **NO_SI)  # room for tick labels, gap before the axis title
TITLE_PAD = 52  # px above a title: it starts below the label badge the page draws over a figure's top left
TEMPLATE = go.layout.Template(
    layout=go.Layout(
        font=dict(family="Inter, Helvetica, Arial, sans-serif", size=12),
        title=dict(
            x=0, xanchor="left", xref="container", y=1, yanchor="top", yref="container", pad=dict(l=8, t=TITLE_PAD), font=dict(size=14), automargin=True
        ),
        margin=dict(l=60, r=20, t=84, b=60),  # minimums: automargin grows them to fit tick labels
        paper_bgcolor="white",
        plot_bgcolor="white",
        hoverlabel=dict(font_family="monospace"),
        # box zoom, reset and download only: a phone's narrow figure has room for them beside the page's label badge
        modebar=dict(remove=["pan", "zoomin", "zoomout", "autoscale", "select", "lasso"]),
        xaxis=_AXIS,
        yaxis=_AXIS,
        coloraxis=dict(colorbar=dict(thickness=14, title=dict(side="right", font=dict(size=12)), **NO_SI)),  # a vertical title keeps the bar narrow
    )
)
SIGNED_SCALE = "RdBu"  # diverging, red = negative, blue = positive, centred at 0
UNSIGNED_SCALE = "Blues"
SPACE = "\u2423"  # "␣": how a space at a token's edge is shown
_EDGE_SPACES = re.compile(r"^ +| +$")


def escape_token(token: str) -> str:
    """A token as safe, visible label text: HTML escaped, newlines and tabs shown as \\n and \\t, and
    leading and trailing spaces shown as "␣" (GPT-2's " Paris" and "Paris" are different tokens).

    A GPT-2 token's spaces are all at its edges (one leading space, or a token of whitespace only),
    so every space of a token is shown; inner spaces of longer text (a prompt excerpt) stay spaces.
    """
    visible = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    visible = _EDGE_SPACES.sub(lambda spaces: SPACE * len(spaces.group()), visible)
    return html.escape(visible, quote=False)  # plotly decodes &lt; &gt; &amp; but shows &quot; literally


def token_labels(tokens: list[str]) -> list[str]:
    return [f"{i}: {escape_token(token)}" for i, token in enumerate(tokens)]


def layer_labels(n_layers: int) -> list[str]:
    return [f"L{layer}" for layer in range(n_layers)]


def head_labels(n_heads: int) -> list[str]:
    return [f"H{head}" for head in range(n_heads)]


DETAIL_CHARS = 60  # a detail line wraps at this width (~330 px in the small font), so it fits a phone


def _title(main: str, detail: str | None = None) -> str:
    """A figure title: a short main line and, below it in a smaller font, the detail (wrapped)."""
    if detail is None:
        return main

    def wrap(width: int) -> list[str]:
        return textwrap.wrap(detail, width, break_long_words=False, break_on_hyphens=False)

    lines = wrap(DETAIL_CHARS)
    if len(lines) > 1:  # as many lines, of even length: no last line of a word or two
        width = -(-len(detail) // len(lines))
        while len(balanced := wrap(width)) > len(lines):
            width += 1
        lines = balanced
    return main + "".join(f"<br><sup>{line}</sup>" for line in lines)


def _top_margin(title: str, panel_lines: int) -> int:
    """The top margin a figure with subplot titles needs: the title (main line and detail lines, below
    the page's label badge) and then `panel_lines` lines of panel titles, so neither overlaps."""
    return TITLE_PAD + 22 + 13 * title.count("<sup>") + 14 * panel_lines + 8


def message_figure(text: str, height: int = 260, size: int = 13) -> go.Figure:
    """A figure that is a sentence: no axes, the text in the middle (what is not there, and why)."""
    figure = go.Figure(layout=dict(template=TEMPLATE, height=height, xaxis_visible=False, yaxis_visible=False))
    figure.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=size, color="#4b5563"))
    return figure


def main_title(figure: go.Figure) -> str:
    """A figure's title without its detail line."""
    return (figure.layout.title.text or "").split("<br>")[0]


def _heatmap(
    z: np.ndarray,
    x: list[str],
    y: list[str],
    title: str,
    hover: str,
    signed: bool,
    x_title: str,
    y_title: str,
    colour_title: str,
    text: list[list[str]] | None = None,
    limit: float | None = None,
) -> go.Figure:
    """The one heatmap builder: `hover` names what x, y and the value mean, `colour_title` names
    the value on the colour bar. Colours run over [-limit, limit] (signed) or [0, limit]
    (unsigned) when `limit` is given, else over the data. The figure px.imshow(aspect="auto") draws,
    built as one dict (px and its update calls took 60-80 ms a figure; this takes a few)."""
    z = np.asarray(z, dtype=float)
    coloraxis: dict = dict(colorscale=_colour_scale(SIGNED_SCALE if signed else UNSIGNED_SCALE), autocolorscale=False)
    if signed:
        coloraxis["cmid"] = 0.0
        if limit is not None:
            coloraxis.update(cmin=-limit, cmax=limit)
    else:
        coloraxis.update(cmin=0.0, cmax=limit if limit is not None else z.max())
    coloraxis["colorbar"] = dict(title=dict(text=colour_title))
    trace = dict(type="heatmap", z=z, x=x, y=y, coloraxis="coloraxis", name="0", xaxis="x", yaxis="y", hovertemplate=hover + "<extra></extra>")
    if text is not None:
        trace.update(text=text, texttemplate="%{text}", textfont=dict(size=9))
    layout = dict(
        template=TEMPLATE,
        title=dict(text=title),
        coloraxis=coloraxis,
        xaxis=dict(anchor="y", domain=[0.0, 1.0], title=dict(text=x_title), type="category", tickangle=-45),
        yaxis=dict(anchor="x", domain=[0.0, 1.0], autorange="reversed", title=dict(text=y_title), type="category"),
    )
    return go.Figure(data=[trace], layout=layout)


@functools.cache
def _colour_scale(name: str) -> tuple:
    """A named scale as px resolves it (plotly.js's own "Blues" is another scale)."""
    return tuple(map(tuple, px.imshow(np.zeros((1, 1)), color_continuous_scale=name).layout.coloraxis.colorscale))


def _percent(probability: float) -> str:
    """3 significant digits in percent, however small: 62.1%, 0.31%, 0.0042% (never a bare 0%)."""
    return f"{100 * probability:.3g}%"


# --- predictions --------------------------------------------------------------------


def top_predictions(result: Predictions) -> go.Figure:
    """The top-k next tokens at the final position, most likely at the top, each bar labelled
    with its probability in percent (3 significant digits, so 0.0042% is not rounded to 0%)."""
    probs = np.asarray(result.top_probs, dtype=float)
    rank = list(range(len(probs)))  # y by rank, so two tokens that display alike keep two bars
    labels = [escape_token(token) for token in result.top_tokens]
    written = [_percent(p) for p in probs]
    fig = go.Figure(
        go.Bar(
            x=100 * probs,
            y=rank,
            orientation="h",
            text=written,
            textposition=["inside" if p >= 0.5 else "outside" for p in probs],  # a long bar holds its text
            textangle=0,
            constraintext="none",  # never shrink the number to fit
            insidetextanchor="end",
            insidetextfont=dict(color="white"),
            outsidetextfont=dict(color="#222222"),
            cliponaxis=False,
            marker_color="#2166ac",
            customdata=[[label, text, float(p)] for label, text, p in zip(labels, written, probs)],
            hovertemplate="%{customdata[0]}<br>P = %{customdata[1]} (%{customdata[2]:.3g})<extra></extra>",
        )
    )
    after = escape_token(result.tokens[-1]) if result.tokens else ""
    fig.update_layout(
        template=TEMPLATE,
        title=_title("Top predictions at the final position", f"next token after {after} (␣ = space)"),
        xaxis=dict(title_text="probability", range=[0, 100], ticksuffix="%", dtick=25),
        yaxis=dict(title_text="next token", tickvals=rank, ticktext=labels, autorange="reversed"),
        height=130 + 26 * len(probs),
        bargap=0.25,
    )
    return fig


# --- logit lens ---------------------------------------------------------------------


def logit_lens_heatmap(result: LogitLensResult) -> go.Figure:
    """Checkpoint x position: colour = P(top-1), each cell labelled with its top-1 token."""
    text = [[escape_token(token) for token in row] for row in result.top_tokens]
    return _heatmap(
        result.top_probs,
        x=token_labels(result.tokens),
        y=result.layers,
        title=_title("Logit lens: top-1 prediction by layer", "colour: P(top-1); the top-1 token written in each cell (on a phone: tap it); ␣ = space"),
        hover="checkpoint %{y}<br>position %{x}<br>top-1 %{text}<br>P(top-1) = %{z:.4f}",
        signed=False,
        x_title="position: token",
        y_title="residual stream checkpoint",
        colour_title="P(top-1)",
        text=text,
    )


PROBABILITY_TOP = 1.05  # a probability axis ends here at most: ticks stop at 1, room for text above 1


def _probability_top(*probabilities: np.ndarray) -> float:
    """Where a probability axis ends: a quarter above the largest value, never past PROBABILITY_TOP."""
    largest = max(float(np.max(p)) for p in probabilities)
    return min(PROBABILITY_TOP, max(1e-6, largest) * 1.25)


def logit_lens_final(result: LogitLensResult) -> go.Figure:
    """The final position by checkpoint: P(target) (or P(top-1)), with the top-1 token written."""
    tops = [escape_token(row[-1]) for row in result.top_tokens]
    if result.target_probs is not None:
        values, name = result.target_probs[:, -1], f"P({escape_token(result.target)})"
    else:
        values, name = result.top_probs[:, -1], "P(top-1)"
    fig = go.Figure(
        go.Scatter(
            x=result.layers,
            y=values,
            mode="lines+markers+text",
            text=tops,
            textposition="top center",
            cliponaxis=False,  # a token written above P = 1 stays visible
            name=name,
            hovertemplate="checkpoint %{x}<br>" + name + " = %{y:.4f}<br>top-1 %{text}<extra></extra>",
        )
    )
    last = token_labels(result.tokens)[-1]
    fig.update_layout(
        template=TEMPLATE,
        title=_title("Logit lens at the final position", f"{name} by layer at position {last}; top-1 token written above"),
        xaxis_title="residual stream checkpoint",
        yaxis_title=name,
        yaxis_range=[0, _probability_top(values)],
    )
    return fig


# --- direct logit attribution ------------------------------------------------------------


def _dla_quantity(result: DLAResult) -> str:
    target = escape_token(result.target)
    return f"logit({target})" if result.competing is None else f"logit({target}) - logit({escape_token(result.competing)})"


def dla_heads(result: DLAResult) -> go.Figure:
    n_layers, n_heads = result.heads.shape
    return _heatmap(
        result.heads,
        x=head_labels(n_heads),
        y=layer_labels(n_layers),
        title=_title("Direct logit attribution per head", f"direct contribution to {_dla_quantity(result)}"),
        hover="%{y}%{x}<br>contribution = %{z:+.4f}",
        signed=True,
        x_title="head",
        y_title="layer",
        colour_title="DLA",
    )


def dla_components(result: DLAResult) -> go.Figure:
    """Per-layer MLPs plus embeddings and biases, with the model's value for reference."""
    names = ["embed", "pos_embed"] + [f"MLP{layer}" for layer in range(len(result.mlps))] + ["bias"]
    values = [result.embed, result.pos_embed, *result.mlps.tolist(), result.bias]
    fig = go.Figure(
        go.Bar(
            x=names,
            y=values,
            marker_color=["#2166ac" if v >= 0 else "#b2182b" for v in values],
            hovertemplate="%{x}<br>contribution = %{y:+.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=_title(
            "Direct attribution of MLPs, embeddings, biases",
            f"to {_dla_quantity(result)}; model value {result.value:+.3f}, all heads {result.heads.sum():+.3f}",
        ),
        xaxis_title="component",
        yaxis_title="contribution",
    )
    return fig


# --- attention ----------------------------------------------------------------------

_ATTENTION_HOVER = "dest %{y}<br>src %{x}<br>attention = %{z:.3f}<extra></extra>"
_ATTENTION_AXES = "row: destination (query) token, column: source (key) token it attends to"


def attention_heads(result: AttentionResult, wrap: int | None = None) -> go.Figure:
    """Every head of the layer as a small map (an overview: tokens are named on hover), on one
    fixed 0-1 scale, `wrap` maps a row (default: about the square root of the heads, so the grid is
    about as wide as tall: GPT-2's twelve heads in four rows of three). Each map is square and named
    just above itself. `attention_head` draws one head readably. The figure px.imshow(facet_col=0,
    facet_col_wrap=wrap) draws, built as one dict (px took 120 ms for twelve heads; this takes 15)."""
    labels = token_labels(result.tokens)
    n_heads = result.patterns.shape[0]
    cols = min(wrap or max(1, round(n_heads**0.5)), n_heads)
    rows = -(-n_heads // cols)
    col_gap, row_gap = 0.03, 0.24 / rows  # a row gap room for its maps' names
    width, height = (1 - col_gap * (cols - 1)) / cols, (1 - row_gap * (rows - 1)) / rows
    layout: dict = {}
    heads: dict[int, int] = {}  # subplot number (numbered from the bottom row, as make_subplots does) -> head
    for head in range(n_heads):
        heads[(rows - 1 - head // cols) * cols + head % cols + 1] = head
    notes = []
    hidden = dict(showticklabels=False, ticks="", showgrid=False, zeroline=False, type="category")
    for number in range(1, rows * cols + 1):
        row, col = divmod(number - 1, cols)  # row from the bottom
        x0, y0 = col * (width + col_gap), row * (height + row_gap)
        name = _axis_suffix(number)
        first = {"scaleanchor": "y", "constrain": "domain"} if number == 1 else {"matches": "x"}
        layout[f"xaxis{name}"] = dict(anchor=f"y{name}", domain=[x0, x0 + width], **first, **hidden)
        first = {"autorange": "reversed", "constrain": "domain"} if number == 1 else {"matches": "y"}
        layout[f"yaxis{name}"] = dict(anchor=f"x{name}", domain=[y0, y0 + height], **first, **hidden)
        if number in heads:  # on the map's own domain, which the square constraint shrinks: the name stays on its map
            notes.append(dict(showarrow=False, text=f"L{result.layer}H{heads[number]}", x=0.5, xanchor="center", xref=f"x{name} domain",
                              y=1, yanchor="bottom", yref=f"y{name} domain", font=dict(size=11)))
    data = [
        dict(type="heatmap", z=result.patterns[head], x=labels, y=labels, coloraxis="coloraxis", name=str(head),
             xaxis=f"x{_axis_suffix(number)}", yaxis=f"y{_axis_suffix(number)}",
             hovertemplate=f"head L{result.layer}H{head}<br>" + _ATTENTION_HOVER)
        for number, head in sorted(heads.items(), key=lambda item: item[1])
    ]
    title = _title(f"Attention patterns, layer {result.layer}, every head", _ATTENTION_AXES)
    side = min(200, 460 // cols)  # px a map is wide in a half-width figure (about 460 px of plot beside the colour bar), at most 200
    layout.update(
        template=TEMPLATE,
        title=dict(text=title),
        annotations=notes,
        coloraxis=dict(colorscale=_colour_scale(UNSIGNED_SCALE), autocolorscale=False, cmin=0.0, cmax=1.0, colorbar=dict(title=dict(text="attention"))),
        margin=dict(l=20, b=20, t=_top_margin(title, 1)),  # the top row's names below the title
        height=_top_margin(title, 1) + rows * (side + 22) + 20,
    )
    return go.Figure(data=data, layout=layout)


def _axis_suffix(number: int) -> str:
    """Plotly's name for subplot `number`'s axes: x, y for the first, x2, y2 for the second ..."""
    return "" if number == 1 else str(number)


def attention_head(result: AttentionResult, head: int) -> go.Figure:
    """One head's pattern, tokens named on both axes: destination (query) down, source (key) across; the
    figure grows with the prompt (16 px a token, 450-900 px tall), so that a GPT-2 prompt's rows keep their names."""
    n_heads = result.patterns.shape[0]
    head = check_int(head, "head", 0, n_heads - 1)
    labels = token_labels(result.tokens)
    figure = _heatmap(
        result.patterns[head],
        x=labels,
        y=labels,
        title=_title(f"Attention, layer {result.layer} head {head}", _ATTENTION_AXES),
        hover=f"head L{result.layer}H{head}<br>" + _ATTENTION_HOVER.removesuffix("<extra></extra>"),
        signed=False,
        x_title="source (key) token",
        y_title="destination (query) token",
        colour_title="attention",
        limit=1.0,  # attention weights are probabilities: one fixed scale for every head
    )
    figure.layout.height = min(900, max(450, 260 + 16 * len(labels)))
    if len(labels) > 12:  # at half width a longer prompt's slanted token names run into each other: upright ones do not
        figure.layout.xaxis.tickangle = -90
    return figure


# --- induction ----------------------------------------------------------------------


def induction_heatmap(result: InductionResult, kind: str = "induction") -> go.Figure:
    scores = {
        "induction": result.scores,
        "previous-token": result.prev_token_scores,
        "duplicate-token": result.duplicate_token_scores,
    }[kind]
    n_layers, n_heads = scores.shape
    return _heatmap(
        scores,
        x=head_labels(n_heads),
        y=layer_labels(n_layers),
        title=_title(
            f"{kind.capitalize()} score per head",
            f"{result.seq_len} random tokens repeated twice, batch {result.batch}, seed {result.seed}",
        ),
        hover="%{y}%{x}<br>" + kind + " score = %{z:.4f}",
        signed=False,
        x_title="head",
        y_title="layer",
        colour_title="score",
        limit=1.0,  # mean attention: always on 0-1, so a random model's 0.01 looks pale, not like an induction head
    )


def induction_layer_max(result: InductionResult) -> go.Figure:
    best = result.scores.max(axis=1)
    fig = go.Figure(
        go.Bar(
            x=layer_labels(len(best)),
            y=best,
            customdata=result.scores.argmax(axis=1),
            hovertemplate="%{x}: best head H%{customdata}<br>induction score = %{y:.4f}<extra></extra>",
        )
    )
    fig.add_hline(y=result.threshold, line_dash="dash", annotation_text=f"threshold {result.threshold:g}")
    fig.update_layout(
        template=TEMPLATE,
        title=_title("Highest induction score in each layer", "the layer's best head; heads above the dashed line are listed"),
        xaxis_title="layer",
        yaxis_title="max score",
    )
    return fig


def loss_by_position(result: InductionResult) -> go.Figure:
    positions = np.arange(1, len(result.loss_by_position) + 1)  # loss of predicting token at position p
    fig = go.Figure(
        go.Scatter(
            x=positions,
            y=result.loss_by_position,
            mode="lines",
            hovertemplate="predicting position %{x}<br>loss = %{y:.3f} nats<extra></extra>",
        )
    )
    fig.add_vline(x=result.seq_len + 0.5, line_dash="dash", annotation_text="repeat starts")
    fig.update_layout(
        template=TEMPLATE,
        title=_title("Loss by position on the repeated random sequence", "mean over the batch"),
        xaxis_title="position of the predicted token",
        yaxis_title="cross-entropy (nats)",
    )
    return fig


# --- activation patching --------------------------------------------------------------

def shared_limit(*scores: np.ndarray) -> float:
    """One symmetric colour limit for several heatmaps shown side by side: their largest |score|."""
    return max(float(np.abs(s).max()) for s in scores) or 1.0


def patching_heatmap(result: PatchingResult | ApproximatePatchingResult, sweep: str, limit: float | None = None) -> go.Figure:
    """resid_pre / attn_out / mlp_out by layer x position, or head_out by layer x head.
    Attribution patching results are titled as the approximation they are. `limit`: colours over
    [-limit, limit] (default: this sweep's own largest |score|)."""
    scores = getattr(result, sweep)
    n_layers = scores.shape[0]
    approximate = isinstance(result, ApproximatePatchingResult)
    if SWEEPS[sweep].axis == "head":
        x, x_title, hover = head_labels(scores.shape[1]), "head", "%{y}%{x}"
    else:
        x, x_title, hover = token_labels(result.clean_tokens), "position: clean token", "layer %{y}<br>position %{x}"
    if approximate:
        method, measure, colour_title = "APPROXIMATE (attribution patching)", "linear estimate of the fraction restored", "est. restored"
        hover += "<br>approx. restored = %{z:+.4f}"
    else:
        method, measure, colour_title = "Activation patching (exact)", "fraction of the clean logit difference restored", "restored"
        hover += "<br>restored = %{z:+.4f}"
    return _heatmap(
        scores,
        x=x,
        y=layer_labels(n_layers),
        title=_title(method, f"{SWEEPS[sweep].title} ({SWEEPS[sweep].detail}): {measure}"),  # short main line: fits a phone
        hover=hover,
        signed=True,
        x_title=x_title,
        y_title="layer",
        colour_title=colour_title,
        limit=limit if limit is not None else shared_limit(scores),
    )


def task_heatmap(result: TaskPatchingResult, sweep: str) -> go.Figure:
    """A sweep's mean score over the task's pairs; a sweep not computed (pairs of several lengths) is an
    empty figure whose title says why."""
    scores = getattr(result, sweep)
    spec = SWEEPS[sweep]
    title = _title(f"Task patching: {result.task}", f"{spec.title} ({spec.detail}), mean over {result.n_pairs} pairs / mean gap {result.gap:+.2f}")
    if scores is None:  # no empty axes: what was not computed, why, and where to look instead
        lengths = ", ".join(map(str, result.lengths))
        fig = message_figure(
            f"Not computed: the pairs have {len(result.lengths)} token lengths ({lengths}), so positions do not line up.<br>"
            "head_out (each head at all positions) is computed: see its tab. Pairs of one length give every sweep.",
        )
        fig.update_layout(title=_title(f"Task patching: {result.task}", f"{spec.title}: not computed, pairs of several lengths"))
        return fig
    if spec.axis == "head":
        x, x_title, hover = head_labels(scores.shape[1]), "head", "%{y}%{x}"
    else:
        x, x_title, hover = token_labels(result.positions), "position: the first pair's clean token", "layer %{y}<br>position %{x}"
    return _heatmap(
        scores, x=x, y=layer_labels(scores.shape[0]), title=title, hover=hover + "<br>mean restored = %{z:+.4f}", signed=True,
        x_title=x_title, y_title="layer", colour_title="restored", limit=shared_limit(scores),
    )


PATH_INPUTS = {"q": "query", "k": "key", "v": "value"}


def _path_scope(result: PathPatchingResult) -> str:
    """What a path patching score is averaged over, for a figure's detail line."""
    if result.n_pairs == 1:
        return "fraction of the pair's logit difference restored"
    return f"{result.task}: mean over {result.n_pairs} pairs / mean gap {result.gap:+.2f}"


def path_heatmap(result: PathPatchingResult, component: str) -> go.Figure:
    """Where the senders' effect goes through each later head's query, key or value input: layer x head,
    heads no sender can reach left blank, the senders marked S; one colour scale for q, k and v."""
    scores = np.asarray(getattr(result, component), dtype=float).copy()
    scores[: result.first_receiver_layer] = np.nan  # not receivers: blank, not a measured 0
    n_layers, n_heads = scores.shape
    text = [["" for _ in range(n_heads)] for _ in range(n_layers)]
    for name in result.senders:
        if name.startswith("L"):  # a head (L9H9); MLPs and the embeddings have no cell here
            layer, head = (int(part) for part in name[1:].split("H"))
            text[layer][head] = "S"
    limit = max(float(np.abs(getattr(result, c)).max()) for c in PATH_INPUTS) or 1.0
    senders = ", ".join(result.senders)
    return _heatmap(
        scores,
        x=head_labels(n_heads),
        y=layer_labels(n_layers),
        title=_title(f"Path patching: {senders} → {component}", f"through each later head's {PATH_INPUTS[component]} input alone; {_path_scope(result)}"),
        hover=f"%{{y}}%{{x}} {component}<br>restored = %{{z:+.4f}}",
        signed=True,
        x_title="receiver head",
        y_title="layer",
        colour_title="restored",
        text=text,
        limit=limit,
    )


def path_to_logits(result: PathPatchingResult) -> go.Figure:
    """Each head's direct path into the logits (the head alone as the sender, reaching only the final
    residual stream); the title gives the chosen senders' together."""
    scores = np.asarray(result.head_to_logits, dtype=float)
    return _heatmap(
        scores,
        x=head_labels(scores.shape[1]),
        y=layer_labels(scores.shape[0]),
        title=_title(
            f"Direct path to the logits: {', '.join(result.senders)} = {result.logits:+.3f}",
            f"each head alone into the final residual stream, through no MLP; {_path_scope(result)}",
        ),
        hover="%{y}%{x} → logits<br>restored = %{z:+.4f}",
        signed=True,
        x_title="sender head",
        y_title="layer",
        colour_title="restored",
        limit=shared_limit(scores),
    )


def component_names(result: PatchingResult | ApproximatePatchingResult, sweep: str) -> list[str]:
    """One name per score of a sweep, in `getattr(result, sweep).ravel()` order:
    "L9H9" for heads, "L3 pos 5: ␣Mary" for positions."""
    n_layers, n_columns = getattr(result, sweep).shape
    if SWEEPS[sweep].axis == "head":
        return [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_columns)]
    tokens = token_labels(result.clean_tokens)
    return [f"L{layer} pos {tokens[pos]}" for layer in range(n_layers) for pos in range(n_columns)]


def approximation_vs_exact(exact: PatchingResult, approximate: ApproximatePatchingResult, agreement: dict[str, dict]) -> go.Figure:
    """One panel per sweep: every component's exact score against its attribution-patching estimate."""
    from plotly.subplots import make_subplots

    names = list(agreement)

    def subtitle(name: str) -> str:
        stats = agreement[name]
        r = "n/a" if stats["pearson_r"] is None else f"{stats['pearson_r']:.3f}"
        return f"{name}<br>r = {r}<br>top-{stats['top_k']}: {stats['top_k_overlap']}/{stats['top_k']}"  # narrow panels

    cols = 2  # a 2 x 2 grid: each panel wide enough for its title and ticks, on a phone too
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[subtitle(name) for name in names], vertical_spacing=0.22, horizontal_spacing=0.12)
    for i, name in enumerate(names):
        row, col = i // cols + 1, i % cols + 1
        x, y = getattr(exact, name), getattr(approximate, name)
        low, high = float(min(x.min(), y.min(), 0.0)), float(max(x.max(), y.max(), 1.0))
        fig.add_trace(
            go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(color="#bbbbbb", dash="dot"), hoverinfo="skip", showlegend=False),
            row=row,
            col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=x.ravel(),
                y=y.ravel(),
                mode="markers",
                marker=dict(size=6),
                customdata=component_names(exact, name),
                hovertemplate=name + " %{customdata}<br>exact = %{x:+.4f}<br>approximate = %{y:+.4f}<extra></extra>",
                showlegend=False,
            ),
            row=row,
            col=col,
        )
        fig.update_xaxes(title_text="exact", row=row, col=col)
        fig.update_yaxes(title_text="approximate" if col == 1 else None, row=row, col=col)
    title = _title("Attribution patching vs exact patching", "one point per component; dotted line: approximate = exact")
    fig.update_layout(template=TEMPLATE, title=title, height=720, margin_t=_top_margin(title, 3))  # 3: the panel titles' lines
    fig.update_annotations(font_size=11)
    return fig


def dla_vs_patching(result: PatchingResult) -> go.Figure:
    r = result.pearson_r
    fig = go.Figure(
        go.Scatter(
            x=result.head_dla.ravel(),
            y=result.head_out.ravel(),
            mode="markers",
            customdata=component_names(result, "head_out"),
            hovertemplate="head %{customdata}<br>DLA = %{x:+.4f}<br>patching score = %{y:+.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=_title(
            "Heads: direct logit attribution vs patching",
            f"Pearson r = {'n/a' if r is None else f'{r:.3f}'}; one point per head",
        ),
        xaxis_title="DLA of the logit difference (clean prompt)",
        yaxis_title="patching score (head output)",
    )
    return fig


# --- contrast pairs -------------------------------------------------------------------

WINNER_COLOURS = {"answer": "#111111", "wrong": "#777777", "neither": "#cccccc"}
PANEL_TITLE_CHARS = 22  # a panel title (e.g. a prompt excerpt) wraps at this width, so side-by-side panels fit a phone


_CONTRAST_LENS_TITLE = _title(
    "Logit lens at the final position, per prompt", "top-1 token: black = the answer, dark grey = the wrong token, light = neither"
)


def contrast_lens(pair: dict[str, tuple[LogitLensResult, LogitLensResult]]) -> go.Figure:
    """Side-by-side final-position logit lens for each prompt of a pair.

    `pair` maps a panel title (e.g. "clean") to (lens tracking the answer, lens tracking the wrong
    token) for that prompt. Lines: P(answer), P(wrong) by checkpoint. Top-1 token written at each
    checkpoint: black = the answer wins, dark grey = the wrong token wins, light = neither.
    """
    from plotly.subplots import make_subplots

    titles = list(pair)
    wrapped = ["<br>".join(textwrap.wrap(panel, PANEL_TITLE_CHARS, break_long_words=False, break_on_hyphens=False)) for panel in titles]
    fig = make_subplots(rows=1, cols=len(titles), shared_yaxes=True, subplot_titles=wrapped, horizontal_spacing=0.04)
    for col, panel in enumerate(titles, start=1):
        answer_lens, wrong_lens = pair[panel]
        answer, wrong = escape_token(answer_lens.target), escape_token(wrong_lens.target)
        tops = [row[-1] for row in answer_lens.top_tokens]
        winners = [
            "answer" if top == answer_lens.target else "wrong" if top == wrong_lens.target else "neither" for top in tops
        ]
        for lens, name, dash in ((answer_lens, answer, "solid"), (wrong_lens, wrong, "dot")):
            fig.add_trace(
                go.Scatter(
                    x=lens.layers,
                    y=lens.target_probs[:, -1],
                    mode="lines",
                    line=dict(dash=dash, color="#2166ac" if lens is answer_lens else "#b2182b"),
                    name=f"P({name})",
                    legendgroup=name,
                    showlegend=col == 1,
                    hovertemplate=f"{panel}<br>checkpoint %{{x}}<br>P({name}) = %{{y:.4f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.add_trace(
            go.Scatter(
                x=answer_lens.layers,
                y=np.maximum(answer_lens.target_probs[:, -1], wrong_lens.target_probs[:, -1]),
                mode="markers+text",
                text=[escape_token(t) for t in tops],
                textposition="top center",
                textfont=dict(color=[WINNER_COLOURS[w] for w in winners]),
                marker=dict(color=[WINNER_COLOURS[w] for w in winners], size=8),
                cliponaxis=False,
                customdata=winners,
                name="top-1 token",
                showlegend=col == 1,
                hovertemplate=f"{panel}<br>checkpoint %{{x}}<br>top-1 %{{text}} (%{{customdata}} wins)<extra></extra>",
            ),
            row=1,
            col=col,
        )
    fig.update_layout(
        template=TEMPLATE,
        title=_CONTRAST_LENS_TITLE,
        yaxis_title="probability",
        yaxis_range=[0, _probability_top(*(lens.target_probs[:, -1] for lenses in pair.values() for lens in lenses))],
        legend=dict(orientation="h", x=0, xanchor="left", y=-0.3, yanchor="top"),
        margin_t=_top_margin(_CONTRAST_LENS_TITLE, 1 + max(w.count("<br>") for w in wrapped)),  # panel titles stay under the title
    )
    fig.update_xaxes(tickangle=-45)
    fig.update_annotations(font_size=11)
    return fig


# --- circuits (core.edges) ------------------------------------------------------------------------

CIRCUIT_LEVELS = 6  # the graph's edges in this many bands of |score|; its slider hides the weaker bands
_INPUT_OFFSET = {"q": -0.25, "k": 0.0, "v": 0.25}  # where an edge meets a head: its query, key or value input


def _node_place(name: str, n_heads: int) -> tuple[float, float]:
    """(x, y) of a node: by layer left to right (a layer's heads, then its MLP), heads stacked by index."""
    if name == "embed":
        return 0.0, (n_heads - 1) / 2
    if name == "logits":
        return 1e9, (n_heads - 1) / 2  # placed at the far right by the caller
    if name.startswith("MLP"):
        return 2 * int(name[3:]) + 2, (n_heads - 1) / 2
    layer, head = name[1:].split("H")
    return 2 * int(layer) + 1, float(head)


def _edge_label(edge: dict) -> str:
    exact = "not checked" if edge.get("exact") is None else f"{edge['exact']:+.4f}"
    return f"{edge['writer']} → {edge['reader']}<br>approximate = {edge['score']:+.4f}<br>exact alone = {exact}"


def circuit_graph(result: CircuitResult) -> go.Figure:
    """The circuit: nodes placed by layer (heads by index, each MLP between layers), an edge per kept
    edge into its reader's query, key or value input, width and colour by its approximate score (blue
    raises the logit difference, red lowers it); hover an edge's middle for its scores; the slider
    hides the weaker bands of edges."""
    n_heads = sum(1 for w in result.writers if w.startswith("L0H"))
    n_layers = sum(1 for w in result.writers if w.startswith("MLP"))
    edges = result.edges
    largest = max((abs(e["score"]) for e in edges), default=1.0) or 1.0
    # bands of |score| / largest: [0, 1/32), [1/32, 1/16), ... [1/2, 1]: each its own trace, so the slider can hide it
    bounds = [0.0] + [2.0 ** -(CIRCUIT_LEVELS - 1 - i) for i in range(CIRCUIT_LEVELS - 1)] + [np.inf]

    def place(name: str) -> tuple[float, float]:
        x, y = _node_place(name, n_heads)
        return (2 * n_layers + 1.0 if name == "logits" else x), y

    fig = go.Figure()
    for band in range(CIRCUIT_LEVELS):
        for sign, colour in ((1, "#2166ac"), (-1, "#b2182b")):
            xs, ys, mx, my, labels = [], [], [], [], []
            for edge in edges:
                size = abs(edge["score"]) / largest
                if not (bounds[band] <= size < bounds[band + 1]) or np.sign(edge["score"]) * sign < 0 or (edge["score"] == 0 and sign < 0):
                    continue
                x0, y0 = place(edge["writer"])
                node, _, port = edge["reader"].partition(".")
                x1, y1 = place(node)
                y1 += _INPUT_OFFSET.get(port, 0.0)
                xs += [x0, x1, None]
                ys += [y0, y1, None]
                mx.append((x0 + x1) / 2)
                my.append((y0 + y1) / 2)
                labels.append(_edge_label(edge))
            fig.add_trace(
                go.Scatter(
                    x=xs, y=ys, mode="lines", line=dict(color=colour, width=1 + 1.4 * band), opacity=0.35 + 0.13 * band,
                    hoverinfo="skip", showlegend=False, meta=band,
                )
            )
            fig.add_trace(
                go.Scatter(
                    x=mx, y=my, mode="markers", marker=dict(size=7, color=colour, opacity=0.0), text=labels,
                    hovertemplate="%{text}<extra></extra>", showlegend=False, meta=band,
                )
            )
    names = result.nodes
    xy = [place(name) for name in names]
    fig.add_trace(
        go.Scatter(
            x=[x for x, _ in xy], y=[y for _, y in xy], mode="markers", text=names,
            marker=dict(size=11, color="#444444", symbol=["square" if n.startswith("MLP") else "circle" for n in names]),
            hovertemplate="%{text}<extra></extra>", showlegend=False, meta=-1,
        )
    )
    for name, (x, y) in zip(names, xy):  # above every edge, on a light ground: no edge crosses out a node's name
        fig.add_annotation(x=x, y=y, yshift=13, text=name, showarrow=False, font=dict(size=10), bgcolor="rgba(255, 255, 255, 0.85)", borderpad=1)
    steps = []
    for lowest in range(CIRCUIT_LEVELS):
        visible = [trace.meta < 0 or trace.meta >= lowest for trace in fig.data]
        shown = sum(1 for e in edges if abs(e["score"]) / largest >= bounds[lowest])
        steps.append(dict(method="restyle", args=[{"visible": visible}], label=f"≥{bounds[lowest] * largest:.2g} ({shown})"))
    fig.update_layout(
        sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="edges with |score| "), pad=dict(t=40), font=dict(size=10))]
    )
    ticks = [0, *[2 * layer + 1 for layer in range(n_layers)], 2 * n_layers + 1]
    fig.update_xaxes(tickvals=ticks, ticktext=["embed", *[f"L{layer}" for layer in range(n_layers)], "logits"], title_text="layer (MLPs between)")
    fig.update_yaxes(title_text="head", tickvals=list(range(n_heads)), range=[-1, n_heads + 0.2])
    title = _title(
        f"Circuit: {result.k} edges, faithfulness {result.faithfulness:.3f}",
        f"{result.task}, {result.n_pairs} pairs; {result.selection} by {result.method.upper()}; "
        f"outside edges carry the {result.ablation} output; each edge runs left to right, writer to reader; width and colour: approximate "
        "score (blue raises the logit difference)",
    )
    fig.update_layout(template=TEMPLATE, title=title, height=560, margin_t=_top_margin(title, 0), hovermode="closest")
    return fig


def faithfulness_curve(result: CircuitResult) -> go.Figure:
    """Exact faithfulness of the circuits of each size (the same selection), the chosen one marked."""
    sizes = np.asarray(result.curve_k, dtype=int)
    fig = go.Figure(  # x: log10(k) on a linear axis, ticks named by k (a log-type axis drew these points off their y ticks)
        go.Scatter(
            x=np.log10(sizes), y=np.asarray(result.curve_faithfulness, dtype=float), customdata=sizes, mode="lines+markers",
            name="circuits of k edges", hovertemplate="k = %{customdata} edges<br>faithfulness = %{y:.4f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[np.log10(result.k)], y=[result.faithfulness], customdata=[result.k], mode="markers", marker=dict(size=13, symbol="star", color="#d6604d"),
            name="this circuit", hovertemplate="this circuit: %{customdata} edges<br>faithfulness = %{y:.4f}<extra></extra>",
        )
    )
    if result.target is not None:
        fig.add_hline(y=result.target, line_dash="dot", line_color="#777777", annotation_text=f"target {result.target:g}")
    title = _title(
        "Faithfulness by circuit size (exact)",
        f"the fraction of the clean - corrupted gap recovered with every other edge carrying the {result.ablation} output; 1 = all edges",
    )
    fig.update_layout(
        template=TEMPLATE, title=title, margin_t=_top_margin(title, 0), xaxis_title="edges in the circuit (k)", yaxis_title="faithfulness",
        legend=dict(orientation="h", y=-0.3),
    )
    fig.update_xaxes(tickvals=np.log10(sizes), ticktext=[f"{k:,}" for k in sizes], tickangle=-45)
    return fig


def edge_checks(result: CircuitResult) -> go.Figure:
    """The top edges' approximate scores against their exact effect alone."""
    x, y = np.asarray(result.checked_exact, dtype=float), np.asarray(result.checked_scores, dtype=float)
    stats = result.agreement
    low, high = (float(min(x.min(), y.min(), 0.0)), float(max(x.max(), y.max(), 0.0))) if len(x) else (0.0, 1.0)
    fig = go.Figure(go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(color="#bbbbbb", dash="dot"), hoverinfo="skip", showlegend=False))
    fig.add_trace(
        go.Scatter(
            x=x, y=y, mode="markers", marker=dict(size=7), text=[f"{w} → {r}" for w, r in result.checked],
            hovertemplate="%{text}<br>exact alone = %{x:+.4f}<br>approximate = %{y:+.4f}<extra></extra>", showlegend=False,
        )
    )
    r = "n/a" if stats["pearson_r"] is None else f"{stats['pearson_r']:.3f}"
    slope = "n/a" if stats["slope"] is None else f"{stats['slope']:.2f}"
    title = _title(
        f"Top {len(x)} edges: {result.method.upper()} vs exact",
        f"r = {r}; top-{stats['top_k']} overlap {stats['top_k_overlap']}/{stats['top_k']}; slope {slope} (1 = right size); "
        "exact: the edge alone patched into the corrupted run",
    )
    fig.update_layout(
        template=TEMPLATE, title=title, margin_t=_top_margin(title, 0), xaxis_title="exact effect alone (logit difference)", yaxis_title="approximate score"
    )
    return fig


def top_edge_scores(result: EdgeAttributionResult, top: int = 30) -> go.Figure:
    """The `top` edges by |score|, largest first."""
    rows = result.ranked(top)[::-1]
    labels = [f"{escape_token(w)} → {escape_token(r)}" for w, r, _ in rows]
    scores = [s for _, _, s in rows]
    fig = go.Figure(
        go.Bar(
            x=scores, y=labels, orientation="h", marker_color=["#2166ac" if s >= 0 else "#b2182b" for s in scores],
            hovertemplate="%{y}<br>score = %{x:+.4f}<extra></extra>",
        )
    )
    title = _title(
        f"Top {len(rows)} of {result.n_edges:,} edges by |{result.method.upper()} score|",
        f"{result.task}, {result.n_pairs} pairs; score: the estimated change of the logit difference when the edge alone carries the clean signal",
    )
    fig.update_layout(template=TEMPLATE, title=title, height=max(420, 18 * len(rows) + 160), xaxis_title="score (logit difference)")
    fig.update_yaxes(type="category")
    return fig
