"""Top-k next-token predictions at the final position."""

from __future__ import annotations

import torch

from core import plots
from core.config import DEFAULTS, LIMITS
from core.model import Model, check_int, str_tokens, to_tokens
from core.registry import PROMPT, Input, Technique
from core.results import Predictions
from examples import EIFFEL


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


TECHNIQUE = Technique(
    name="predict",
    run=predict,
    result=Predictions,
    summary="Top-k next tokens with probabilities at the final position.",
    inputs=(PROMPT, Input("k", "int", "how many tokens to list", default=DEFAULTS.top_k)),
    lane="light",
    example={"prompt": EIFFEL, "k": 5},
    figures=(plots.top_predictions,),
    tab="Prompt Explorer",
)
