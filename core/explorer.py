"""The Prompt Explorer's four readings of one prompt (predictions, the logit lens, DLA, one layer's
attention) from one forward pass: each technique's `PromptReader`, in one `PromptJob` (core.model.one_pass)."""

from __future__ import annotations

from core.attention import READER as ATTENTION
from core.attention import _prepare as _check_layer
from core.attribution import READER as DLA
from core.config import DEFAULTS
from core.logit_lens import READER as LENS
from core.model import Model, PromptJob, one_pass
from core.predictions import READER as PREDICTIONS
from core.predictions import _prepare as _check_k


@one_pass
def explore(
    model: Model, prompt: str, target: str | None = None, competing: str | None = None, layer: int = 0, k: int = DEFAULTS.top_k
) -> PromptJob:
    """The same results as predict, logit_lens, direct_logit_attribution and attention_patterns, from one
    pass: called, (Predictions, LogitLensResult, DLAResult, AttentionResult) (one_pass runs the job
    described here). `target` None: the model's top prediction (then the logit lens and DLA follow it)."""
    _check_k(model, k)  # the inputs that need no pass are checked before it, as each technique does
    _check_layer(model, layer)

    def targeted(*rest):  # the target (given, or the top prediction once the pass has run), then `rest`
        return (target, *rest) if target else lambda results: (results[0].top_tokens[0], *rest)

    return PromptJob(prompt, ((PREDICTIONS, (k,)), (LENS, targeted()), (DLA, targeted(competing)), (ATTENTION, (layer,))))
