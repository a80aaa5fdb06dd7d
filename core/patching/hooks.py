"""The hook engine: exact patching through TransformerLens hooks, for any model TransformerLens runs
(the fast engine, `core.patching.fast`, covers the GPT-2 family). Many patches per batched forward
pass; each patched run is a whole forward pass of the corrupted prompt with one activation replaced."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.attribution import direct_logit_attribution
from core.config import DEFAULTS
from core.contrast import SWEEP_HOOKS, SWEEPS, ContrastPair, LogitDiff, Sweep
from core.model import Model, run_cached
from core.registry import Progress


def _patch_hook(indices: Int[Tensor, " batch"], clean: Tensor, axis: str):
    """Row b of the batch gets the clean activation at position (or head) indices[b]."""

    def hook(activation, hook):
        activation = activation.clone()
        rows = torch.arange(len(indices), device=activation.device)
        if axis == "pos":
            activation[rows, indices] = clean[0, indices]
        else:  # [batch, pos, head, d_head]: head indices[b] at every position
            activation[rows, :, indices] = clean[0][:, indices].transpose(0, 1)
        return activation

    return hook


def patch_sweep(
    model: Model, corrupted_tokens: Int[Tensor, "1 pos"], clean_cache, metric: LogitDiff, sweep: Sweep
) -> Float[Tensor, "layer index"]:
    """Raw metric (not normalised) for every single-component patch of one sweep."""
    n_pos = corrupted_tokens.shape[-1]
    size = sweep.size(n_pos, model.cfg.n_heads)
    chunk = max(1, min(DEFAULTS.patch_batch_size, DEFAULTS.tokens_per_forward // n_pos))
    out = torch.zeros(model.cfg.n_layers, size, dtype=torch.float64)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.{sweep.hook}"
        for indices in torch.arange(size).split(chunk):
            batch = corrupted_tokens.expand(len(indices), -1)
            hook = _patch_hook(indices.to(corrupted_tokens.device), clean_cache[name], sweep.axis)
            logits = model.run_with_hooks(batch, fwd_hooks=[(name, hook)])
            out[layer, indices] = metric.of_logits(logits).cpu()
    return out


class HookRun:
    """One contrast pair through hooks: its unpatched values (the model's own forward pass), every
    sweep, and head DLA on the clean prompt."""

    def __init__(self, model: Model, pair: ContrastPair):
        self.model, self.pair = model, pair
        with torch.no_grad():
            self.clean_value, self.corrupted_value = (float(pair.metric.of_logits(model(t))[0]) for t in (pair.clean_tokens, pair.corrupted_tokens))

    def sweeps(self, progress: Progress | None = None, rows_per_pass: int | None = None) -> dict[str, Float[Tensor, "layer index"]]:
        """Raw metrics of every sweep: one batched forward pass per chunk of patches (`rows_per_pass`:
        the fast engine's setting; batches here are DEFAULTS.patch_batch_size)."""
        raw = {}
        with torch.no_grad():
            _, clean_cache = run_cached(self.model, self.pair.clean_tokens, lambda name: name.endswith(SWEEP_HOOKS))
            for step, (name, sweep) in enumerate(SWEEPS.items()):
                if progress is not None:
                    progress(step / len(SWEEPS), f"patching {name}")
                raw[name] = patch_sweep(self.model, self.pair.corrupted_tokens, clean_cache, self.pair.metric, sweep)
        return raw

    def head_dla(self) -> Float[np.ndarray, "layer head"]:
        pair = self.pair
        return direct_logit_attribution(self.model, pair.clean_prompt, pair.answer, pair.wrong_answer).heads
