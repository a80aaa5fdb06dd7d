"""Patching on contrast pairs, with one contract (`core.contrast`: the pair, the metric, the sweeps):

- `exact.py`: activation patching, exact, on either engine:
  - `fast.py`: the fast engine (GPT-2 family): only what each patch can change, all patches at once;
  - `hooks.py`: the hook engine (any model): batched forward passes with TransformerLens hooks;
- `attribution.py`: attribution patching, the linear approximation, and its agreement with exact.
"""

from core.patching.attribution import agreement, attribution_patching
from core.patching.exact import activation_patching

__all__ = ["activation_patching", "agreement", "attribution_patching"]
