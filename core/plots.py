"""Pure functions result -> plotly Figure. Never touches a model.

One TEMPLATE is passed explicitly to every figure (global plotly defaults are left alone).
Token labels are `"{i}: {token}"`, HTML-escaped, so repeated tokens stay distinct and a
token such as `<b>` or `<script>` is shown, never interpreted.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.express as px
import plotly.graph_objects as go

from core.results import (
    ApproximatePatchingResult,
    AttentionResult,
    DLAResult,
    InductionResult,
    LogitLensResult,
    PatchingResult,
)

TEMPLATE = go.layout.Template(
    layout=go.Layout(
        font=dict(family="Inter, Helvetica, Arial, sans-serif", size=12),
        margin=dict(l=60, r=20, t=60, b=60),
        paper_bgcolor="white",
        plot_bgcolor="white",
        hoverlabel=dict(font_family="monospace"),
    )
)
SIGNED_SCALE = "RdBu"  # diverging, red = negative, blue = positive, centred at 0
UNSIGNED_SCALE = "Blues"


def escape_token(token: str) -> str:
    """A token as safe, visible label text: HTML escaped, newlines and tabs shown as \\n and \\t."""
    visible = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return html.escape(visible, quote=False)  # plotly decodes &lt; &gt; &amp; but shows &quot; literally


def token_labels(tokens: list[str]) -> list[str]:
    return [f"{i}: {escape_token(token)}" for i, token in enumerate(tokens)]


def layer_labels(n_layers: int) -> list[str]:
    return [f"L{layer}" for layer in range(n_layers)]


def head_labels(n_heads: int) -> list[str]:
    return [f"H{head}" for head in range(n_heads)]


def _heatmap(
    z: np.ndarray,
    x: list[str],
    y: list[str],
    title: str,
    hover: str,
    signed: bool,
    x_title: str,
    y_title: str,
    text: list[list[str]] | None = None,
    limit: float | None = None,
) -> go.Figure:
    """The one heatmap builder: `hover` names what x, y and the value mean. Colours run over
    [-limit, limit] (signed) or [0, limit] (unsigned) when `limit` is given, else over the data."""
    z = np.asarray(z, dtype=float)
    if signed:
        colour = dict(color_continuous_scale=SIGNED_SCALE, color_continuous_midpoint=0.0)
        if limit is not None:
            colour["range_color"] = (-limit, limit)
    else:
        colour = dict(color_continuous_scale=UNSIGNED_SCALE, range_color=(0.0, limit)) if limit is not None else dict(color_continuous_scale=UNSIGNED_SCALE, zmin=0.0)
    fig = px.imshow(z, x=x, y=y, aspect="auto", template=TEMPLATE, title=title, **colour)
    fig.update_traces(hovertemplate=hover + "<extra></extra>")
    if text is not None:
        fig.update_traces(text=text, texttemplate="%{text}", textfont=dict(size=9))
    fig.update_layout(xaxis_title=x_title, yaxis_title=y_title)
    fig.update_xaxes(type="category", tickangle=-45)
    fig.update_yaxes(type="category")
    return fig


# --- logit lens ---------------------------------------------------------------------


def logit_lens_heatmap(result: LogitLensResult) -> go.Figure:
    """Checkpoint x position: colour = P(top-1), each cell labelled with its top-1 token."""
    text = [[escape_token(token) for token in row] for row in result.top_tokens]
    return _heatmap(
        result.top_probs,
        x=token_labels(result.tokens),
        y=result.layers,
        title="Logit lens: top-1 prediction at every layer and position",
        hover="checkpoint %{y}<br>position %{x}<br>top-1 %{text}<br>P(top-1) = %{z:.4f}",
        signed=False,
        x_title="position: token",
        y_title="residual stream checkpoint",
        text=text,
    )


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
            name=name,
            hovertemplate="checkpoint %{x}<br>" + name + " = %{y:.4f}<br>top-1 %{text}<extra></extra>",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=f"Final position ({escape_token(result.tokens[-1])}): {name} by layer, top-1 token written",
        xaxis_title="residual stream checkpoint",
        yaxis_title=name,
        yaxis_range=[0, max(1e-6, float(np.max(values))) * 1.25],
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
        title=f"Direct logit attribution per head to {_dla_quantity(result)}",
        hover="%{y}%{x}<br>contribution = %{z:+.4f}",
        signed=True,
        x_title="head",
        y_title="layer",
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
        title=(
            f"MLPs, embeddings and biases: direct contribution to {_dla_quantity(result)} "
            f"(model value {result.value:+.3f}, all heads {result.heads.sum():+.3f})"
        ),
        xaxis_title="component",
        yaxis_title="contribution",
    )
    return fig


# --- attention ----------------------------------------------------------------------


def attention_heads(result: AttentionResult, wrap: int = 4) -> go.Figure:
    labels = token_labels(result.tokens)
    n_heads = result.patterns.shape[0]
    fig = px.imshow(
        result.patterns,
        facet_col=0,
        facet_col_wrap=min(wrap, n_heads),
        x=labels,
        y=labels,
        zmin=0.0,
        zmax=1.0,
        color_continuous_scale=UNSIGNED_SCALE,
        template=TEMPLATE,
        title=f"Attention patterns, layer {result.layer} (row = destination, column = source)",
        facet_row_spacing=0.06,
        facet_col_spacing=0.03,
    )
    for annotation in fig.layout.annotations:  # facet titles "facet_col=3" -> "L5H3"
        head = annotation.text.split("=")[-1]
        annotation.text = f"L{result.layer}H{head}"
    fig.update_traces(hovertemplate="dest %{y}<br>src %{x}<br>attention = %{z:.4f}<extra></extra>")
    fig.update_xaxes(showticklabels=False, type="category")
    fig.update_yaxes(showticklabels=False, type="category")
    fig.update_layout(height=260 * int(np.ceil(n_heads / min(wrap, n_heads))) + 80)
    return fig


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
        title=f"{kind.capitalize()} score per head (seq_len {result.seq_len}, batch {result.batch}, seed {result.seed})",
        hover="%{y}%{x}<br>" + kind + " score = %{z:.4f}",
        signed=False,
        x_title="head",
        y_title="layer",
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
        template=TEMPLATE, title="Highest induction score in each layer", xaxis_title="layer", yaxis_title="max score"
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
        title="Loss by position on the repeated random sequence (mean over the batch)",
        xaxis_title="position of the predicted token",
        yaxis_title="cross-entropy (nats)",
    )
    return fig


# --- activation patching --------------------------------------------------------------

_PATCH_TITLES = {
    "resid_pre": "Residual stream (resid_pre)",
    "attn_out": "Attention layer output (attn_out)",
    "mlp_out": "MLP output (mlp_out)",
}


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
    if sweep == "head_out":
        x, x_title, hover = head_labels(scores.shape[1]), "head", "%{y}%{x}"
        title = "Head output (all positions)"
    else:
        x, x_title, hover = token_labels(result.clean_tokens), "position: clean token", "layer %{y}<br>position %{x}"
        title = _PATCH_TITLES[sweep]
    if approximate:
        heading = f"APPROXIMATE (attribution patching), {title}: linear estimate of the fraction restored"
        hover += "<br>approx. restored = %{z:+.4f}"
    else:
        heading = f"Activation patching (exact), {title}: fraction of clean logit difference restored"
        hover += "<br>restored = %{z:+.4f}"
    return _heatmap(
        scores,
        x=x,
        y=layer_labels(n_layers),
        title=heading,
        hover=hover,
        signed=True,
        x_title=x_title,
        y_title="layer",
        limit=limit if limit is not None else shared_limit(scores),
    )


def approximation_vs_exact(exact: PatchingResult, approximate: ApproximatePatchingResult, agreement: dict[str, dict]) -> go.Figure:
    """One panel per sweep: every component's exact score against its attribution-patching estimate."""
    from plotly.subplots import make_subplots

    names = list(agreement)

    def subtitle(name: str) -> str:
        stats = agreement[name]
        r = "n/a" if stats["pearson_r"] is None else f"{stats['pearson_r']:.3f}"
        return f"{name}: r = {r}, top-{stats['top_k']} overlap {stats['top_k_overlap']}/{stats['top_k']}"

    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[subtitle(name) for name in names])
    for col, name in enumerate(names, start=1):
        x, y = getattr(exact, name), getattr(approximate, name)
        if name == "head_out":
            labels = [f"L{layer}H{head}" for layer in range(x.shape[0]) for head in range(x.shape[1])]
        else:
            tokens = token_labels(exact.clean_tokens)
            labels = [f"L{layer} {tokens[pos]}" for layer in range(x.shape[0]) for pos in range(x.shape[1])]
        low, high = float(min(x.min(), y.min(), 0.0)), float(max(x.max(), y.max(), 1.0))
        fig.add_trace(
            go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(color="#bbbbbb", dash="dot"), hoverinfo="skip", showlegend=False),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=x.ravel(),
                y=y.ravel(),
                mode="markers",
                marker=dict(size=6),
                text=labels,
                hovertemplate="%{text}<br>exact = %{x:+.4f}<br>approximate = %{y:+.4f}<extra></extra>",
                showlegend=False,
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="exact", row=1, col=col)
    fig.update_yaxes(title_text="approximate", row=1, col=1)
    fig.update_layout(template=TEMPLATE, title="Attribution patching (approximate) against exact activation patching")
    fig.update_annotations(font_size=11)
    return fig


def dla_vs_patching(result: PatchingResult) -> go.Figure:
    n_layers, n_heads = result.head_out.shape
    names = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    r = result.pearson_r
    fig = go.Figure(
        go.Scatter(
            x=result.head_dla.ravel(),
            y=result.head_out.ravel(),
            mode="markers",
            text=names,
            hovertemplate="%{text}<br>DLA = %{x:+.4f}<br>patching = %{y:+.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=f"Heads: direct logit attribution vs activation patching (Pearson r = {'n/a' if r is None else f'{r:.3f}'})",
        xaxis_title="DLA of the logit difference (clean prompt)",
        yaxis_title="patching score (head output, all positions)",
    )
    return fig


# --- contrast pairs -------------------------------------------------------------------

WINNER_COLOURS = {"answer": "#111111", "wrong": "#777777", "neither": "#cccccc"}


def contrast_lens(pair: dict[str, tuple[LogitLensResult, LogitLensResult]]) -> go.Figure:
    """Side-by-side final-position logit lens for each prompt of a pair.

    `pair` maps a panel title (e.g. "clean") to (lens tracking the answer, lens tracking the wrong
    token) for that prompt. Lines: P(answer), P(wrong) by checkpoint. Top-1 token written at each
    checkpoint: black = the answer wins, dark grey = the wrong token wins, light = neither.
    """
    from plotly.subplots import make_subplots

    titles = list(pair)
    fig = make_subplots(rows=1, cols=len(titles), shared_yaxes=True, subplot_titles=titles, horizontal_spacing=0.04)
    for col, title in enumerate(titles, start=1):
        answer_lens, wrong_lens = pair[title]
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
                    hovertemplate=f"{title}<br>checkpoint %{{x}}<br>P({name}) = %{{y:.4f}}<extra></extra>",
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
                customdata=winners,
                name="top-1 token",
                showlegend=col == 1,
                hovertemplate=f"{title}<br>checkpoint %{{x}}<br>top-1 %{{text}} (%{{customdata}} wins)<extra></extra>",
            ),
            row=1,
            col=col,
        )
    fig.update_layout(
        template=TEMPLATE,
        title="Logit lens at the final position: black = answer is top-1, dark grey = wrong token is top-1, light = neither",
        yaxis_title="probability",
    )
    fig.update_xaxes(tickangle=-45)
    return fig
