"""Figures: one per result, escaped and unique token labels, informative hover, diverging scales at 0."""

from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go
import pytest

from core import (
    SWEEPS,
    AttentionResult,
    LogitLensResult,
    Predictions,
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
from core.logit_lens import final_lens

HOSTILE = "When <script>alert(1)</script> and <b>Mary</b> went, John gave to"
PAIR = ("When John and Mary went to the store", "When John and Paul went to the store", " Mary", " John")


@pytest.fixture(scope="module")
def results(tiny_model):
    return {
        "lens": logit_lens(tiny_model, HOSTILE, target=" Mary"),
        "dla": direct_logit_attribution(tiny_model, HOSTILE, " Mary", " John"),
        "attention": attention_patterns(tiny_model, HOSTILE, layer=0),
        "induction": induction_scores(tiny_model, seq_len=8, batch=2),
        "patching": activation_patching(tiny_model, *PAIR),
        "approximate": attribution_patching(tiny_model, *PAIR),
        "predictions": predict(tiny_model, HOSTILE),
        "contrast": {
            "clean: ...When John and Mary went to the store": final_lens(tiny_model, PAIR[0], " Mary", " John"),  # as the tab draws it
            "corrupted": (logit_lens(tiny_model, PAIR[1], " Mary"), logit_lens(tiny_model, PAIR[1], " John")),  # every position: also drawable
        },
    }


def all_figures(results):
    r = results
    figures = [
        plots.top_predictions(r["predictions"]),
        plots.logit_lens_heatmap(r["lens"]),
        plots.logit_lens_final(r["lens"]),
        plots.dla_heads(r["dla"]),
        plots.dla_components(r["dla"]),
        plots.attention_heads(r["attention"]),
        plots.attention_head(r["attention"], 2),
        plots.induction_heatmap(r["induction"]),
        plots.induction_heatmap(r["induction"], "previous-token"),
        plots.induction_layer_max(r["induction"]),
        plots.loss_by_position(r["induction"]),
        plots.dla_vs_patching(r["patching"]),
        plots.approximation_vs_exact(r["patching"], r["approximate"], agreement(r["patching"], r["approximate"])),
        plots.contrast_lens(r["contrast"]),
    ]
    return figures + [plots.patching_heatmap(r[kind], name) for kind in ("patching", "approximate") for name in SWEEPS]


def test_every_figure_uses_the_shared_template_and_has_hover(results):
    for figure in all_figures(results):
        assert isinstance(figure, go.Figure)
        assert figure.layout.template.layout.font.family == plots.TEMPLATE.layout.font.family
        assert figure.layout.title.text
        for trace in figure.data:
            if trace.hoverinfo == "skip":  # a reference line (approximate = exact), not data
                continue
            assert trace.hovertemplate and "%{" in trace.hovertemplate


def test_token_labels_are_escaped_and_unique(results):
    labels = plots.token_labels(results["lens"].tokens)
    assert len(set(labels)) == len(labels)
    assert labels[0] == "0: &lt;|endoftext|&gt;"
    assert plots.escape_token('a"b\n<') == 'a"b\\n&lt;'
    assert labels[2] == "2: ␣&lt;"  # GPT-2 splits "<script>" into " <", "script", ">"; the space is shown
    for figure in all_figures(results):
        text = figure.to_json()
        assert "<script>" not in text and "<b>" not in text


def test_signed_heatmaps_are_centred_at_zero(results):
    for figure in [plots.dla_heads(results["dla"])] + [plots.patching_heatmap(results["patching"], s) for s in SWEEPS]:
        assert figure.layout.coloraxis.cmid == 0
        assert figure.layout.coloraxis.colorscale[0][1] != figure.layout.coloraxis.colorscale[-1][1]


def test_logit_lens_heatmap_writes_the_top_token_in_each_cell(results):
    lens = results["lens"]
    trace = plots.logit_lens_heatmap(lens).data[0]
    assert trace.texttemplate == "%{text}"
    assert [list(row) for row in trace.text] == [[plots.escape_token(t) for t in row] for row in lens.top_tokens]
    assert list(trace.y) == lens.layers


def test_attention_facets_are_named_by_layer_and_head(results):
    figure = plots.attention_heads(results["attention"])
    assert sorted(a.text for a in figure.layout.annotations) == ["L0H0", "L0H1", "L0H2", "L0H3"]
    assert len(figure.data) == 4
    axes_of = {f"L0H{trace.name}": (trace.xaxis, trace.yaxis) for trace in figure.data}
    for note in figure.layout.annotations:  # each name sits on its own map's domain (which the square maps shrink), just above it
        assert (note.xref, note.yref) == tuple(f"{axis} domain" for axis in axes_of[note.text]), note
        assert (note.x, note.y, note.yanchor) == (0.5, 1, "bottom")


def test_attention_overview_is_a_grid_about_as_wide_as_tall():
    def columns(n_heads: int) -> int:
        patterns = np.tril(np.ones((n_heads, 3, 3)))
        figure = plots.attention_heads(AttentionResult(tokens=["a", "b", "c"], layer=0, patterns=patterns / patterns.sum(-1, keepdims=True)))
        return len({tuple(figure.layout[trace.xaxis.replace("x", "xaxis")].domain) for trace in figure.data})

    assert [columns(n) for n in (1, 4, 12, 16)] == [1, 2, 3, 4]  # GPT-2 Small's twelve heads: four rows of three


def test_one_head_grows_with_the_prompt_so_every_row_keeps_its_name():
    def layout(n_tokens: int):
        patterns = np.tril(np.ones((1, n_tokens, n_tokens)))
        result = AttentionResult(tokens=[f"t{i}" for i in range(n_tokens)], layer=0, patterns=patterns / patterns.sum(-1, keepdims=True))
        return plots.attention_head(result, 0).layout

    assert [layout(n).height for n in (5, 10, 25, 100)] == [450, 450, 660, 900]  # 16 px a token above 450, at most 900
    assert [layout(n).xaxis.tickangle for n in (10, 25)] == [-45, -90]  # a long prompt's column names upright: they never overlap


def test_dla_vs_patching_reports_pearson_r(results):
    r = results["patching"].pearson_r
    assert f"{r:.3f}" in plots.dla_vs_patching(results["patching"]).layout.title.text


def test_scores_in_0_1_are_drawn_on_a_fixed_0_1_scale(results):
    """A random model's induction scores (~0.01) must look pale, not saturated like a real induction head."""
    assert results["induction"].scores.max() < 0.5
    for kind in ("induction", "previous-token", "duplicate-token"):
        axis = plots.induction_heatmap(results["induction"], kind).layout.coloraxis
        assert (axis.cmin, axis.cmax) == (0.0, 1.0)


def test_exact_and_approximate_patching_share_one_symmetric_scale(results):
    exact = results["patching"]
    smaller = exact.__class__(**{**vars(exact), **{name: getattr(exact, name) * 0.3 for name in SWEEPS}})
    for name in SWEEPS:
        limit = plots.shared_limit(getattr(exact, name), getattr(smaller, name))
        assert limit == pytest.approx(abs(getattr(exact, name)).max())
        axes = [plots.patching_heatmap(r, name, limit).layout.coloraxis for r in (exact, smaller)]
        assert [(a.cmin, a.cmax) for a in axes] == [(-limit, limit)] * 2  # 1.0 and 0.3 get different colours


# --- readable at half width (~650 px) and on a phone ---------------------------------------


def test_titles_have_a_short_left_aligned_main_line_and_details_below(results):
    assert (plots.TEMPLATE.layout.title.x, plots.TEMPLATE.layout.title.xanchor) == (0, "left")
    for figure in all_figures(results):
        main = plots.main_title(figure)
        assert 0 < len(main) <= plots.MAX_TITLE_CHARS, main
        assert figure.layout.title.x is None and figure.layout.title.xanchor is None  # the template's, not overridden
        details = re.findall(r"<sup>(.*?)</sup>", figure.layout.title.text)
        assert all(len(line) <= plots.DETAIL_CHARS for line in details), details  # detail lines wrap to fit a phone
        assert min(map(len, details), default=0) >= max(map(len, details), default=0) / 3, details  # evenly: no line of a lone word
    lens, induction, patching = results["lens"], results["induction"], results["patching"]
    assert "Logit lens: top-1 prediction" in plots.main_title(plots.logit_lens_heatmap(lens))
    assert "Loss by position on the repeated random sequence" in plots.main_title(plots.loss_by_position(induction))
    assert plots.main_title(plots.patching_heatmap(patching, "head_out")) == "Activation patching (exact)"
    assert "Head output" in plots.patching_heatmap(patching, "head_out").layout.title.text
    approximate = plots.patching_heatmap(results["approximate"], "head_out")
    assert plots.main_title(approximate) == "APPROXIMATE (attribution patching)" and "Head output" in approximate.layout.title.text
    dla = plots.dla_heads(results["dla"])  # the long detail (which logit difference) is on the second line
    assert plots.main_title(dla) == "Direct logit attribution per head"
    assert "<sup>direct contribution to logit(␣Mary) - logit(␣John)</sup>" in dla.layout.title.text
    panels = [a.text for a in plots.contrast_lens(results["contrast"]).layout.annotations]
    assert panels[0] == "clean: ...When John<br>and Mary went to the<br>store"  # a long panel title wraps (to fit half a phone)
    assert all(len(line) <= plots.PANEL_TITLE_CHARS for panel in panels for line in panel.split("<br>"))


def test_axes_make_room_and_never_use_si_prefixes(results):
    for axis in (plots.TEMPLATE.layout.xaxis, plots.TEMPLATE.layout.yaxis):
        assert axis.automargin is True and axis.title.standoff > 0
        assert axis.exponentformat == "e"  # plotly's default "B" writes 2e-6 as "2µ"
    assert plots.TEMPLATE.layout.coloraxis.colorbar.exponentformat == "e"
    for figure in all_figures(results):
        axes = [figure.layout[key] for key in figure.layout if re.fullmatch(r"[xy]axis\d*", key)]
        axes += [figure.layout.coloraxis.colorbar]
        assert all(axis.exponentformat in (None, "e", "power", "none") for axis in axes)
        assert all(axis.automargin in (None, True) for axis in axes[:-1])


def test_every_heatmap_names_its_value_on_the_colour_bar(results):
    heatmaps = [f for f in all_figures(results) if any(t.type == "heatmap" for t in f.data)]
    assert len(heatmaps) == 14  # logit lens, attention x2, DLA, induction x2, exact and approximate patching x4
    titles = {plots.main_title(f): f.layout.coloraxis.colorbar.title.text for f in heatmaps}
    assert all(titles.values()), titles
    assert titles["Logit lens: top-1 prediction by layer"] == "P(top-1)"
    assert titles["Direct logit attribution per head"] == "DLA"
    assert titles["Attention, layer 0 head 2"] == "attention"


def test_escape_token_shows_spaces_at_a_tokens_edges():
    assert plots.escape_token(" Paris") == "␣Paris"
    assert plots.escape_token("Paris") == "Paris"
    assert plots.escape_token("  ") == "␣␣"
    assert plots.escape_token(" <b> ") == "␣&lt;b&gt;␣"
    assert plots.escape_token("the store, John gave") == "the store, John gave"  # a prompt excerpt still reads as text
    assert plots.token_labels([" Paris", "Paris"]) == ["0: ␣Paris", "1: Paris"]


def test_top_predictions_writes_small_probabilities_readably():
    result = Predictions(
        tokens=["<|endoftext|>", "The", " capital"],
        top_tokens=[" Paris", "Paris", " <b>"],
        top_probs=np.array([0.621, 0.0031, 0.000042]),
    )
    bar = plots.top_predictions(result).data[0]
    figure = plots.top_predictions(result)
    assert list(bar.text) == ["62.1%", "0.31%", "0.0042%"]  # never "0%"
    assert list(figure.layout.yaxis.ticktext) == ["␣Paris", "Paris", "␣&lt;b&gt;"]
    assert list(bar.y) == list(figure.layout.yaxis.tickvals) == [0, 1, 2]
    assert figure.layout.yaxis.autorange == "reversed"  # the most likely token on top
    assert list(bar.x) == pytest.approx([62.1, 0.31, 0.0042])
    assert list(figure.layout.xaxis.range) == [0, 100] and figure.layout.xaxis.ticksuffix == "%"
    assert bar.orientation == "h"
    assert "%{customdata[0]}" in bar.hovertemplate and "P = %{customdata[1]}" in bar.hovertemplate
    assert [row[0] for row in bar.customdata] == ["␣Paris", "Paris", "␣&lt;b&gt;"]


def test_attention_head_names_tokens_on_both_axes_and_in_the_hover(results):
    attention = results["attention"]
    figure = plots.attention_head(attention, 2)
    trace = figure.data[0]
    labels = plots.token_labels(attention.tokens)
    assert list(trace.x) == labels and list(trace.y) == labels
    assert any("␣" in label for label in labels)
    np.testing.assert_array_equal(np.asarray(trace.z), attention.patterns[2])
    assert "dest %{y}" in trace.hovertemplate and "src %{x}" in trace.hovertemplate
    assert "L0H2" in trace.hovertemplate and "attention = %{z" in trace.hovertemplate
    assert (figure.layout.coloraxis.cmin, figure.layout.coloraxis.cmax) == (0.0, 1.0)
    assert plots.main_title(figure) == "Attention, layer 0 head 2"
    assert figure.layout.xaxis.title.text.startswith("source") and figure.layout.yaxis.title.text.startswith("destination")
    n_heads = attention.patterns.shape[0]
    for bad in (n_heads, -1, True, 1.5):
        with pytest.raises(ValueError, match=f"head must be .*between 0 and {n_heads - 1}"):
            plots.attention_head(attention, bad)


def test_attention_overview_hovers_name_head_and_tokens_on_a_fixed_scale(results):
    figure = plots.attention_heads(results["attention"])
    assert (figure.layout.coloraxis.cmin, figure.layout.coloraxis.cmax) == (0.0, 1.0)
    assert figure.layout.coloraxis.colorbar.title.text == "attention"
    for head, trace in enumerate(figure.data):
        assert trace.hovertemplate.startswith(f"head L0H{head}<br>dest %{{y}}<br>src %{{x}}")
        np.testing.assert_array_equal(np.asarray(trace.z), results["attention"].patterns[head])
        assert list(trace.x) == plots.token_labels(results["attention"].tokens)


def _lens(final_probs: list[float]) -> LogitLensResult:
    n = len(final_probs)
    return LogitLensResult(
        tokens=["<|endoftext|>", " Paris"],
        layers=[f"{i}_pre" for i in range(n - 1)] + ["final_post"],
        top_tokens=[["x", " Paris"]] * n,
        top_probs=np.array([[0.5, p] for p in final_probs]),
        target=" Paris",
        target_probs=np.array([[0.5, p] for p in final_probs]),
        target_ranks=np.zeros((n, 2), dtype=int),
    )


def test_logit_lens_final_probability_axis_stops_near_1():
    sure = plots.logit_lens_final(_lens([0.1, 0.5, 0.99]))
    low, high = sure.layout.yaxis.range
    assert low == 0 and 0.99 < high <= 1.05  # ticks stop at 1 (it used to run to 1.2)
    assert sure.data[0].cliponaxis is False  # the token written above P = 0.99 stays visible
    assert sure.data[0].name == "P(␣Paris)" and "P(␣Paris)" in sure.layout.title.text
    unsure = plots.logit_lens_final(_lens([0.001, 0.02]))
    assert unsure.layout.yaxis.range[1] == pytest.approx(0.025)  # small values still fill the plot


def test_scatter_hovers_name_each_component(results):
    patching, approximate = results["patching"], results["approximate"]
    trace = plots.dla_vs_patching(patching).data[0]
    n_layers, n_heads = patching.head_out.shape
    assert list(trace.customdata) == [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
    assert "%{customdata}" in trace.hovertemplate and "DLA = %{x" in trace.hovertemplate
    for index, name in enumerate(trace.customdata):  # each name sits on its own head's numbers
        layer, head = map(int, re.fullmatch(r"L(\d+)H(\d+)", name).groups())
        assert (trace.x[index], trace.y[index]) == (patching.head_dla[layer, head], patching.head_out[layer, head])

    figure = plots.approximation_vs_exact(patching, approximate, agreement(patching, approximate))
    points = [t for t in figure.data if t.hoverinfo != "skip"]
    assert len(points) == len(SWEEPS)
    labels = plots.token_labels(patching.clean_tokens)
    for name, trace in zip(SWEEPS, points):
        assert "%{customdata}" in trace.hovertemplate
        for index, component in enumerate(trace.customdata):
            if name == "head_out":
                layer, column = map(int, re.fullmatch(r"L(\d+)H(\d+)", component).groups())
            else:
                layer, column = map(int, re.fullmatch(r"L(\d+) pos (\d+): .*", component).groups())
                assert component == f"L{layer} pos {labels[column]}"
            assert trace.x[index] == getattr(patching, name)[layer, column]
            assert trace.y[index] == getattr(approximate, name)[layer, column]
    assert "L0 pos 2: ␣John" in points[0].customdata
