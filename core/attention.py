"""Attention patterns: every head's [dest, src] attention in one layer."""

from __future__ import annotations

from core.model import Model, check_int, run_cached, str_tokens, to_tokens
from core.results import AttentionResult


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
