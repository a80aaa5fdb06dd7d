"""Figures: one per result, escaped and unique token labels, informative hover, diverging scales at 0."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from core import (
    SWEEPS,
    activation_patching,
    attention_patterns,
    direct_logit_attribution,
    induction_scores,
    logit_lens,
    plots,
)

HOSTILE = "When <script>alert(1)</script> and <b>Mary</b> went, John gave to"


@pytest.fixture(scope="module")
def results(tiny_model):
    return {
        "lens": logit_lens(tiny_model, HOSTILE, target=" Mary"),
        "dla": direct_logit_attribution(tiny_model, HOSTILE, " Mary", " John"),
        "attention": attention_patterns(tiny_model, HOSTILE, layer=0),
        "induction": induction_scores(tiny_model, seq_len=8, batch=2),
        "patching": activation_patching(
            tiny_model, "When John and Mary went to the store", "When John and Paul went to the store", " Mary", " John"
        ),
    }


def all_figures(results):
    r = results
    figures = [
        plots.logit_lens_heatmap(r["lens"]),
        plots.logit_lens_final(r["lens"]),
        plots.dla_heads(r["dla"]),
        plots.dla_components(r["dla"]),
        plots.attention_heads(r["attention"]),
        plots.induction_heatmap(r["induction"]),
        plots.induction_heatmap(r["induction"], "previous-token"),
        plots.induction_layer_max(r["induction"]),
        plots.loss_by_position(r["induction"]),
        plots.dla_vs_patching(r["patching"]),
    ]
    return figures + [plots.patching_heatmap(r["patching"], name) for name in SWEEPS]


def test_every_figure_uses_the_shared_template_and_has_hover(results):
    for figure in all_figures(results):
        assert isinstance(figure, go.Figure)
        assert figure.layout.template.layout.font.family == plots.TEMPLATE.layout.font.family
        assert figure.layout.title.text
        for trace in figure.data:
            assert trace.hovertemplate and "%{" in trace.hovertemplate


def test_token_labels_are_escaped_and_unique(results):
    labels = plots.token_labels(results["lens"].tokens)
    assert len(set(labels)) == len(labels)
    assert labels[0] == "0: &lt;|endoftext|&gt;"
    assert plots.escape_token('a"b\n<') == 'a"b\\n&lt;'
    assert labels[2] == "2:  &lt;"  # GPT-2 splits "<script>" into " <", "script", ">"
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
