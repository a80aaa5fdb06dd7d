"""Top-k next-token predictions at the final position."""

from __future__ import annotations

import torch

from core.config import DEFAULTS, LIMITS
from core.model import Model, check_int, str_tokens, to_tokens
from core.results import Predictions


def predict(model: Model, prompt: str, k: int = DEFAULTS.top_k) -> Predictions:
    k = check_int(k, "k", 1, min(LIMITS.max_top_k, model.cfg.d_vocab))
    tokens = to_tokens(model, prompt)
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    probs = torch.softmax(logits.double(), dim=-1)
    top = probs.topk(k)
    return Predictions(
        tokens=str_tokens(model, tokens),
        top_tokens=[model.tokenizer.decode([int(i)]) for i in top.indices],
        top_probs=top.values.cpu().numpy(),
    )
