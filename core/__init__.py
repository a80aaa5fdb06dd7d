"""CircuitBreaker's science: load a model, run a technique, get a result and a figure.

    from core import load_model, logit_lens, plots
    model = load_model("gpt2")                      # or a local Hugging Face model directory
    lens = logit_lens(model, "The Eiffel Tower is located in the city of", target=" Paris")
    plots.logit_lens_heatmap(lens).show()
    lens.to_dict()                                   # the JSON the API returns
"""

from core import plots
from core.attention import attention_patterns
from core.attribution import direct_logit_attribution
from core.config import DEFAULTS, LIMITS, Defaults, Limits
from core.contrast import SWEEPS, ContrastPair, LogitDiff
from core.factories import save_random_gpt2
from core.induction import induction_scores, repeated_random_tokens
from core.logit_lens import logit_lens
from core.model import ModelLoadError, load_model, load_with_fallback, single_token_id, to_tokens
from core.patching import activation_patching, agreement, attribution_patching
from core.predictions import predict
from core.results import (
    ApproximatePatchingResult,
    AttentionResult,
    DLAResult,
    InductionResult,
    LogitLensResult,
    PatchingResult,
    Predictions,
)

__all__ = [
    "DEFAULTS",
    "LIMITS",
    "SWEEPS",
    "ApproximatePatchingResult",
    "ContrastPair",
    "LogitDiff",
    "AttentionResult",
    "DLAResult",
    "Defaults",
    "Limits",
    "InductionResult",
    "LogitLensResult",
    "ModelLoadError",
    "PatchingResult",
    "Predictions",
    "activation_patching",
    "agreement",
    "attribution_patching",
    "attention_patterns",
    "direct_logit_attribution",
    "induction_scores",
    "load_model",
    "load_with_fallback",
    "logit_lens",
    "plots",
    "predict",
    "repeated_random_tokens",
    "save_random_gpt2",
    "single_token_id",
    "to_tokens",
]
