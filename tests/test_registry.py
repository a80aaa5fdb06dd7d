"""The technique registry (core.registry): every declaration is whole and consistent, and a technique
declared once reaches the JSON API and the app's "More" tab with nothing else written:
shown here with a toy technique that lives only in this file."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
import core.model
from core import attention_patterns, direct_logit_attribution, logit_lens, plots, predict
from core.explorer import explore
from core.model import Model, prompt_pass, read_prompt, str_tokens, to_tokens
from core.registry import PROMPT, Input, Technique, techniques
from core.results import _Result
from serving.runner import Runner
from tests.conftest import IOI_CLEAN, free_port
from ui.api import endpoint
from ui.handlers import Handlers

TECHNIQUES = techniques()


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_each_declaration_is_whole_and_its_example_runs(demo_model, name):
    t = TECHNIQUES[name]
    assert t.tab is None or t.tab in app.TABS
    assert {spec.name for spec in t.inputs if spec.required} <= set(t.example) <= {spec.name for spec in t.inputs}
    result = t.run(demo_model, *t.arguments())
    assert isinstance(result, t.result) and list(result.to_dict()) == list(t.result.json_keys())
    for draw in t.figures:  # every declared figure draws the example's result, with a title
        figure = draw(result)
        assert isinstance(figure, go.Figure) and plots.main_title(figure)
    if t.input_errors is not None:
        assert t.input_errors(demo_model, *t.arguments()) == {}
    signature = inspect.signature(endpoint(t, Runner(demo_model, cache_dir=None), demo_model))
    defaults = t.defaults(demo_model)  # the declared ones, or fitted to the model where they do not fit it
    assert [(p.name, p.annotation, p.default) for p in signature.parameters.values()] == [
        (spec.name, spec.type, inspect.Parameter.empty if spec.required else defaults[spec.name]) for spec in t.inputs
    ]
    if t.input_errors is not None:  # the defaults are a good request on this model
        values = {spec.name: t.example[spec.name] for spec in t.inputs if spec.required} | defaults
        assert t.input_errors(demo_model, *t.arguments(values)) == {}, values


def test_arguments_fill_defaults_and_name_what_is_missing():
    lens, dla = TECHNIQUES["logit_lens"], TECHNIQUES["dla"]
    assert lens.arguments({"prompt": "Hi"}) == ("Hi", None) == lens.arguments(["Hi", ""])
    assert dla.arguments(("Hi", " a")) == ("Hi", " a", None)
    with pytest.raises(ValueError, match="dla needs target: it takes prompt, target, competing"):
        dla.arguments({"prompt": "Hi"})


def test_the_prompt_explorer_techniques_share_one_forward_pass(demo_model, monkeypatch):
    """Techniques that read one pass over a prompt answer together from one run, exactly as alone."""
    readers = [t for t in TECHNIQUES.values() if t.reads_prompt is not None]
    assert {t.name for t in readers} >= {"predict", "logit_lens", "dla", "attention"}
    alone = [t.run(demo_model, IOI_CLEAN, *t.arguments()[1:]).to_dict() for t in readers]
    passes = []
    monkeypatch.setattr(core.model, "prompt_pass", lambda *args: passes.append(1) or prompt_pass(*args))
    together = read_prompt(demo_model, IOI_CLEAN, *[(t.reads_prompt, t.arguments()[1:]) for t in readers])
    assert len(passes) == 1 and [result.to_dict() for result in together] == alone


def test_the_prompt_explorer_reads_all_four_from_one_pass_following_the_top_prediction(demo_model, monkeypatch):
    """core.explorer.explore: an empty target is the model's top prediction, read after the pass; the
    results equal the four techniques run alone with that target."""
    top = predict(demo_model, IOI_CLEAN)
    target, competing = top.top_tokens[0], top.top_tokens[1]
    passes = []
    monkeypatch.setattr(core.model, "prompt_pass", lambda *args: passes.append(1) or prompt_pass(*args))
    together = explore(demo_model, IOI_CLEAN, None, competing, 2)
    assert len(passes) == 1
    monkeypatch.undo()
    alone = (
        top,
        logit_lens(demo_model, IOI_CLEAN, target),
        direct_logit_attribution(demo_model, IOI_CLEAN, target, competing),
        attention_patterns(demo_model, IOI_CLEAN, 2),
    )
    assert [result.to_dict() for result in together] == [result.to_dict() for result in alone]
    assert together[1].target == target and together[1].target_probs is not None
    with pytest.raises(ValueError, match="same"):  # the competing token is checked against the top prediction, after the pass
        explore(demo_model, IOI_CLEAN, None, target, 2)


# --- a toy technique, declared here only ----------------------------------------------------


@dataclass(frozen=True)
class TokenNorms(_Result):
    """The length of each token's embedding (token + position) as the first layer reads it."""

    tokens: list[str]  # [pos]
    norms: np.ndarray  # [pos]


def token_norms(model: Model, prompt: str, scale: int = 1) -> TokenNorms:
    tokens = to_tokens(model, prompt)
    with torch.no_grad():
        embedded = model.W_E[tokens[0]] + model.W_pos[: tokens.shape[1]]
    return TokenNorms(str_tokens(model, tokens), embedded.norm(dim=-1).double().numpy() * scale)


def norms_figure(result: TokenNorms) -> go.Figure:
    return go.Figure(go.Bar(x=plots.token_labels(result.tokens), y=result.norms), layout=dict(title="Embedding norm by position"))


TOY = Technique(
    name="token_norms",
    run=token_norms,
    result=TokenNorms,
    summary="The norm of each token's embedding plus positional embedding.",
    inputs=(PROMPT, Input("scale", "int", "a factor for the norms", default=1)),
    lane="light",
    example={"prompt": IOI_CLEAN, "scale": 2},
    figures=(norms_figure,),
)


@pytest.fixture(scope="module")
def toy_server(demo_model, tmp_path_factory):
    demo = app.build_demo(runner=Runner(demo_model, cache_dir=None), warm=False, registry=TECHNIQUES | {TOY.name: TOY})
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, **app.launch_options(), quiet=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


def test_a_declared_technique_gets_its_endpoint_and_a_form_in_more_techniques(toy_server, demo_model, tmp_path):
    demo, url = toy_server
    client = Client(url, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert api["/token_norms"]["description"] == TOY.summary
    assert [p["parameter_name"] for p in api["/token_norms"]["parameters"]] == ["prompt", "scale"]
    answer = client.predict(IOI_CLEAN, 3, api_name="/token_norms")
    assert answer == token_norms(demo_model, IOI_CLEAN, 3).to_dict() and len(answer["norms"]) == len(answer["tokens"])
    assert client.predict(prompt="When John", api_name="/token_norms") == token_norms(demo_model, "When John").to_dict()  # scale: its default
    with pytest.raises(AppError, match="prompt is empty"):  # core's sentence, as for every endpoint
        client.predict("", api_name="/token_norms")
    assert "more-techniques" in str(demo.config) and "technique-token_norms" in str(demo.config)
    shown = Handlers(Runner(demo_model, cache_dir=None), str(tmp_path)).technique(TOY, IOI_CLEAN, 2)  # the form's Run button
    assert list(shown) == ["figure 0", "download"] and plots.main_title(shown["figure 0"]) == "Embedding norm by position"


def test_the_app_has_a_more_techniques_tab_only_when_a_technique_has_no_designed_tab(client):
    assert ("more-techniques" in str(client.config)) == any(t.tab is None for t in TECHNIQUES.values())
