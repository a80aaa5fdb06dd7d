"""Attention patterns: every head's [dest, src] attention in one layer."""

from __future__ import annotations

from core import plots
from core.model import Model, check_int, run_cached, str_tokens, to_tokens
from core.registry import PROMPT, Input, Technique
from core.results import AttentionResult
from examples import IOI_CLEAN


def attention_patterns(model: Model, prompt: str, layer: int) -> AttentionResult:
    layer = check_int(layer, "layer", 0, model.cfg.n_layers - 1)
    tokens = to_tokens(model, prompt)
    hook = f"blocks.{layer}.attn.hook_pattern"
    _, cache = run_cached(model, tokens, lambda name: name == hook)
    return AttentionResult(
        tokens=str_tokens(model, tokens),
        layer=layer,
        patterns=cache[hook][0].double().cpu().numpy(),
    )


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
)
