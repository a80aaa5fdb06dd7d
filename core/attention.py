"""Attention patterns: every head's [dest, src] attention in one layer."""

from __future__ import annotations

from core import plots
from core.model import Model, PromptJob, PromptReader, PromptRun, check_int, one_pass, str_tokens
from core.registry import PROMPT, Input, Technique
from core.results import AttentionResult
from examples import IOI_CLEAN


def _hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def _prepare(model: Model, layer: int):
    layer = check_int(layer, "layer", 0, model.cfg.n_layers - 1)
    return frozenset({_hook(layer)}), layer


def _read(model: Model, run: PromptRun, layer: int) -> AttentionResult:
    return AttentionResult(tokens=str_tokens(model, run.tokens), layer=layer, patterns=run.cache[_hook(layer)][0].double().cpu().numpy())


READER = PromptReader(_prepare, _read)


@one_pass
def attention_patterns(model: Model, prompt: str, layer: int) -> PromptJob:
    """Every head's attention pattern in `layer`: called, an `AttentionResult` (one_pass runs the job described here)."""
    _prepare(model, layer)  # the layer is checked before the prompt
    return PromptJob(prompt, ((READER, (layer,)),))


TECHNIQUE = Technique(
    name="attention",
    run=attention_patterns,
    result=AttentionResult,
    summary="Every head's attention pattern [head][dest][src] in one layer.",
    inputs=(PROMPT, Input("layer", "int", "the layer (0 = first)")),
    lane="light",
    example={"prompt": IOI_CLEAN, "layer": 1},
    figures=(plots.attention_heads,),
    tab="Prompt Explorer",
    reads_prompt=READER,
)
