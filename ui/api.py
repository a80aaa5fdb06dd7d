"""The JSON endpoints for gradio_client, one per technique, made from the registry (`core.registry`):
a technique's inputs become the endpoint's typed parameters, its summary the API page's description,
its result's `to_dict()` the answer. README's endpoint table lists them (a test holds it to this)."""

from __future__ import annotations

import inspect
from typing import Callable

import gradio as gr

from core.model import Model
from core.registry import Technique, techniques
from serving.runner import Runner
from ui.common import LANES, user_errors


def endpoint(technique: Technique, runner: Runner, model: Model) -> Callable[..., dict]:
    """`technique` as a function of its inputs (positional, in order) returning its JSON, through the
    runner. Its signature names and types the inputs, with their defaults on `model` (Technique.defaults),
    which is what Gradio's API page and gradio_client read."""

    def call(*values) -> dict:
        return runner.run(technique.run, *technique.arguments(values)).to_dict()

    defaults = technique.defaults(model)
    parameters = [
        inspect.Parameter(
            spec.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=spec.type, **({} if spec.required else {"default": defaults[spec.name]})
        )
        for spec in technique.inputs
    ]
    call.__name__ = call.__qualname__ = technique.name
    call.__doc__ = technique.summary
    call.__signature__ = inspect.Signature(parameters, return_annotation=dict)
    call.__annotations__ = {spec.name: spec.type for spec in technique.inputs} | {"return": dict}
    return call


def build(runner: Runner, model: Model, registry: dict[str, Technique] | None = None) -> None:
    """An endpoint per technique; `model`: the runner's, or the sketch of it a restart's page is built from."""
    for technique in (registry or techniques()).values():
        gr.api(user_errors(endpoint(technique, runner, model)), api_name=technique.name, **LANES[technique.lane])
