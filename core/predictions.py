"""Top-k next-token predictions at the final position."""

from __future__ import annotations

import torch

from core import plots
from core.config import DEFAULTS, LIMITS
from core.model import NO_HOOKS, Model, PromptJob, PromptReader, PromptRun, check_int, one_pass, str_tokens
from core.registry import PROMPT, Input, Technique
from core.results import Predictions
from examples import EIFFEL


def _prepare(model: Model, k: int):
    return NO_HOOKS, check_int(k, "k", 1, min(LIMITS.max_top_k, model.cfg.d_vocab))


def _read(model: Model, run: PromptRun, k: int) -> Predictions:
    probs = torch.softmax(run.logits[0, -1].double(), dim=-1)
    top = probs.topk(k)
    return Predictions(
        tokens=str_tokens(model, run.tokens),
        top_tokens=[model.tokenizer.decode([int(i)]) for i in top.indices],
        top_probs=top.values.cpu().numpy(),
    )


READER = PromptReader(_prepare, _read)


@one_pass
def predict(model: Model, prompt: str, k: int = DEFAULTS.top_k) -> PromptJob:
    """The k likeliest next tokens at the final position, with their probabilities: called, a `Predictions`
    (one_pass runs the job described here)."""
    _prepare(model, k)  # k is checked before the prompt
    return PromptJob(prompt, ((READER, (k,)),))


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
    reads_prompt=READER,
)
