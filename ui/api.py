"""The JSON endpoints for gradio_client, one per technique (README lists them)."""

from __future__ import annotations

import gradio as gr

from ui.common import HEAVY, LIGHT, user_errors
from ui.handlers import Handlers


def build(h: Handlers) -> None:
    for name in ("predict", "logit_lens", "dla", "attention"):
        gr.api(user_errors(getattr(h, name)), api_name=name, **LIGHT)
    for name in ("induction", "patching", "attribution_patching"):
        gr.api(user_errors(getattr(h, name)), api_name=name, **HEAVY)
