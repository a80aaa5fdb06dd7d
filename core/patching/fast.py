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
LayerNorm, sequential attention then MLP); `core.patching.exact` falls back to hooks otherwise, and
before trusting an engine checks its unpatched runs against the model's own forward pass.
`FastRun` is one contrast pair on the engine, with the same interface as the hook engine's `HookRun`.
The engine's plain forward pass (`Engine.layers`, `Engine.next_token_losses`) also serves induction
(`core.induction`), and, with its activations under TransformerLens's hook names (`Engine.run_with_cache`),
the prompt passes of predictions, the logit lens, DLA and attention (`core.model.prompt_pass`); each is
checked the same way (`core.patching.exact.verified_engine`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.config import DEFAULTS
from core.contrast import SWEEPS, ContrastPair
from core.model import Model
from core.products import linear, logsumexp, prepare, row_blocks
from core.registry import Progress

ACTIVATIONS = {  # the model's activation function -> core.products.linear's, applied inside the MLP's first product
    "gelu_new": "gelu_tanh",  # gelu_new and gelu_fast are both the tanh approximation of GELU (GPT-2's)
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


@dataclass(frozen=True)
class Step:
    """One layer of a forward pass, every activation [batch, pos, ...]."""

    layer: int
    resid_pre: Float[Tensor, "batch pos d_model"]
    k: Float[Tensor, "batch pos head d_head"]
    v: Float[Tensor, "batch pos head d_head"]
    pattern: Float[Tensor, "batch head dest_pos src_pos"]
    z: Float[Tensor, "batch pos head d_head"]
    attn_out: Float[Tensor, "batch pos d_model"]
    resid_mid: Float[Tensor, "batch pos d_model"]
    mlp_out: Float[Tensor, "batch pos d_model"]
    resid_post: Float[Tensor, "batch pos d_model"]


STEP_HOOKS = {  # a Step's activations under TransformerLens's hook names (blocks.<layer>.<name>), shaped as its cache holds them
    "resid_pre": "hook_resid_pre",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
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


class Engine:
    """A model's weights as plain tensors, and the passes exact patching needs (its whole forward pass, `layers`,
    also serves induction; circuits and path patching build on its pieces)."""

    def __init__(self, model: Model):
        cfg = model.cfg
        self.n_layers, self.n_heads, self.d_head = cfg.n_layers, cfg.n_heads, cfg.d_head
        self.eps = cfg.eps
        self.scale = 1.0 / math.sqrt(cfg.d_head)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.device = model.W_E.device
        per_layer = {f"blocks.{layer}.{hook}" for layer in range(self.n_layers) for hook in STEP_HOOKS.values()}
        self.hook_names = frozenset(per_layer | {"hook_embed", "hook_pos_embed", "ln_final.hook_scale"})  # what run_with_cache can give
        self.verified = False  # set once its unpatched runs are seen to match the model's own (core.patching.exact)
        with torch.no_grad():
            self.W_E, self.W_pos = model.W_E.detach(), model.W_pos.detach()
            self.W_O, self.b_O = model.W_O.detach(), model.b_O.detach()
            # the MLP weights per layer, as the model holds them (model.W_in would stack a copy: 226 MB for GPT-2)
            self.W_in, self.b_in = self._per_layer(model, "W_in"), model.b_in.detach()
            self.W_out, self.b_out = self._per_layer(model, "W_out"), model.b_out.detach()
            self.W_U, self.b_U = model.W_U.detach(), model.b_U.detach()
            self.W_U_T = self.W_U.T.contiguous()  # [vocab, d_model]: a block of tokens is contiguous (GPT-2's W_U is already stored so: no copy)
            d = cfg.d_model
            # [layer, head, d_model, d_head] -> [layer, head * d_head (q, k, v), d_model]: one product per projection, a
            # projection's rows contiguous, as core.products.linear takes them (85 MB for GPT-2; prepared below: as much again)
            qkv = torch.cat([w.detach().permute(0, 2, 1, 3).reshape(self.n_layers, d, -1) for w in (model.W_Q, model.W_K, model.W_V)], -1)
            self.W_QKV_T = qkv.transpose(1, 2).contiguous()
            self.b_QKV = torch.cat([b.detach().reshape(self.n_layers, -1) for b in (model.b_Q, model.b_K, model.b_V)], -1)
            self.W_O_flat = self.W_O.reshape(self.n_layers, -1, d)
            # each product's weight as `linear` takes it ([out, in]), prepared in oneDNN's layout (core.products.prepare:
            # a second copy of them, 340 MB for GPT-2 and 154 MB for the unembedding, for 1.1x-1.5x their products' rate)
            H, dh = self.n_heads, self.d_head
            self.qkv_weights = tuple(prepare(w) for w in self.W_QKV_T)
            final = self.W_QKV_T[-1]  # the final layer's queries and its keys and values apart (patched_metrics)
            self.final_q_weight, self.final_kv_weight = prepare(final[: H * dh]), prepare(final[H * dh :])
            self.out_weights = tuple(prepare(w.T) for w in self.W_O_flat)
            self.in_weights = tuple(prepare(w.T) for w in self.W_in)
            self.mlp_out_weights = tuple(prepare(w.T) for w in self.W_out)
            size = DEFAULTS.vocab_block  # the unembedding a block of tokens at a time (each prepared: 154 MB for GPT-2)
            self.unembed_blocks = tuple((start, prepare(block), bias) for start, block, bias in row_blocks(self.W_U_T, self.b_U, size))
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

    @staticmethod
    def _per_layer(model: Model, name: str) -> tuple[Tensor, ...]:
        """Each block's MLP weight `name`, the model's own tensor where its blocks expose it, else a slice of
        the stacked copy model.<name>."""
        own = tuple(getattr(block.mlp, name, None) for block in model.blocks)
        if all(isinstance(w, Tensor) for w in own):
            return tuple(w.detach() for w in own)
        return getattr(model, name).detach().unbind(0)

    def _ln_params(self, bridge) -> tuple[Tensor, Tensor]:
        layer_norm = getattr(bridge, "original_component", None)
        weight = getattr(layer_norm, "weight", None)
        bias = getattr(layer_norm, "bias", None)
        d = self.W_E.shape[-1]
        weight = torch.ones(d, device=self.device) if weight is None else weight.detach()
        bias = torch.zeros(d, device=self.device) if bias is None else bias.detach()
        return weight, bias

    def ln_scale(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
        """A LayerNorm's scale of residual stream `x`: the root mean square of x centred, eps included."""
        centred = x - x.mean(-1, keepdim=True)
        return (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def _ln(self, x: Tensor, params: tuple[Tensor, Tensor]) -> Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], params[0], params[1], self.eps)

    def _metric(self, final_resid: Float[Tensor, "... d_model"], direction) -> Tensor:
        return self._ln(final_resid, self.ln_final) @ direction[0] + direction[1]

    # --- one whole run, every activation kept --------------------------------------------

    def trace(self, tokens: Int[Tensor, " pos"], direction) -> Trace:
        return self.traces(tokens[None], [direction])[0]

    def traces(self, tokens: Int[Tensor, "batch pos"], directions: Sequence) -> list[Trace]:
        """Each prompt's Trace (prompts of one token length, one pass: small matrix products run several
        times below the machine's throughput, so a task's prompts travel together)."""
        keep: dict[str, list[Tensor]] = {name: [] for name in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "k", "v")}
        for step in self.layers(tokens):
            for name in keep:
                keep[name].append(getattr(step, name))
        x = step.resid_post
        keep["resid_pre"].append(x)
        stacked = {name: torch.stack(values, 1) for name, values in keep.items()}  # [batch, layer, ...]
        return [
            Trace(**{name: value[b] for name, value in stacked.items()}, metric=float(self._metric(x[b, -1], direction)))
            for b, direction in enumerate(directions)
        ]

    def layers(self, tokens: Int[Tensor, "batch pos"], differentiable: bool = False) -> Iterator[Step]:
        """The model's forward pass over `tokens`, one layer at a time: each layer's activations, in order
        (the last one's `resid_post` is the final residual stream). `differentiable`: the token embeddings
        are a leaf that needs a gradient, so that under torch.enable_grad() autograd records the run and
        every activation can be differentiated (the weights never need one)."""
        B, n, H, dh = *tokens.shape, self.n_heads, self.d_head
        embed = self.W_E[tokens]
        x = (embed.requires_grad_() if differentiable else embed) + self.W_pos[:n]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        for layer in range(self.n_layers):
            resid_pre = x
            q, k, v = (t.reshape(B, n, H, dh) for t in self.qkv(layer, x).split(H * dh, -1))
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
            pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
            attn_out = linear(z.reshape(B, n, H * dh), self.out_weights[layer], self.b_O[layer])
            resid_mid = x + attn_out
            mlp_out = self.mlp(layer, resid_mid)
            x = resid_mid + mlp_out
            yield Step(layer, resid_pre, k, v, pattern, z, attn_out, resid_mid, mlp_out, x)

    def run_with_cache(
        self, tokens: Int[Tensor, "batch pos"], names: Collection[str], positions: Sequence[int], differentiable: bool = False
    ) -> tuple[Float[Tensor, "batch position vocab"], dict[str, Tensor]]:
        """The model's `run_with_cache(tokens, names_filter=names)` on the engine: the logits at `positions`
        only (as Hugging Face's `logits_to_keep`), and the activations `names` (of `hook_names`), each
        shaped as the model's cache holds it. `differentiable`: as for `layers` (the activations are the
        run's own tensors, which the logits can be differentiated with respect to)."""
        B, n = tokens.shape
        cache: dict[str, Tensor] = {}
        if "hook_embed" in names:
            cache["hook_embed"] = self.W_E[tokens]
        if "hook_pos_embed" in names:
            cache["hook_pos_embed"] = self.W_pos[:n].expand(B, n, -1)
        for step in self.layers(tokens, differentiable):
            for field, hook in STEP_HOOKS.items():
                if (name := f"blocks.{step.layer}.{hook}") in names:
                    cache[name] = getattr(step, field)
        final = step.resid_post
        if "ln_final.hook_scale" in names:  # as the model's hook_scale: [batch, pos, 1]
            cache["ln_final.hook_scale"] = self.ln_scale(final)
        kept = final[:, torch.as_tensor(list(positions), dtype=torch.long, device=self.device)]
        return self.unembed(self._ln(kept, self.ln_final)), cache

    def next_token_losses(self, final_resid: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_minus_1"]:
        """Each position's cross-entropy loss on the token that follows it (float32, as
        `torch.nn.functional.cross_entropy` on the logits): the unembedding taken a block of tokens at a time
        (`unembed_blocks`: DEFAULTS.vocab_block tokens when the engine was built), each block's logsumexp taken
        while its logits are in cache, never a [row, vocab] tensor."""
        normed = self._ln(final_resid[:, :-1], self.ln_final).reshape(-1, final_resid.shape[-1])
        total = torch.full(normed.shape[:1], float("-inf"), device=self.device)
        for _, weight, bias in self.unembed_blocks:
            total = torch.logaddexp(total, logsumexp(linear(normed, weight, bias)))
        following = tokens[:, 1:].reshape(-1)
        target = (normed * self.W_U_T[following]).sum(-1) + self.b_U[following]
        return (total - target).view(tokens.shape[0], -1)

    def unembed(self, normed: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        """The logits of final-LayerNormed residual streams, a prepared block of tokens at a time (one product
        would read the unembedding as it is: 1.3x-1.4x slower here for 4-16 rows)."""
        return torch.cat([linear(normed, weight, bias) for _, weight, bias in self.unembed_blocks], -1)

    def qkv(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... qkv_head_d_head"]:
        """The layer's queries, keys and values (q, k, v, each [head, d_head], flattened) for residual stream `x`
        (its LayerNorm included)."""
        return linear(self._ln(x, self.ln1[layer]), self.qkv_weights[layer], self.b_QKV[layer])

    def mlp(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The layer's MLP output for residual stream `x` (its LayerNorm included)."""
        hidden = linear(self._ln(x, self.ln2[layer]), self.in_weights[layer], self.b_in[layer], self.act)
        return linear(hidden, self.mlp_out_weights[layer], self.b_out[layer])

    def head_dla(self, trace: Trace, direction) -> Float[Tensor, "layer head"]:
        """Each head's direct logit attribution at the final position: its output, centred and
        divided by the final LayerNorm's scale, on the metric's unembedding direction."""
        results = torch.einsum("lhd,lhdm->lhm", trace.z[:, -1], self.W_O)
        results = results - results.mean(-1, keepdim=True)
        return (results / self.ln_scale(trace.resid_pre[-1, -1]) * self.ln_final[0]) @ direction[0]

    # --- many patched runs at once ------------------------------------------------------

    def patched_metrics(self, corrupted: Trace | Sequence[Trace], start: int, jobs: list[Job], direction) -> Float[Tensor, " job"]:
        """The metric of each job's patched run. Every job's residual stream is given for
        positions start.. (rows before a job's `live` position equal the corrupted run's).
        `corrupted` and `direction`: one pair's, or a sequence of pairs' (of one token length) that
        each job's `pair` indexes, so the patches of many pairs travel together.
        State: x [job, pos, d_model]; `rows` indexes its live (job, pos) rows in x.view(-1, d_model)."""
        if not jobs:
            return torch.empty(0, dtype=torch.float64)
        traces = [corrupted] if isinstance(corrupted, Trace) else list(corrupted)
        directions = [direction] if isinstance(corrupted, Trace) else list(direction)
        present = sorted({job.pair for job in jobs}) if len(traces) > 1 else [0]
        if len(traces) > 1 and len(present) < len(traces):  # only the pairs these jobs read (the rest would be copied at every layer)
            local = {pair: i for i, pair in enumerate(present)}
            jobs = [dataclasses.replace(job, pair=local[job.pair]) for job in jobs]
            if len(present) == 1:  # one pair: its keys and values broadcast over the jobs
                return self.patched_metrics(traces[present[0]], start, jobs, directions[present[0]])
            return self.patched_metrics([traces[p] for p in present], start, jobs, [directions[p] for p in present])
        T = traces[0].resid_pre.shape[1] - start
        pairs = torch.zeros(0, dtype=torch.long, device=self.device)
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i].layer, jobs[i].stage))
        x = traces[0].resid_pre.new_zeros(0, T, traces[0].resid_pre.shape[-1])
        live = torch.zeros(0, T, dtype=torch.bool, device=self.device)
        rows = torch.zeros(0, dtype=torch.long, device=self.device)
        added = 0

        def join(layer: int, stage: int):
            nonlocal x, live, rows, added, pairs
            group = []
            while added < len(order) and (jobs[order[added]].layer, jobs[order[added]].stage) == (layer, stage):
                group.append(jobs[order[added]])
                added += 1
            if group:
                x = torch.cat([x, torch.stack([job.resid for job in group])])
                pairs = torch.cat([pairs, torch.tensor([job.pair for job in group], dtype=torch.long, device=self.device)])
                positions = torch.arange(T, device=self.device)
                live = torch.cat([live, torch.stack([positions >= job.live for job in group])])
                rows = live.reshape(-1).nonzero().squeeze(1)

        for layer in range(self.n_layers):
            last = layer == self.n_layers - 1
            join(layer, Job.PRE)
            if len(x):
                self._attention(layer, x, rows, traces, pairs, start, last)
            join(layer, Job.MID)
            if len(x):
                self._mlp(layer, x, rows, last)
        join(self.n_layers, Job.PRE)
        assert added == len(order)
        metrics = torch.empty(len(jobs), dtype=torch.float64)
        joined = torch.tensor(order, dtype=torch.long)  # x's rows, as indices into `jobs`
        if len(traces) == 1:
            metrics[joined] = self._metric(x[:, -1], directions[0]).double().cpu()
        else:
            for pair in pairs.unique().tolist():  # each pair's rows with its own answer and wrong token
                mine = (pairs == pair).nonzero().squeeze(1)
                metrics[joined[mine.cpu()]] = self._metric(x[mine, -1], directions[pair]).double().cpu()
        return metrics

    def _final_rows(self, x: Tensor) -> Tensor:
        """Flat indices of each job's final position."""
        B, T, _ = x.shape
        return torch.arange(B, device=self.device) * T + (T - 1)

    def _attention(self, layer: int, x: Tensor, rows: Tensor, traces: list[Trace], pairs: Tensor, start: int, last: bool) -> None:
        """Adds the attention output to x in place, at the live rows (only the final ones if `last`).
        Rows that are not live, and positions before `start`, read their pair's corrupted run."""
        B, T, d = x.shape
        H, dh = self.n_heads, self.d_head
        flat = x.view(-1, d)
        b = self.b_QKV[layer]
        normed = self._ln(flat.index_select(0, rows), self.ln1[layer])
        if last:  # keys and values everywhere, queries (and so outputs) only at the final position
            kv = linear(normed, self.final_kv_weight, b[H * dh :])
            query_rows = self._final_rows(x)
            q = linear(self._ln(flat.index_select(0, query_rows), self.ln1[layer]), self.final_q_weight, b[: H * dh])
        else:
            qkv = linear(normed, self.qkv_weights[layer], b)
            q, kv = qkv[:, : H * dh], qkv[:, H * dh :]
            query_rows = rows
        if len(traces) == 1:  # one pair: its corrupted keys and values broadcast over the jobs
            k_all, v_all = traces[0].k[layer], traces[0].v[layer]  # [pos, head, d_head]
            keys = k_all[start:].expand(B, T, H, dh).reshape(B * T, H * dh).clone()
            values = v_all[start:].expand(B, T, H, dh).reshape(B * T, H * dh).clone()
        else:  # several pairs: each job reads its own pair's
            k_all = torch.stack([trace.k[layer] for trace in traces])[pairs]  # [job, pos, head, d_head]
            v_all = torch.stack([trace.v[layer] for trace in traces])[pairs]
            keys = k_all[:, start:].reshape(B * T, H * dh).clone()
            values = v_all[:, start:].reshape(B * T, H * dh).clone()
        keys.index_copy_(0, rows, kv[:, : H * dh].contiguous())
        values.index_copy_(0, rows, kv[:, H * dh :].contiguous())
        queries = x.new_zeros(B * T, H * dh).index_copy_(0, query_rows, q.contiguous()).view(B, T, H, dh)
        keys, values = keys.view(B, T, H, dh), values.view(B, T, H, dh)
        own = torch.einsum("bqhd,bkhd->bhqk", queries, keys)
        if len(traces) == 1:
            prefix_k, prefix_v = k_all[:start], v_all[:start]  # [start, head, d_head]
            before = torch.einsum("bqhd,khd->bhqk", queries, prefix_k)
        else:
            prefix_k, prefix_v = k_all[:, :start], v_all[:, :start]  # [job, start, head, d_head]
            before = torch.einsum("bqhd,bkhd->bhqk", queries, prefix_k)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        scores = torch.cat([before, own.masked_fill(~causal, float("-inf"))], -1) * self.scale
        pattern = torch.softmax(scores, -1)
        prefix_z = torch.einsum("bhqk,khd->bqhd" if len(traces) == 1 else "bhqk,bkhd->bqhd", pattern[..., :start], prefix_v)
        z = prefix_z + torch.einsum("bhqk,bkhd->bqhd", pattern[..., start:], values)
        z = z.reshape(B * T, H * dh).index_select(0, query_rows)
        flat.index_add_(0, query_rows, linear(z, self.out_weights[layer], self.b_O[layer]))

    def _mlp(self, layer: int, x: Tensor, rows: Tensor, last: bool) -> None:
        """Adds the MLP output to x in place, at the live rows (only the final ones if `last`)."""
        flat = x.view(-1, x.shape[-1])
        if last:
            rows = self._final_rows(x)
        hidden = linear(self._ln(flat.index_select(0, rows), self.ln2[layer]), self.in_weights[layer], self.b_in[layer], self.act)
        flat.index_add_(0, rows, linear(hidden, self.mlp_out_weights[layer], self.b_out[layer]))


@dataclass(frozen=True)
class Job:
    """One patched run: its residual stream (positions start..) when it enters `layer` at `stage`,
    and the first position (relative to start) whose activations differ from the corrupted run."""

    PRE, MID = 0, 1  # enters before the attention / before the MLP of `layer`

    layer: int
    stage: int
    resid: Float[Tensor, "pos d_model"]
    live: int
    pair: int = 0  # which pair's corrupted run it reads (patched_metrics with several pairs)


def sweep_jobs(
    engine: Engine, clean: Trace, corrupted: Trace, start: int, pair: int = 0, sweeps: Sequence[str] = tuple(SWEEPS)
) -> Iterator[tuple[str, tuple[int, int], Job]]:
    """(sweep, (layer, index), job) for every patch of `sweeps` that can change anything: positions
    from `start` (the first that differs) for the by-position sweeps, every head for the by-head one;
    `pair` marks the jobs as that pair's. A generator, so only the jobs of the chunk being computed
    are ever in memory."""
    n_pos = corrupted.resid_pre.shape[1]
    # where a patch enters block `layer` (Sweep.enters): the layer its job starts at, the stage, the stream it changes
    entry = {
        "pre": lambda layer: (layer, Job.PRE, corrupted.resid_pre[layer]),
        "mid": lambda layer: (layer, Job.MID, corrupted.resid_mid[layer]),
        "post": lambda layer: (layer + 1, Job.PRE, corrupted.resid_pre[layer + 1]),
    }

    def job(sweep, layer: int, row: int, change: Tensor, value=None) -> Job | None:
        """The residual stream where `sweep` enters `layer`, plus `change` from `row` on (or `value` at
        `row`); None when the patch changes nothing (its score is then exactly the corrupted metric)."""
        if not torch.any(change != 0):
            return None
        at, stage, base = entry[sweep.enters](layer)
        resid = base[start:].clone()
        if value is None:
            resid[row : row + len(change)] += change
        else:
            resid[row] = value
        return Job(at, stage, resid, row, pair)

    by_pos = [SWEEPS[name] for name in sweeps if SWEEPS[name].axis == "pos"]
    by_head = [SWEEPS[name] for name in sweeps if SWEEPS[name].axis == "head"]
    for layer in range(engine.n_layers):
        for pos in range(start, n_pos):
            for sweep in by_pos:  # the Trace holds each by-position sweep's activation under its name
                ours, theirs = getattr(clean, sweep.name)[layer, pos], getattr(corrupted, sweep.name)[layer, pos]
                patch = job(sweep, layer, pos - start, (ours - theirs)[None], ours if sweep.replaces_stream else None)
                if patch is not None:
                    yield sweep.name, (layer, pos), patch
        for sweep in by_head:  # a head's output at all positions: its z through its slice of W_O
            z_change = clean.z[layer, start:] - corrupted.z[layer, start:]  # [pos, head, d_head]
            head_writes = torch.einsum("phd,hdm->hpm", z_change, engine.W_O[layer])
            for head in range(engine.n_heads):
                patch = job(sweep, layer, 0, head_writes[head])
                if patch is not None:
                    yield sweep.name, (layer, head), patch


def exact_sweeps(
    engine: Engine, clean: Trace, corrupted: Trace, start: int, direction, max_rows: int, progress: Progress | None = None
) -> dict[str, Float[Tensor, "layer index"]]:
    """Raw metrics (not normalised) of every single-component patch of every sweep; positions before
    `start` (the first that differs) keep the corrupted metric. `max_rows` bounds the patched
    positions evaluated together (memory)."""
    with torch.no_grad():
        n_pos = corrupted.resid_pre.shape[1]
        raw = {
            name: torch.full((engine.n_layers, sweep.size(n_pos, engine.n_heads)), corrupted.metric, dtype=torch.float64)
            for name, sweep in SWEEPS.items()
        }
        jobs = sweep_jobs(engine, clean, corrupted, start)
        per_layer = sum((n_pos - start) if sweep.axis == "pos" else engine.n_heads for sweep in SWEEPS.values())
        total = engine.n_layers * per_layer  # at most
        chunk = max(1, max_rows // (n_pos - start))
        if progress is not None and getattr(progress, "shown", True):  # smaller passes: the progress shown advances in real steps
            chunk = max(1, min(chunk, -(-total // DEFAULTS.progress_steps)))
        done = 0
        while part := list(itertools.islice(jobs, chunk)):
            if progress is not None:
                progress(done / total, "exact activation patching")
            metrics = engine.patched_metrics(corrupted, start, [job for _, _, job in part], direction)
            for (name, index, _), value in zip(part, metrics.tolist()):
                raw[name][index] = value
            done += len(part)
    return raw


def evaluate_jobs(
    runs: Sequence[FastRun],
    jobs_of: Callable[[FastRun, int, int], Iterator[tuple[str, object, Job]]],
    count: Callable[[FastRun, int], int],
    rows_per_pass: int,
    progress: Progress | None,
    what: str,
) -> Iterator[tuple[int, str, object, float]]:
    """The metric of every job of several pairs' runs, the runs of one token length through the engine
    together (a chunk of jobs mixes pairs), each length from its earliest first difference `start`.
    `jobs_of(run, start, local)` gives a run's (name, index, job), each job marked `pair=local`;
    `count(run, start)` says how many at most (progress). Yields (the run's index in `runs`, name, index,
    metric); `rows_per_pass` bounds the patched positions evaluated together (memory)."""
    engine = runs[0].engine
    groups: dict[int, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(run.corrupted.resid_pre.shape[1], []).append(i)
    starts = {length: min(runs[i].pair.first_difference for i in members) for length, members in groups.items()}
    total = max(1, sum(count(runs[i], starts[length]) for length, members in groups.items() for i in members))
    done = 0
    for length, members in groups.items():
        start = starts[length]
        jobs = itertools.chain.from_iterable(jobs_of(runs[i], start, local) for local, i in enumerate(members))
        traces, directions = [runs[i].corrupted for i in members], [runs[i].direction for i in members]
        chunk = max(1, rows_per_pass // (length - start))
        while part := list(itertools.islice(jobs, chunk)):
            if progress is not None:
                progress(min(done / total, 1.0), what)
            metrics = engine.patched_metrics(traces, start, [job for _, _, job in part], directions)
            for (name, index, job), value in zip(part, metrics.tolist()):
                yield members[job.pair], name, index, value
            done += len(part)


class FastRun:
    """One contrast pair on the fast engine: both prompts traced once, then every patch from the traces."""

    def __init__(self, engine: Engine, pair: ContrastPair, traces: tuple[Trace, Trace] | None = None):
        self.engine, self.pair = engine, pair
        self.direction = pair.metric.direction(engine.W_U, engine.b_U)
        if traces is None:
            with torch.no_grad():
                traces = tuple(engine.traces(torch.cat([pair.clean_tokens, pair.corrupted_tokens]), [self.direction] * 2))
        self.clean, self.corrupted = traces
        self.clean_value, self.corrupted_value = self.clean.metric, self.corrupted.metric

    @classmethod
    def many(cls, engine: Engine, pairs: Sequence[ContrastPair], rows_per_pass: int = DEFAULTS.patch_rows_per_pass) -> list[FastRun]:
        """Every pair's run, the prompts of each token length traced together (`rows_per_pass` positions a pass)."""
        directions = [pair.metric.direction(engine.W_U, engine.b_U) for pair in pairs]
        groups: dict[int, list[int]] = {}
        for i, pair in enumerate(pairs):
            groups.setdefault(pair.clean_tokens.shape[-1], []).append(i)
        traces: dict[int, tuple[Trace, Trace]] = {}
        with torch.no_grad():
            for length, members in groups.items():
                per_pass = max(1, rows_per_pass // (2 * length))
                for at in range(0, len(members), per_pass):
                    part = members[at : at + per_pass]
                    tokens = torch.cat([torch.cat([pairs[i].clean_tokens, pairs[i].corrupted_tokens]) for i in part])
                    done = engine.traces(tokens, [directions[i] for i in part for _ in range(2)])
                    traces.update((i, (done[2 * j], done[2 * j + 1])) for j, i in enumerate(part))
        return [cls(engine, pair, traces[i]) for i, pair in enumerate(pairs)]

    def sweeps(self, progress: Progress | None = None, rows_per_pass: int = DEFAULTS.patch_rows_per_pass) -> dict[str, Float[Tensor, "layer index"]]:
        return exact_sweeps(self.engine, self.clean, self.corrupted, self.pair.first_difference, self.direction, rows_per_pass, progress)

    def head_dla(self):
        return self.engine.head_dla(self.clean, self.direction).double().cpu().numpy()
