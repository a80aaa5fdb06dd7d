"""Exact activation patching without redundant work: the same numbers as one forward pass per
patch (`transformer_lens.patching`), computed from only the activations a patch can change.

A GPT-2-style model is re-expressed in plain tensor algebra from its (folded) weights, and:
- positions before the first token where the prompts differ are identical in both runs
  (causal attention), so patching them changes nothing: their scores are exactly 0;
- a patch at layer l starts from the corrupted run's residual stream there, not from the
  embeddings, and a patch at position p recomputes only positions >= p, attending to the
  corrupted run's keys and values for the earlier positions;
- the final layer computes keys and values everywhere but queries, attention output and MLP
  only at the final position, and only the two logits of the metric are ever unembedded;
- all patches of all sweeps travel together: at each layer every patch that has started
  is one row block of the same matrix products.

`Engine.supports(model)` says whether a model fits (GPT-2 family: learned absolute positions,
LayerNorm, sequential attention then MLP); `core.patching` falls back to hooks otherwise and
checks every fast answer's unpatched runs against the model's own forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.model import Model

ACTIVATIONS = {
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
}


@dataclass(frozen=True)
class Trace:
    """Every activation of one unpatched run (one prompt), position-major."""

    resid_pre: Float[Tensor, "layer_plus_1 pos d_model"]  # index n_layers = the final residual stream
    resid_mid: Float[Tensor, "layer pos d_model"]
    attn_out: Float[Tensor, "layer pos d_model"]
    mlp_out: Float[Tensor, "layer pos d_model"]
    z: Float[Tensor, "layer pos head d_head"]
    k: Float[Tensor, "layer pos head d_head"]
    v: Float[Tensor, "layer pos head d_head"]
    metric: float  # logit(answer) - logit(wrong) at the final position


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight + bias


class Engine:
    """A model's weights as plain tensors, and the passes exact patching needs."""

    def __init__(self, model: Model):
        cfg = model.cfg
        self.n_layers, self.n_heads, self.d_head = cfg.n_layers, cfg.n_heads, cfg.d_head
        self.eps = cfg.eps
        self.scale = 1.0 / math.sqrt(cfg.d_head)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.device = model.W_E.device
        with torch.no_grad():
            self.W_E, self.W_pos = model.W_E.detach(), model.W_pos.detach()
            self.W_Q, self.b_Q = model.W_Q.detach(), model.b_Q.detach()
            self.W_K, self.b_K = model.W_K.detach(), model.b_K.detach()
            self.W_V, self.b_V = model.W_V.detach(), model.b_V.detach()
            self.W_O, self.b_O = model.W_O.detach(), model.b_O.detach()
            self.W_in, self.b_in = model.W_in.detach(), model.b_in.detach()
            self.W_out, self.b_out = model.W_out.detach(), model.b_out.detach()
            self.W_U, self.b_U = model.W_U.detach(), model.b_U.detach()
            d = cfg.d_model
            # [layer, head, d_model, d_head] -> [layer, d_model, head * d_head]: one matmul per projection
            self.W_QKV = torch.cat([w.permute(0, 2, 1, 3).reshape(self.n_layers, d, -1) for w in (self.W_Q, self.W_K, self.W_V)], -1)
            self.b_QKV = torch.cat([b.reshape(self.n_layers, -1) for b in (self.b_Q, self.b_K, self.b_V)], -1)
            self.W_O_flat = self.W_O.reshape(self.n_layers, -1, d)
            self.ln1 = [self._ln_params(block.ln1) for block in model.blocks]
            self.ln2 = [self._ln_params(block.ln2) for block in model.blocks]
            self.ln_final = self._ln_params(model.ln_final)

    @staticmethod
    def supports(model: Model) -> bool:
        cfg = model.cfg
        return (
            cfg.positional_embedding_type == "standard"
            and cfg.normalization_type in ("LN", "LNPre")
            and not cfg.parallel_attn_mlp
            and not cfg.attn_only
            and not cfg.gated_mlp
            and cfg.act_fn in ACTIVATIONS
            and cfg.use_attn_scale
            and not getattr(cfg, "use_local_attn", False)
            and getattr(cfg, "n_key_value_heads", None) in (None, cfg.n_heads)
            and getattr(cfg, "attn_scores_soft_cap", -1.0) <= 0
            and getattr(cfg, "output_logits_soft_cap", -1.0) <= 0
            and all(hasattr(block, "ln1") and hasattr(block, "ln2") for block in model.blocks)
        )

    def _ln_params(self, bridge) -> tuple[Tensor, Tensor]:
        layer_norm = getattr(bridge, "original_component", None)
        weight = getattr(layer_norm, "weight", None)
        bias = getattr(layer_norm, "bias", None)
        d = self.W_E.shape[-1]
        weight = torch.ones(d, device=self.device) if weight is None else weight.detach()
        bias = torch.zeros(d, device=self.device) if bias is None else bias.detach()
        return weight, bias

    def _ln(self, x: Tensor, params: tuple[Tensor, Tensor]) -> Tensor:
        return _layer_norm(x, params[0], params[1], self.eps)

    def metric_direction(self, answer_id: int, wrong_id: int) -> tuple[Tensor, Tensor]:
        return self.W_U[:, answer_id] - self.W_U[:, wrong_id], self.b_U[answer_id] - self.b_U[wrong_id]

    def _metric(self, final_resid: Float[Tensor, "... d_model"], direction) -> Tensor:
        return self._ln(final_resid, self.ln_final) @ direction[0] + direction[1]

    # --- one whole run, every activation kept --------------------------------------------

    def trace(self, tokens: Int[Tensor, "pos"], direction) -> Trace:
        n, H, dh = tokens.shape[-1], self.n_heads, self.d_head
        x = self.W_E[tokens] + self.W_pos[:n]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        keep: dict[str, list[Tensor]] = {k: [] for k in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "k", "v")}
        for layer in range(self.n_layers):
            keep["resid_pre"].append(x)
            qkv = self._ln(x, self.ln1[layer]) @ self.W_QKV[layer] + self.b_QKV[layer]
            q, k, v = (t.reshape(n, H, dh) for t in qkv.split(H * dh, -1))
            scores = torch.einsum("qhd,khd->hqk", q, k) * self.scale
            pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
            z = torch.einsum("hqk,khd->qhd", pattern, v)
            attn_out = z.reshape(n, H * dh) @ self.W_O_flat[layer] + self.b_O[layer]
            x = x + attn_out
            keep["resid_mid"].append(x)
            mlp_out = self.act(self._ln(x, self.ln2[layer]) @ self.W_in[layer] + self.b_in[layer]) @ self.W_out[layer] + self.b_out[layer]
            x = x + mlp_out
            for name, value in (("attn_out", attn_out), ("mlp_out", mlp_out), ("z", z), ("k", k), ("v", v)):
                keep[name].append(value)
        keep["resid_pre"].append(x)
        stacked = {name: torch.stack(values) for name, values in keep.items()}
        return Trace(**stacked, metric=float(self._metric(x[-1], direction)))

    # --- many patched runs at once ------------------------------------------------------

    def patched_metrics(self, corrupted: Trace, start: int, jobs: list["Job"], direction) -> Float[Tensor, "job"]:
        """The metric of each job's patched run. Every job's residual stream is given for
        positions start.. (rows before a job's `live` position equal the corrupted run's)."""
        T = corrupted.resid_pre.shape[1] - start
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i].layer, jobs[i].stage))
        x = corrupted.resid_pre.new_zeros(0, T, corrupted.resid_pre.shape[-1])
        live = torch.zeros(0, T, dtype=torch.bool, device=self.device)
        added = 0

        def join(layer: int, stage: int):
            nonlocal x, live, added
            group = []
            while added < len(order) and (jobs[order[added]].layer, jobs[order[added]].stage) == (layer, stage):
                group.append(jobs[order[added]])
                added += 1
            if group:
                x = torch.cat([x, torch.stack([job.resid for job in group])])
                positions = torch.arange(T, device=self.device)
                live = torch.cat([live, torch.stack([positions >= job.live for job in group])])

        for layer in range(self.n_layers):
            last = layer == self.n_layers - 1
            join(layer, Job.PRE)
            if len(x):
                x = self._attention(layer, x, live, corrupted, start, last)
            join(layer, Job.MID)
            if len(x):
                x = self._mlp(layer, x, live, last)
        join(self.n_layers, Job.PRE)
        assert added == len(order)
        metrics = torch.empty(len(jobs), dtype=torch.float64)
        metrics[torch.tensor(order, dtype=torch.long)] = self._metric(x[:, -1], direction).double().cpu()
        return metrics

    def _attention(self, layer: int, x: Tensor, live: Tensor, corrupted: Trace, start: int, last: bool) -> Tensor:
        B, T, _ = x.shape
        H, dh = self.n_heads, self.d_head
        query_rows = live.clone()
        if last:  # only the final position's output matters after the last layer
            query_rows[:, :-1] = False
        normed = self._ln(x[live], self.ln1[layer])
        w, b = self.W_QKV[layer], self.b_QKV[layer]
        k_new = (normed @ w[:, H * dh : 2 * H * dh] + b[H * dh : 2 * H * dh]).reshape(-1, H, dh)
        v_new = (normed @ w[:, 2 * H * dh :] + b[2 * H * dh :]).reshape(-1, H, dh)
        keys = corrupted.k[layer, start:].expand(B, T, H, dh).clone()
        values = corrupted.v[layer, start:].expand(B, T, H, dh).clone()
        keys[live], values[live] = k_new, v_new
        q = (self._ln(x[query_rows], self.ln1[layer]) @ w[:, : H * dh] + b[: H * dh]).reshape(-1, H, dh)
        queries = x.new_zeros(B, T, H, dh)
        queries[query_rows] = q
        prefix_k, prefix_v = corrupted.k[layer, :start], corrupted.v[layer, :start]  # [start, head, d_head]
        own = torch.einsum("bqhd,bkhd->bhqk", queries, keys)
        before = torch.einsum("bqhd,khd->bhqk", queries, prefix_k)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        scores = torch.cat([before, own.masked_fill(~causal, float("-inf"))], -1) * self.scale
        pattern = torch.softmax(scores, -1)
        z = torch.einsum("bhqk,khd->bqhd", pattern[..., :start], prefix_v) + torch.einsum(
            "bhqk,bkhd->bqhd", pattern[..., start:], values
        )
        out = z[query_rows].reshape(-1, H * dh) @ self.W_O_flat[layer] + self.b_O[layer]
        x = x.clone()
        x[query_rows] += out
        return x

    def _mlp(self, layer: int, x: Tensor, live: Tensor, last: bool) -> Tensor:
        rows = live.clone()
        if last:
            rows[:, :-1] = False
        hidden = self.act(self._ln(x[rows], self.ln2[layer]) @ self.W_in[layer] + self.b_in[layer])
        x = x.clone()
        x[rows] += hidden @ self.W_out[layer] + self.b_out[layer]
        return x


@dataclass(frozen=True)
class Job:
    """One patched run: its residual stream (positions start..) when it enters `layer` at `stage`,
    and the first position (relative to start) whose activations differ from the corrupted run."""

    PRE, MID = 0, 1  # enters before the attention / before the MLP of `layer`

    layer: int
    stage: int
    resid: Float[Tensor, "pos d_model"]
    live: int


def sweep_jobs(engine: Engine, clean: Trace, corrupted: Trace, start: int) -> dict[str, list[tuple[tuple[int, int], Job]]]:
    """For each sweep, ((layer, index), job) for every patch that can change anything: positions
    from `start` (the first that differs) for the by-position sweeps, every head for head_out."""
    n_pos = corrupted.resid_pre.shape[1]
    jobs: dict[str, list] = {"resid_pre": [], "attn_out": [], "mlp_out": [], "head_out": []}
    for layer in range(engine.n_layers):
        for pos in range(start, n_pos):
            row = pos - start
            resid = corrupted.resid_pre[layer, start:].clone()
            resid[row] = clean.resid_pre[layer, pos]
            jobs["resid_pre"].append(((layer, pos), Job(layer, Job.PRE, resid, row)))
            resid = corrupted.resid_mid[layer, start:].clone()
            resid[row] += clean.attn_out[layer, pos] - corrupted.attn_out[layer, pos]
            jobs["attn_out"].append(((layer, pos), Job(layer, Job.MID, resid, row)))
            resid = corrupted.resid_pre[layer + 1, start:].clone()
            resid[row] += clean.mlp_out[layer, pos] - corrupted.mlp_out[layer, pos]
            jobs["mlp_out"].append(((layer, pos), Job(layer + 1, Job.PRE, resid, row)))
        z_change = clean.z[layer, start:] - corrupted.z[layer, start:]  # [pos, head, d_head]
        head_writes = torch.einsum("phd,hdm->hpm", z_change, engine.W_O[layer])
        for head in range(engine.n_heads):
            resid = corrupted.resid_mid[layer, start:] + head_writes[head]
            jobs["head_out"].append(((layer, head), Job(layer, Job.MID, resid, 0)))
    return jobs


def exact_patching(
    engine: Engine,
    clean_tokens: Int[Tensor, "pos"],
    corrupted_tokens: Int[Tensor, "pos"],
    answer_id: int,
    wrong_id: int,
    max_rows: int,
) -> tuple[Trace, Trace, dict[str, Float[Tensor, "layer index"]]]:
    """Raw metrics (not normalised) of every single-component patch of the four sweeps, with the
    clean and corrupted traces. `max_rows` bounds the patched positions evaluated together."""
    direction = engine.metric_direction(answer_id, wrong_id)
    with torch.no_grad():
        clean, corrupted = engine.trace(clean_tokens, direction), engine.trace(corrupted_tokens, direction)
        differs = (clean_tokens != corrupted_tokens).nonzero()
        n_pos = corrupted_tokens.shape[-1]
        start = int(differs[0]) if len(differs) else n_pos
        sizes = {"resid_pre": n_pos, "attn_out": n_pos, "mlp_out": n_pos, "head_out": engine.n_heads}
        raw = {name: torch.full((engine.n_layers, size), corrupted.metric, dtype=torch.float64) for name, size in sizes.items()}
        if start == n_pos:
            return clean, corrupted, raw
        jobs = [(name, index, job) for name, items in sweep_jobs(engine, clean, corrupted, start).items() for index, job in items]
        chunk = max(1, max_rows // (n_pos - start))
        for first in range(0, len(jobs), chunk):
            part = jobs[first : first + chunk]
            metrics = engine.patched_metrics(corrupted, start, [job for _, _, job in part], direction)
            for (name, index, _), value in zip(part, metrics.tolist()):
                raw[name][index] = value
    return clean, corrupted, raw
