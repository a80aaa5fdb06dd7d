"""The computational graph of a GPT-2-style model, and edge attribution patching (EAP, Syed et al. 2023)
over it: every edge scored at once from two forward passes and one backward pass.

The graph is position-summed, as in EAP-IG and ACDC. Writers: the token embeddings, every attention
head, every MLP. Readers: every head's query, key and value input (its own copy of the residual
stream, before ln1), every MLP's input (before ln2), the logits (the final residual stream, before
ln_final). An edge joins each writer to each reader that comes after it: a head at layer l reaches
the MLP of layer l and everything from layer l + 1 on. GPT-2 Small: 32,491 edges.

Score of an edge (the convention of TransformerLens 4.3's `attribution_patch(..., granularity="edge")`,
the denoising form): sum over positions of (writer's clean output - its corrupted output) . d metric /
d reader input, the gradient taken on the corrupted run. Positive: restoring that edge's clean signal
raises the metric.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from core import plots
from core.config import DEFAULTS, LIMITS
from core.contrast import ContrastPair
from core.graph import Graph, build_graph
from core.model import Model, check_int
from core.patching.cost import check_budget, pairs_flops
from core.patching.exact import fast_engine, run_pairs
from core.patching.fast import Engine, FastRun, Job, evaluate_jobs
from core.patching.path import COMPONENTS, parse_senders, receiver_writes, sender_writes
from core.registry import Input, Progress, Technique
from core.results import CircuitResult, EdgeAttributionResult
from core.tasks import TASK_INPUTS, Task, checked_inputs, chosen_task, metric_values, size_field

ABLATIONS = ("corrupted", "mean")


# --- batched passes (the pairs of one token length together) ---------------------------------


@dataclass(frozen=True)
class _Batch:
    """Pairs of one token length: their tokens [batch, pos], metric directions, and where they first differ."""

    index: list[int]  # positions in the task's pair list
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    direction: Float[Tensor, "batch d_model"]
    bias: Float[Tensor, " batch"]
    start: int  # the first position where any of them differ: every writer's two outputs agree before it


def _rows(engine: Engine) -> int:
    """Positions per pass: DEFAULTS.edge_floats_per_pass over (writers x d_model), each position's footprint."""
    writers = 1 + engine.n_layers * (engine.n_heads + 1)
    return max(1, DEFAULTS.edge_floats_per_pass // (writers * engine.W_E.shape[-1]))


def _batches(engine: Engine, pairs: list[ContrastPair], rows: int) -> list[_Batch]:
    """The pairs grouped by token length, each group cut so that one batch holds at most `rows` positions."""
    groups: dict[int, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.clean_tokens.shape[-1], []).append(i)
    out = []
    for n, members in groups.items():
        size = max(1, rows // n)
        for at in range(0, len(members), size):
            part = members[at : at + size]
            directions = [pairs[i].metric.direction(engine.W_U, engine.b_U) for i in part]
            out.append(
                _Batch(
                    part,
                    torch.cat([pairs[i].clean_tokens for i in part]).to(engine.device),
                    torch.cat([pairs[i].corrupted_tokens for i in part]).to(engine.device),
                    torch.stack([d for d, _ in directions]),
                    torch.stack([torch.as_tensor(b) for _, b in directions]).to(engine.device),
                    min(min(pairs[i].first_difference for i in part), n - 1),
                )
            )
    return out


Prefix = list[tuple[Tensor, Tensor]]  # each layer's keys and values [batch, pos, head, d_head] at the positions before a run's start


def _forward(
    engine: Engine,
    embed: Float[Tensor, "batch pos d_model"],
    head_input: Callable[[int, Tensor], Tensor | None] | None = None,
    mlp_input: Callable[[int, Tensor], Tensor | None] | None = None,
    final_input: Callable[[Tensor], Tensor] | None = None,
    written: Callable[[Tensor], None] | None = None,
    prefix: Prefix | None = None,
    kept: Prefix | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """The model's forward pass from the token embeddings, with each reader's input open to change:
    `head_input(layer, stream)` may give every head's own q, k and v input [batch, pos, qkv, head, d_model],
    `mlp_input(layer, stream)` the MLP's, `final_input(stream)` the logits'; `written(outputs [batch,
    writer, pos, d_model])` sees the writers' outputs as they come (a layer's heads, then its MLP). Returns what the
    unembedding reads. With a `prefix` (`_prefix`), `embed` holds the positions after it only: the run
    starts there, attending to the prefix's keys and values. `kept`, if given, receives each layer's keys and values."""
    B, n, d = embed.shape
    H, dh, L = engine.n_heads, engine.d_head, engine.n_layers
    start = 0 if prefix is None else prefix[0][0].shape[1]
    causal = torch.ones(n, start + n, dtype=torch.bool, device=embed.device).tril(start)
    x = embed + engine.W_pos[start : start + n]
    for layer in range(L):
        own = head_input(layer, x) if head_input is not None else None
        if own is None:
            qkv = engine.qkv(layer, x).reshape(B, n, 3, H, dh)
        else:
            W = engine.W_QKV_T[layer].view(3, H, dh, d)
            qkv = torch.einsum("bpchm,chem->bpche", engine._ln(own, engine.ln1[layer]), W) + engine.b_QKV[layer].reshape(3, H, dh)
        q, k, v = qkv.unbind(2)
        if kept is not None:
            kept.append((k, v))
        if prefix is not None:
            k, v = torch.cat([prefix[layer][0], k], 1), torch.cat([prefix[layer][1], v], 1)
        pattern = torch.softmax((torch.einsum("bqhd,bkhd->bhqk", q, k) * engine.scale).masked_fill(~causal, float("-inf")), -1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        heads = torch.einsum("bphd,hdm->bhpm", z, engine.W_O[layer])
        x = x + heads.sum(1) + engine.b_O[layer]
        if written is not None:
            written(heads)
        into = mlp_input(layer, x) if mlp_input is not None else None
        mlp = engine.mlp(layer, x if into is None else into)
        x = x + mlp
        if written is not None:
            written(mlp[:, None])
    return x if final_input is None else final_input(x)


def _prefix(engine: Engine, tokens: Int[Tensor, "batch pos"], start: int) -> Prefix | None:
    """Each layer's keys and values at positions before `start` (None if 0), where a pair's clean and
    corrupted runs agree: the runs of edge scores and faithfulness start there."""
    if start == 0:
        return None
    kept: Prefix = []
    _forward(engine, engine.W_E[tokens[:, :start]], kept=kept)
    return kept


def _metric(engine: Engine, final: Tensor, batch: _Batch, repeats: int = 1) -> Float[Tensor, " batch"]:
    """The logit difference of each sequence (the batch's pairs `repeats` times over, pair-minor)."""
    normed = engine._ln(final[:, -1], engine.ln_final)
    return (normed * batch.direction.repeat(repeats, 1)).sum(-1) + batch.bias.repeat(repeats)


def _writer_outputs(engine: Engine, tokens: Int[Tensor, "batch pos"], prefix: Prefix | None = None) -> Float[Tensor, "batch writer pos d_model"]:
    """Every writer's output at every position (after the prefix), in Graph.writers order."""
    embed = engine.W_E[tokens[:, 0 if prefix is None else prefix[0][0].shape[1] :]]
    out = [embed[:, None]]
    _forward(engine, embed, written=out.append, prefix=prefix)
    return torch.cat(out, 1)


def _traced(
    engine: Engine, runs: list[FastRun], batch: _Batch, start: int, sides: tuple[str, ...] = ("clean", "corrupted")
) -> tuple[Prefix | None, list[Tensor]]:
    """The batch's `_prefix` at `start` and the `_writer_outputs` of each of its prompts' `sides`, read
    from its pairs' traces (`run_pairs`) instead of run again: the whole circuit view traces every prompt once."""
    out = []
    for side in sides:
        traces = [getattr(runs[i], side) for i in batch.index]
        heads = torch.einsum("blphd,lhdm->blhpm", torch.stack([t.z[:, start:] for t in traces]), engine.W_O)  # [batch, layer, head, pos, d_model]
        mlps = torch.stack([t.mlp_out[:, start:] for t in traces])[:, :, None]
        embed = engine.W_E[getattr(batch, side)[:, start:]][:, None]
        out.append(torch.cat([embed, torch.cat([heads, mlps], 2).flatten(1, 2)], 1))
    if start == 0:
        return None, out
    traces = [runs[i].clean for i in batch.index]
    keys, values = torch.stack([t.k[:, :start] for t in traces]), torch.stack([t.v[:, :start] for t in traces])  # [batch, layer, pos, head, d_head]
    return [(keys[:, layer], values[:, layer]) for layer in range(engine.n_layers)], out


def _reader_gradients(engine: Engine, embed: Tensor, batch: _Batch, prefix: Prefix | None = None) -> Float[Tensor, "batch reader pos d_model"]:
    """d metric / d every reader's input on the run from `embed`, in Graph.readers order. Each reader's
    input is the stream plus its own zero tap (every head's q, k and v, every MLP, the logits); one
    backward pass gives every tap's gradient, each with everything downstream of that reader in it."""
    B, n, d = embed.shape
    H, L = engine.n_heads, engine.n_layers
    head_taps = [torch.zeros(B, n, 3, H, d, device=embed.device, requires_grad=True) for _ in range(L)]
    mlp_taps = [torch.zeros(B, n, d, device=embed.device, requires_grad=True) for _ in range(L)]
    final_tap = torch.zeros(B, n, d, device=embed.device, requires_grad=True)
    with torch.enable_grad():
        final = _forward(
            engine,
            embed,
            head_input=lambda layer, x: x[:, :, None, None, :] + head_taps[layer],
            mlp_input=lambda layer, x: x + mlp_taps[layer],
            final_input=lambda x: x + final_tap,
            prefix=prefix,
        )
        grads = torch.autograd.grad(_metric(engine, final, batch).sum(), [*head_taps, *mlp_taps, final_tap])
    out = []
    for layer in range(L):
        out += [grads[layer].permute(0, 3, 2, 1, 4).reshape(B, H * 3, n, d), grads[L + layer][:, None]]  # head-major, then q, k, v
    out.append(grads[-1][:, None])
    return torch.cat(out, 1)


# --- edge scores (approximate) -----------------------------------------------------------------


def _engine(model: Model) -> Engine:
    engine = fast_engine(model)
    if engine is None:
        raise ValueError("Circuits need a GPT-2-style model (learned positions, LayerNorm, attention then MLP); this one is not.")
    return engine


def edge_scores(
    model: Model,
    pairs: list[ContrastPair],
    method: Literal["eap", "eap-ig"] = "eap",
    steps: int = DEFAULTS.eap_ig_steps,
    rows: int | None = None,
    progress: Progress | None = None,
    runs: list[FastRun] | None = None,
) -> Float[np.ndarray, "writer reader"]:
    """Every edge's score (0 where there is no edge), the mean over `pairs`. EAP: the gradient on the
    corrupted run. EAP-IG: the mean gradient over `steps` runs whose token embeddings go from the
    corrupted prompt's towards the clean one's (alpha = 1/steps, 2/steps, ..., 1, as Hanna et al.'s
    code), times the same clean - corrupted outputs. `runs`: the pairs' `run_pairs`, if already traced."""
    method = _method(method)
    if method == "eap-ig":
        _check_steps(steps)
    engine = _engine(model)
    graph = build_graph(engine.n_layers, engine.n_heads)
    alphas = [0.0] if method == "eap" else [k / steps for k in range(1, steps + 1)]
    total = torch.zeros(graph.edges.shape, dtype=torch.float64, device=engine.device)
    batches = _batches(engine, pairs, rows or _rows(engine))
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if progress is not None:
                progress(i / len(batches), f"edge scores ({method})")
            s = batch.start  # the two runs agree before it: every writer's difference is 0 there, so only later positions are run
            if runs is None:
                prefix = _prefix(engine, batch.clean, s)
                delta = _writer_outputs(engine, batch.clean, prefix) - _writer_outputs(engine, batch.corrupted, prefix)
            else:
                prefix, (clean_outputs, corrupted_outputs) = _traced(engine, runs, batch, s)
                delta = clean_outputs - corrupted_outputs
            clean, corrupted = engine.W_E[batch.clean[:, s:]], engine.W_E[batch.corrupted[:, s:]]
            grads = sum(_reader_gradients(engine, corrupted + alpha * (clean - corrupted), batch, prefix) for alpha in alphas)
            total += torch.einsum("bwpd,brpd->wr", delta, grads).double() / len(alphas)
    return np.where(graph.edges, total.cpu().numpy() / len(pairs), 0.0)


# --- faithfulness (exact) ----------------------------------------------------------------------


def _ablated_metrics(
    engine: Engine,
    batch: _Batch,
    replace: Float[Tensor, "batch writer pos d_model"],
    excluded: Bool[Tensor, "circuit writer reader"],
    start: int = 0,
    prefix: Prefix | None = None,
) -> Float[Tensor, "circuit batch"]:
    """The metric of each pair's clean run in which every reader's input has the live output of each
    writer `excluded` for it swapped for `replace`, once per circuit: exactly the run in which those
    edges carry the other signal (at every position from `start`; before it the swap must change nothing).
    `prefix`: the batch's `_prefix` at `start`, if already computed.

    Three kinds of reader, per circuit. One with every edge into it excluded ("ablated") reads the
    ablated stream: the positions, the biases and the replaced writers, the same in every circuit (so an
    ablated MLP is computed once for all circuits). One with none excluded reads the circuit's live
    stream. Only the rest ("mixed") get their own input, the live stream minus their excluded writers'
    live - replace, and their own LayerNorm: small circuits have few of them, large ones few excluded
    edges; the whole curve's circuits had about a sixth of their readers mixed (GPT-2-shaped, IOI)."""
    C, B, n, d = len(excluded), batch.clean.shape[0], batch.clean.shape[1] - start, engine.W_E.shape[-1]
    H, dh, L = engine.n_heads, engine.d_head, engine.n_layers
    per_layer = 3 * H + 1
    weights = excluded.to(engine.W_E.dtype)
    edges_in = torch.as_tensor(build_graph(L, H).edges.sum(0), device=excluded.device)  # writers before each reader
    count = excluded.sum(1)  # [circuit, reader]
    ablated_kind, live_kind = count == edges_in, count == 0
    mixed_kind = ~ablated_kind & ~live_kind
    prefix = _prefix(engine, batch.clean, start) if prefix is None else prefix

    # live - replace of each writer so far, writer-major, so each mixed reader's swap is one matrix product
    differences = engine.W_E.new_empty(C, excluded.shape[1], B, n, d)  # each writer's slot is written before any reader reads it
    replaced = replace.transpose(0, 1)  # [writer, batch, pos, d_model]
    filled = 0

    def write(outputs: Tensor) -> None:  # [circuit, writers, batch, pos, d_model]
        nonlocal filled
        k = outputs.shape[1]
        differences[:, filled : filled + k] = outputs - replaced[None, filled : filled + k]
        filled += k

    def mixed_input(x: Tensor, c: int, readers: Tensor) -> Tensor:  # [reader, batch, pos, d_model]: circuit c's mixed readers' input
        chosen = weights[c, :filled, readers].T  # [reader, writer]
        return x[c] - (chosen @ differences[c, :filled].reshape(filled, B * n * d)).view(len(readers), B, n, d)

    def reader_input(x: Tensor, reader: int) -> tuple[Tensor, Tensor]:  # an MLP's or the logits': (the circuits where it is not ablated, their inputs)
        own = (~ablated_kind[:, reader]).nonzero()[:, 0]
        inputs = x[own]
        for i, c in enumerate(own.tolist()):
            if mixed_kind[c, reader]:
                inputs[i] = mixed_input(x, c, torch.tensor([reader], device=x.device))[0]
        return own, inputs

    embed = engine.W_E[batch.clean[:, start:]]
    write(embed.expand(C, 1, B, n, d))
    x = (embed + engine.W_pos[start : start + n]).expand(C, B, n, d).clone()  # each circuit's live stream
    stream = engine.W_pos[start : start + n] + replace[:, 0]  # the ablated stream: positions, biases and every writer's replacement so far
    keys = None if prefix is None else [(k.repeat(C, 1, 1, 1), v.repeat(C, 1, 1, 1)) for k, v in prefix]
    causal = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)
    for layer in range(L):
        first = layer * per_layer
        W, bias = engine.W_QKV_T[layer], engine.b_QKV[layer]
        ablated = ablated_kind[:, first : first + 3 * H].view(C, H, 3)
        if ablated.any():
            qkv = engine.qkv(layer, stream).view(1, B, n, 3, H, dh).expand(C, -1, -1, -1, -1, -1).clone()
            live = (~ablated).flatten(1).any(1)  # the circuits with a reader on their own stream in this layer
            if live.any():
                own = engine.qkv(layer, x[live]).view(-1, B, n, 3, H, dh)
                qkv[live] = torch.where(ablated[live].transpose(1, 2)[:, None, None, :, :, None], qkv[live], own)
        else:
            qkv = engine.qkv(layer, x).view(C, B, n, 3, H, dh)  # every reader on its circuit's live stream
        for c in mixed_kind[:, first : first + 3 * H].any(1).nonzero()[:, 0].tolist():
            readers = mixed_kind[c, first : first + 3 * H].nonzero()[:, 0]
            head, component = readers // 3, readers % 3
            normed = engine._ln(mixed_input(x, c, readers + first), engine.ln1[layer]).view(len(readers), B * n, d)
            slices = W.view(3, H, dh, d)[component, head].transpose(1, 2)  # [reader, d_model, d_head]
            own = torch.bmm(normed, slices) + bias.view(3, H, 1, dh)[component, head]
            qkv[c].permute(2, 3, 0, 1, 4)[component, head] = own.view(len(readers), B, n, dh)
        q, k, v = qkv.view(C * B, n, 3, H, dh).unbind(2)
        if keys is not None:
            k, v = torch.cat([keys[layer][0], k], 1), torch.cat([keys[layer][1], v], 1)
        pattern = torch.softmax((torch.einsum("bqhd,bkhd->bhqk", q, k) * engine.scale).masked_fill(~causal, float("-inf")), -1)
        heads = torch.einsum("bphd,hdm->bhpm", torch.einsum("bhqk,bkhd->bqhd", pattern, v), engine.W_O[layer])
        x += heads.sum(1).view(C, B, n, d) + engine.b_O[layer]
        write(heads.view(C, B, H, n, d).transpose(1, 2))
        stream = stream + replace[:, 1 + layer * (H + 1) : 1 + layer * (H + 1) + H].sum(1) + engine.b_O[layer]
        mlp = torch.empty_like(x)
        if ablated_kind[:, first + 3 * H].any():
            mlp[ablated_kind[:, first + 3 * H]] = engine.mlp(layer, stream)  # the ablated MLP, the same in every circuit
        circuits, inputs = reader_input(x, first + 3 * H)
        if len(circuits):
            mlp[circuits] = engine.mlp(layer, inputs)
        write(mlp[:, None])
        x += mlp
        stream = stream + replace[:, 1 + layer * (H + 1) + H]
    final = stream[None, :, -1:].expand(C, B, 1, d).clone()
    circuits, inputs = reader_input(x, excluded.shape[2] - 1)
    final[circuits] = inputs[:, :, -1:]
    return _metric(engine, final.view(C * B, 1, d), batch, C).view(C, B)


def faithfulness(
    model: Model,
    pairs: list[ContrastPair],
    circuits: Bool[np.ndarray, "writer reader"] | Bool[np.ndarray, "circuit writer reader"],
    ablation: Literal["corrupted", "mean"] = "corrupted",
    rows: int | None = None,
    progress: Progress | None = None,
    runs: list[FastRun] | None = None,
) -> float | Float[np.ndarray, " circuit"]:
    """The fraction of the task's clean - corrupted gap each circuit recovers, exactly: each pair's
    clean run with every edge outside the circuit carrying the corrupted run's output of its writer
    ("corrupted") or the mean of that output over the pairs of its token length's corrupted prompts,
    per position ("mean"), at every position; mean (ablated - corrupted) / mean (clean - corrupted)."""
    values, _, _ = _faithfulness_runs(model, pairs, circuits, ablation, rows, progress, runs)
    return float(values[0]) if np.ndim(circuits) == 2 else values


def _faithfulness_runs(
    model: Model,
    pairs: list[ContrastPair],
    circuits: np.ndarray,
    ablation: str = "corrupted",
    rows: int | None = None,
    progress: Progress | None = None,
    runs: list[FastRun] | None = None,
) -> tuple[Float[np.ndarray, " circuit"], Float[np.ndarray, " pair"], Float[np.ndarray, " pair"]]:
    """faithfulness, with each pair's clean and corrupted metric (the reference runs; from `runs`, the
    pairs' `run_pairs`, if given, as are the prefix and the corrupted outputs)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"Unknown ablation {ablation!r}: choose {' or '.join(map(repr, ABLATIONS))}.")
    engine = _engine(model)
    graph = build_graph(engine.n_layers, engine.n_heads)
    excluded = torch.as_tensor(graph.edges & ~np.asarray(circuits, dtype=bool).reshape(-1, *graph.edges.shape), device=engine.device)
    rows = rows or _rows(engine)
    batches = _batches(engine, pairs, rows)
    ablated = np.zeros((len(excluded), len(pairs)))
    runnable = excluded.flatten(1).any(1).nonzero()[:, 0]  # the circuits that leave out an edge
    clean, corrupted = np.zeros(len(pairs)), np.zeros(len(pairs))
    with torch.no_grad():
        means = {}
        if ablation == "mean":
            for batch in batches:
                total, count = means.get(batch.clean.shape[1], (0.0, 0))
                outputs = _writer_outputs(engine, batch.corrupted) if runs is None else _traced(engine, runs, batch, 0, ("corrupted",))[1][0]
                means[batch.clean.shape[1]] = (total + outputs.sum(0), count + len(batch.index))
        for i, batch in enumerate(batches):
            if progress is not None:
                progress(i / len(batches), "faithfulness")
            start = batch.start if ablation == "corrupted" else 0  # the corrupted outputs equal the clean ones before the first difference
            if runs is None:
                prefix = _prefix(engine, batch.clean, start)
                replace = _writer_outputs(engine, batch.corrupted, prefix) if ablation == "corrupted" else None
                for tokens, values in ((batch.clean, clean), (batch.corrupted, corrupted)):
                    values[batch.index] = _metric(engine, _forward(engine, engine.W_E[tokens[:, start:]], prefix=prefix), batch).double().cpu().numpy()
            else:
                prefix, outputs = _traced(engine, runs, batch, start, ("corrupted",) if ablation == "corrupted" else ())
                replace = outputs[0] if outputs else None
                clean[batch.index] = [runs[j].clean_value for j in batch.index]
                corrupted[batch.index] = [runs[j].corrupted_value for j in batch.index]
            if ablation == "mean":
                total, count = means[batch.clean.shape[1]]
                replace = (total / count)[None].expand(len(batch.index), -1, -1, -1)
            ablated[:, batch.index] = clean[batch.index]  # a circuit with every edge is the clean run: only the others are run
            per_pass = max(1, rows // (len(batch.index) * (batch.clean.shape[1] - start)))
            for at in range(0, len(runnable), per_pass):
                part = runnable[at : at + per_pass]
                values = _ablated_metrics(engine, batch, replace, excluded[part], start, prefix)
                ablated[np.ix_(part.cpu().numpy(), batch.index)] = values.double().cpu().numpy()
    return (ablated.mean(1) - corrupted.mean()) / (clean.mean() - corrupted.mean()), clean, corrupted


# --- exact edge effects --------------------------------------------------------------------------


def exact_edge_effects(
    model: Model,
    pairs: list[ContrastPair],
    edges: list[tuple[str, str]],
    rows_per_pass: int = DEFAULTS.patch_rows_per_pass,
    progress: Progress | None = None,
    traced: tuple[list[FastRun], np.ndarray, np.ndarray] | None = None,
) -> Float[np.ndarray, " edge"]:
    """Each edge alone patched, exactly: the corrupted run with the writer's clean - corrupted output
    added to that one reader's input (path patching of one edge, as TransformerLens's
    `get_act_patch_direct_path` for a head sender), everything downstream of the reader recomputed;
    the mean over `pairs` of (patched - corrupted), in the metric's units like the edge scores.
    `traced`: the pairs' `run_pairs`, if already run."""
    engine = _engine(model)
    runs, _, corrupted = traced or run_pairs(model, pairs)
    if not all(isinstance(run, FastRun) for run in runs):
        raise ValueError("Exact edge effects need the fast engine, which does not match this model.")
    raw = np.zeros((len(pairs), len(edges)))
    L = engine.n_layers
    writers = list(dict.fromkeys(writer for writer, _ in edges))
    senders = dict(zip(writers, parse_senders(", ".join(writers), L, engine.n_heads)))  # "L9H9", "MLP3", "embed" as path patching reads them

    into_mlp: dict[int, list[int]] = {}  # MLP layer -> the edges into it
    for e, (_, reader) in enumerate(edges):
        if reader.startswith("MLP"):
            into_mlp.setdefault(int(reader[3:]), []).append(e)

    # each writer's write, and each edge into an MLP its output's change, for the pairs of one token length
    # together (one product, not one per pair: small products run slowly), when evaluate_jobs reaches that length
    prepared: dict[int, tuple[int, dict[str, Tensor], dict[int, Tensor]]] = {}  # run index -> (its place in its length, writes, MLP changes)
    place = {id(run): i for i, run in enumerate(runs)}

    def prepare(length: int, start: int) -> None:
        members = [i for i, run in enumerate(runs) if run.corrupted.resid_pre.shape[1] == length]
        cleans, bases = [runs[i].clean for i in members], [runs[i].corrupted for i in members]
        writes = {writer: write for writer, (_, write) in zip(senders, sender_writes(engine, cleans, bases, start, list(senders.values())))}
        mlps: dict[int, Tensor] = {}  # edge -> [pair, pos, d_model]
        per_pass = max(1, rows_per_pass // (len(members) * (length - start)))  # edges a product
        for layer, into in into_mlp.items():
            resid = torch.stack([base.resid_mid[layer, start:] for base in bases])
            out = torch.stack([base.mlp_out[layer, start:] for base in bases])
            for at in range(0, len(into), per_pass):
                chosen = into[at : at + per_pass]
                mlps.update(zip(chosen, engine.mlp(layer, torch.stack([resid + writes[edges[e][0]] for e in chosen])) - out))
        prepared.update((i, (j, writes, mlps)) for j, i in enumerate(members))

    def jobs_of(run: FastRun, start: int, local: int):
        base = run.corrupted
        if place[id(run)] not in prepared:
            prepare(base.resid_pre.shape[1], start)
        j, all_writes, all_mlps = prepared[place[id(run)]]
        writes = {writer: write[j] for writer, write in all_writes.items()}
        receivers: dict[tuple[str, int], Tensor] = {}  # (writer, layer) -> every head's write change at that layer
        for e, (writer, reader) in enumerate(edges):
            write = writes[writer]
            if reader == "logits":
                job = Job(L, Job.PRE, base.resid_pre[L, start:] + write, 0, local)
            elif e in all_mlps:
                layer = int(reader[3:])
                job = Job(layer + 1, Job.PRE, base.resid_pre[layer + 1, start:] + all_mlps[e][j], 0, local)
            else:
                head, component = reader.split(".")
                layer, index = (int(part) for part in head[1:].split("H"))
                if (writer, layer) not in receivers:
                    receivers[writer, layer] = receiver_writes(engine, base, layer, start, write)
                change = receivers[writer, layer][COMPONENTS.index(component), index]
                job = Job(layer, Job.MID, base.resid_mid[layer, start:] + change, 0, local)
            yield "edge", e, job

    for i, _, e, value in evaluate_jobs(runs, jobs_of, lambda run, start: len(edges), rows_per_pass, progress, "exact edge effects"):
        raw[i, e] = value
    return (raw - corrupted[:, None]).mean(0)


# --- choosing a circuit ------------------------------------------------------------------------------


def top_edges(graph: Graph, scores: np.ndarray, k: int) -> Bool[np.ndarray, "writer reader"]:
    """The k edges with the largest |score| (ties: the graph's order)."""
    flat = np.flatnonzero(graph.edges)
    chosen = flat[np.argsort(-np.abs(scores.ravel()[flat]), kind="stable")[:k]]
    mask = np.zeros(graph.edges.size, dtype=bool)
    mask[chosen] = True
    return mask.reshape(graph.edges.shape)


def greedy_edges(graph: Graph, scores: np.ndarray, k: int) -> Bool[np.ndarray, "writer reader"]:
    """A connected circuit of k edges grown from the logits (Hanna et al. 2024's greedy search): each step
    adds the edge of largest |score| whose reader is the logits or belongs to a node already in the
    circuit, so no edge hangs loose."""
    node_of_reader = [reader.split(".")[0] for reader in graph.readers]
    readers_of: dict[str, list[int]] = {}
    for r, node in enumerate(node_of_reader):
        readers_of.setdefault(node, []).append(r)
    mask = np.zeros(graph.edges.shape, dtype=bool)
    frontier: list[tuple[float, int, int]] = []
    reached: set[str] = set()

    def reach(node: str) -> None:
        if node in reached:
            return
        reached.add(node)
        for r in readers_of.get(node, []):
            for w in np.flatnonzero(graph.edges[:, r]):
                heapq.heappush(frontier, (-abs(scores[w, r]), int(w) * len(graph.readers) + r, int(w)))

    reach("logits")
    taken = 0
    while frontier and taken < k:
        _, flat, w = heapq.heappop(frontier)
        mask.flat[flat] = True
        taken += 1
        reach(graph.writers[w])
    return mask


def curve_sizes(n_edges: int, points: int = DEFAULTS.faithfulness_points) -> Int[np.ndarray, " point"]:
    """Circuit sizes from one edge to all of them, evenly spaced on a log scale."""
    return np.unique(np.round(np.geomspace(1, n_edges, points)).astype(np.int64))


SELECTIONS = {"greedy": greedy_edges, "top": top_edges}
METHODS = ("eap", "eap-ig")


def circuit_flops(
    model: Model, pairs: list[ContrastPair], method: str, steps: int, points: int = 0, searches: int = 0, checks: int = 0, ablation: str = "corrupted"
) -> float:
    """What a circuit request costs in forward passes' matrix products (core.patching.cost's count of one
    unpatched pass), each pair's passes over its positions from the first difference: the edge scores (two
    writer passes, then a forward and backward pass, about three, per gradient), the faithfulness of
    `points` + `searches` circuits and the two reference runs (every position under the mean ablation),
    `checks` single edges (from the reader's layer on: half a pass on average)."""
    gradients = 1 if method == "eap" else steps
    total = 0.0
    for pair in pairs:
        n = pair.clean_tokens.shape[-1]
        one = pairs_flops(model, [pair], sweeps=()) / 2
        after = (n - min(pair.first_difference, n - 1)) / n
        curve = (points + searches + 2) * (after if ablation == "corrupted" else 1.0) if points or searches else 0.0
        total += one * ((2 + 3 * gradients) * after + curve + checks * after / 2)
    return total


def _check_steps(steps: int) -> int:
    return check_int(steps, "steps", 1, LIMITS.max_eap_ig_steps)


def _task_pairs(model: Model, task: str, n: int, seed: int, pairs: str) -> tuple[Task, list[ContrastPair]]:
    chosen = chosen_task(model, task, n, seed, pairs)
    _engine(model)
    return chosen, chosen.contrast_pairs(model)


def _scores_result(cls, model: Model, task: Task, pairs: list[ContrastPair], method: str, steps: int, scores: np.ndarray, values=None, **more):
    """The result, with each pair's clean and corrupted metric (`values`, or computed here)."""
    graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
    if values is None:
        values = metric_values(model, [(p.clean_tokens, p.metric) for p in pairs]), metric_values(model, [(p.corrupted_tokens, p.metric) for p in pairs])
    return cls(
        task=task.name, description=task.description, method=method, steps=steps if method == "eap-ig" else 1, writers=graph.writers,
        readers=graph.readers, scores=scores, n_edges=graph.n_edges, clean_values=values[0], corrupted_values=values[1], **more,
    )


def edge_attribution(
    model: Model, task: str = "ioi", n: int = 32, seed: int = 0, pairs: str = "", method: str = "eap", steps: int = DEFAULTS.eap_ig_steps,
    progress: Progress | None = None,
) -> EdgeAttributionResult:
    """Every edge's EAP or EAP-IG score over a task (a built-in one, or your `pairs`)."""
    method = _method(method)
    _check_steps(steps)
    chosen, contrast = _task_pairs(model, task, n, seed, pairs)
    check_budget(circuit_flops(model, contrast, method, steps), len(contrast), f"Edge attribution ({method}) over {len(contrast)} pairs")
    scores = edge_scores(model, contrast, method, steps, progress=progress)
    return _scores_result(EdgeAttributionResult, model, chosen, contrast, method, steps, scores)


CHOICES = {  # circuit's choices: what may be chosen, and the message's words for them
    "selection": (SELECTIONS, "choose 'greedy' (a connected circuit) or 'top' (the largest |scores|)"),
    "ablation": (ABLATIONS, "choose 'corrupted' (the corrupted prompt's output) or 'mean' (the task's mean)"),
}


def _choice(value: str, name: str) -> str:
    choices, words = CHOICES[name]
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Unknown {name} {str(value)[:40]!r}: {words}.")
    return value


def _settings(graph: Graph, method, steps, selection, k, target, ablation, checks) -> dict[str, Callable[[], object]]:
    """circuit's checks of its settings, by input name, in the order the run makes them: each gives the
    setting as the run uses it, or raises the run's ValueError."""
    return {
        "method": lambda: _method(method),
        "steps": lambda: _check_steps(steps),
        "selection": lambda: _choice(selection, "selection"),
        "ablation": lambda: _choice(ablation, "ablation"),
        "k": lambda: check_int(k, "k", 1, graph.n_edges),
        "target": lambda: check_int(target, "target", 0, 100),
        "checks": lambda: check_int(checks, "checks", 0, min(LIMITS.max_edge_checks, graph.n_edges)),
    }


def _search(graph: Graph, target: int) -> tuple[np.ndarray, int]:
    """The circuit sizes the faithfulness curve measures, and the bisection steps a target adds."""
    return curve_sizes(graph.n_edges), int(np.ceil(np.log2(graph.n_edges))) if target else 0


def _circuit_budget(model: Model, contrast: list[ContrastPair], graph: Graph, settings: dict) -> None:
    method, steps, checks, ablation = (settings[name] for name in ("method", "steps", "checks", "ablation"))
    sizes, searches = _search(graph, settings["target"])
    check_budget(
        circuit_flops(model, contrast, method, steps, len(sizes) + 1, searches, checks, ablation), len(contrast),
        f"A circuit ({method}, {len(sizes)} faithfulness points, {checks} exact checks) over {len(contrast)} pairs",
    )


def _method(method: str) -> str:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"Unknown method {str(method)[:40]!r}: choose 'eap' (one gradient) or 'eap-ig' (integrated gradients over `steps`).")
    return method.lower()


def input_errors(
    model: Model, task: str = "ioi", n: int = 32, seed: int = 0, pairs: str = "", method: str = "eap", steps: int = DEFAULTS.eap_ig_steps,
    selection: str = "greedy", k: int = DEFAULTS.circuit_edges, target: int = 0, ablation: str = "corrupted", checks: int = DEFAULTS.edge_checks,
) -> dict[str, str]:
    """What is wrong with circuit's inputs, keyed by input, without running the model: circuit's checks and
    messages (its settings', the task's: core.tasks.checked_inputs), then the server's budget, on the input that
    sets the task's size. {} when all are fine. Not checked here: whether the model is one circuits apply to
    (a GPT-2-style model; the run says so)."""
    graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
    errors, contrast = checked_inputs(model, task, n, seed, pairs)
    settings = {}
    for name, check in _settings(graph, method, steps, selection, k, target, ablation, checks).items():
        try:
            settings[name] = check()
        except ValueError as err:
            errors[name] = str(err)
    if not errors:
        try:
            _circuit_budget(model, contrast, graph, settings)
        except ValueError as err:
            errors[size_field(task)] = str(err)
    return errors


def circuit(
    model: Model,
    task: str = "ioi",
    n: int = 32,
    seed: int = 0,
    pairs: str = "",
    method: str = "eap",
    steps: int = DEFAULTS.eap_ig_steps,
    selection: str = "greedy",
    k: int = DEFAULTS.circuit_edges,
    target: int = 0,
    ablation: str = "corrupted",
    checks: int = DEFAULTS.edge_checks,
    progress: Progress | None = None,
) -> CircuitResult:
    """A circuit found by edge scores and checked exactly. `selection`: "greedy" (connected, grown from
    the logits) or "top" (largest |score|); the circuit has `k` edges, or, if `target` (percent) is set,
    is the smallest the search finds whose faithfulness reaches target / 100 (bisection between the
    curve's sizes). `ablation`: what edges outside carry. `checks`: the top edges by |score| whose exact
    effect alone is computed."""
    graph = build_graph(model.cfg.n_layers, model.cfg.n_heads)
    settings = {name: check() for name, check in _settings(graph, method, steps, selection, k, target, ablation, checks).items()}
    method, steps, k, target, checks = (settings[name] for name in ("method", "steps", "k", "target", "checks"))
    chosen, contrast = _task_pairs(model, task, n, seed, pairs)
    sizes, _ = _search(graph, target)
    _circuit_budget(model, contrast, graph, settings)

    def part(low: float, high: float) -> Progress | None:
        return None if progress is None else (lambda fraction, desc: progress(low + (high - low) * fraction, desc))

    traced = run_pairs(model, contrast)  # every prompt traced once: EAP, faithfulness and the checks read these
    runs = traced[0] if all(isinstance(run, FastRun) for run in traced[0]) else None
    scores = edge_scores(model, contrast, method, steps, progress=part(0.0, 0.4), runs=runs)
    choose = SELECTIONS[selection]
    circuits = [choose(graph, scores, int(size)) for size in sizes] + ([] if target else [choose(graph, scores, int(k))])  # the asked-for size with the curve's
    values, clean, corrupted = _faithfulness_runs(model, contrast, np.stack(circuits), ablation, progress=part(0.4, 0.7), runs=runs)
    curve = values[: len(sizes)]
    if target:
        size, value = _smallest(model, contrast, graph, scores, choose, ablation, sizes, curve, target / 100, runs)
    else:
        size, value = int(k), float(values[-1])
    mask = choose(graph, scores, size)
    top = top_edges(graph, scores, checks)
    checked = [(graph.writers[w], graph.readers[r]) for w, r in zip(*np.nonzero(top))]
    checked.sort(key=lambda edge: -abs(scores[graph.writers.index(edge[0]), graph.readers.index(edge[1])]))
    exact = exact_edge_effects(model, contrast, checked, progress=part(0.8, 1.0), traced=traced) if checked else np.zeros(0)
    return _scores_result(
        CircuitResult, model, chosen, contrast, method, steps, scores, (clean, corrupted), selection=selection, ablation=ablation, circuit=mask,
        faithfulness=value, target=target / 100 if target else None, curve_k=sizes, curve_faithfulness=np.asarray(curve, dtype=float),
        checked=[list(edge) for edge in checked],
        checked_scores=np.array([scores[graph.writers.index(w), graph.readers.index(r)] for w, r in checked]), checked_exact=exact,
    )


def _smallest(model, pairs, graph, scores, choose, ablation, sizes, curve, target: float, runs=None) -> tuple[int, float]:
    """The smallest size whose circuit reaches `target`: the first curve size that does, then bisection
    down to the curve's size before it (each step one exact faithfulness)."""
    reached = np.flatnonzero(np.asarray(curve) >= target)
    if len(reached) == 0:
        raise ValueError(f"No circuit reaches faithfulness {target:g}: the whole graph gives {curve[-1]:.3f}. Ask for a lower target.")
    first = int(reached[0])
    high, value = int(sizes[first]), float(curve[first])
    low = int(sizes[first - 1]) if first else 0  # fails (or is nothing)
    while high - low > 1:
        middle = (low + high) // 2
        reached_here = float(faithfulness(model, pairs, choose(graph, scores, middle), ablation, runs=runs))
        if reached_here >= target:
            high, value = middle, reached_here
        else:
            low = middle
    return high, value


METHOD = Input("method", "choice", "eap: one gradient on the corrupted run; eap-ig: integrated gradients over `steps`", default="eap", choices=METHODS)
STEPS = Input("steps", "int", f"EAP-IG's steps from the corrupted embeddings to the clean ones (1-{LIMITS.max_eap_ig_steps})", default=DEFAULTS.eap_ig_steps)

TECHNIQUE = Technique(
    name="edge_attribution",
    run=edge_attribution,
    result=EdgeAttributionResult,
    summary="Edge attribution (EAP or EAP-IG), an APPROXIMATION: every edge of the position-summed graph scored over a task.",
    inputs=(*TASK_INPUTS, METHOD, STEPS),
    lane="heavy",
    example={"task": "ioi", "n": 8, "seed": 0, "method": "eap"},
    figures=(plots.top_edge_scores,),
    progress=True,
    tab="Circuit Map",
)

CIRCUIT_TECHNIQUE = Technique(
    name="circuit",
    run=circuit,
    result=CircuitResult,
    summary="A circuit from edge scores, checked exactly: its edges and nodes, its faithfulness and the curve over sizes, the top edges' exact effects.",
    inputs=(
        *TASK_INPUTS,
        METHOD,
        STEPS,
        Input("selection", "choice", "greedy: a connected circuit grown from the logits; top: the largest |scores|", default="greedy",
              choices=tuple(SELECTIONS)),
        Input("k", "int", "the circuit's edges (1 to all)", default=DEFAULTS.circuit_edges),
        Input("target", "int", "a faithfulness to reach, in percent (1-100): the smallest circuit found that reaches it (k is then ignored); 0: use k",
              default=0),
        Input("ablation", "choice", "what the edges outside the circuit carry: the corrupted prompt's output, or its mean over the task",
              default="corrupted", choices=ABLATIONS),
        Input("checks", "int", f"top edges by |score| whose exact effect alone is computed (0-{LIMITS.max_edge_checks})", default=DEFAULTS.edge_checks),
    ),
    lane="heavy",
    example={"task": "ioi", "n": 8, "seed": 0, "k": 5, "checks": 5},
    figures=(plots.circuit_graph, plots.faithfulness_curve, plots.edge_checks),
    progress=True,
    input_errors=input_errors,
    tab="Circuit Map",
)
TECHNIQUES = (CIRCUIT_TECHNIQUE,)  # the registry reads TECHNIQUE and these
