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

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from core.contrast import ContrastPair
from core.model import Model
from core.patching.exact import fast_engine
from core.patching.fast import Engine

COMPONENTS = ("q", "k", "v")


@dataclass(frozen=True)
class Graph:
    """Writers and readers in the order the model computes them, and which pairs are edges."""

    writers: list[str]  # "embed", "L0H0", ..., "MLP0", "L1H0", ...
    readers: list[str]  # "L0H0.q", "L0H0.k", "L0H0.v", ..., "MLP0", ..., "logits"
    edges: np.ndarray  # [writer, reader] bool: the writer comes before the reader

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())


def build_graph(n_layers: int, n_heads: int) -> Graph:
    writers, writer_stage = ["embed"], [-1]  # stage: 2l for the attention of layer l, 2l + 1 for its MLP
    readers, reader_stage = [], []
    for layer in range(n_layers):
        for head in range(n_heads):
            writers.append(f"L{layer}H{head}")
            writer_stage.append(2 * layer)
            for c in COMPONENTS:
                readers.append(f"L{layer}H{head}.{c}")
                reader_stage.append(2 * layer)
        writers.append(f"MLP{layer}")
        writer_stage.append(2 * layer + 1)
        readers.append(f"MLP{layer}")
        reader_stage.append(2 * layer + 1)
    readers.append("logits")
    reader_stage.append(2 * n_layers)
    edges = np.array(writer_stage)[:, None] < np.array(reader_stage)[None, :]
    return Graph(writers, readers, edges)


def _writer_outputs(engine: Engine, tokens: Tensor) -> Float[Tensor, "writer pos d_model"]:
    """Every writer's output at every position (no gradient), in Graph.writers order."""
    n, H, dh = tokens.shape[-1], engine.n_heads, engine.d_head
    embed = engine.W_E[tokens]
    x = embed + engine.W_pos[:n]
    causal = torch.ones(n, n, dtype=torch.bool, device=engine.device).tril()
    out = [embed]
    for layer in range(engine.n_layers):
        qkv = engine._ln(x, engine.ln1[layer]) @ engine.W_QKV[layer] + engine.b_QKV[layer]
        q, k, v = (t.reshape(n, H, dh) for t in qkv.split(H * dh, -1))
        pattern = torch.softmax((torch.einsum("qhd,khd->hqk", q, k) * engine.scale).masked_fill(~causal, float("-inf")), -1)
        z = torch.einsum("hqk,khd->qhd", pattern, v)
        heads = torch.einsum("phd,hdm->hpm", z, engine.W_O[layer])  # [head, pos, d_model]
        x = x + heads.sum(0) + engine.b_O[layer]
        mlp = engine.act(engine._ln(x, engine.ln2[layer]) @ engine.W_in[layer] + engine.b_in[layer]) @ engine.W_out[layer] + engine.b_out[layer]
        x = x + mlp
        out += [*heads, mlp]
    return torch.stack(out)


def _reader_gradients(engine: Engine, tokens: Tensor, direction) -> Float[Tensor, "reader pos d_model"]:
    """d metric / d every reader's input on the run of `tokens`, in Graph.readers order. Each reader's
    input is the stream plus its own zero tap (every head's q, k and v, every MLP, the logits); one
    backward pass gives every tap's gradient, each with everything downstream of that reader in it."""
    n, H, dh, L = tokens.shape[-1], engine.n_heads, engine.d_head, engine.n_layers
    d = engine.W_E.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=engine.device).tril()
    W = engine.W_QKV.reshape(L, d, 3, H, dh)
    b = engine.b_QKV.reshape(L, 3, H, dh)
    head_taps, mlp_taps = [], []
    with torch.enable_grad():
        x = engine.W_E[tokens] + engine.W_pos[:n]
        for layer in range(L):
            tap = torch.zeros(n, 3, H, d, device=engine.device, requires_grad=True)
            head_taps.append(tap)
            normed = engine._ln(x[:, None, None, :] + tap, engine.ln1[layer])  # [pos, qkv, head, d_model]
            q, k, v = (torch.einsum("pchm,mche->pche", normed, W[layer]) + b[layer]).unbind(1)  # [pos, head, d_head]
            pattern = torch.softmax((torch.einsum("qhd,khd->hqk", q, k) * engine.scale).masked_fill(~causal, float("-inf")), -1)
            z = torch.einsum("hqk,khd->qhd", pattern, v)
            x = x + z.reshape(n, H * dh) @ engine.W_O_flat[layer] + engine.b_O[layer]
            tap = torch.zeros(n, d, device=engine.device, requires_grad=True)
            mlp_taps.append(tap)
            x = x + engine.act(engine._ln(x + tap, engine.ln2[layer]) @ engine.W_in[layer] + engine.b_in[layer]) @ engine.W_out[layer] + engine.b_out[layer]
        final = torch.zeros(n, d, device=engine.device, requires_grad=True)
        metric = engine._metric((x + final)[-1], direction)
        grads = torch.autograd.grad(metric, [*head_taps, *mlp_taps, final])
    out = []
    for layer in range(L):
        out += [*grads[layer].permute(2, 1, 0, 3).reshape(H * 3, n, d)]  # head-major, then q, k, v
        out.append(grads[L + layer])
    out.append(grads[-1])
    return torch.stack(out)


def edge_scores(model: Model, pairs: list[ContrastPair]) -> Float[np.ndarray, "writer reader"]:
    """EAP scores of every edge (0 where there is no edge), averaged over `pairs`."""
    engine = fast_engine(model)
    if engine is None:
        raise ValueError("Edge attribution needs a GPT-2-style model (learned positions, LayerNorm, attention then MLP).")
    graph = build_graph(engine.n_layers, engine.n_heads)
    total = np.zeros(graph.edges.shape)
    with torch.no_grad():
        for pair in pairs:
            direction = pair.metric.direction(engine.W_U, engine.b_U)
            delta = _writer_outputs(engine, pair.clean_tokens[0]) - _writer_outputs(engine, pair.corrupted_tokens[0])
            grads = _reader_gradients(engine, pair.corrupted_tokens[0], direction)
            total += torch.einsum("wpd,rpd->wr", delta.double(), grads.double()).cpu().numpy()
    return np.where(graph.edges, total / len(pairs), 0.0)


def _ablated_metric(engine: Engine, tokens: Tensor, replace: Tensor, excluded: Tensor, direction) -> float:
    """The metric of the run of `tokens` in which every reader's input has the live output of each writer
    `excluded` for it ([writer, reader] bool) swapped for `replace` (its output on the other run,
    [writer, pos, d_model]): exactly the run in which those edges carry the other run's signal."""
    n, H, dh, L = tokens.shape[-1], engine.n_heads, engine.d_head, engine.n_layers
    d = engine.W_E.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=engine.device).tril()
    W = engine.W_QKV.reshape(L, d, 3, H, dh)
    b = engine.b_QKV.reshape(L, 3, H, dh)
    excluded = excluded.to(engine.W_E.dtype)
    embed = engine.W_E[tokens]
    x = embed + engine.W_pos[:n]
    live = [embed]  # every writer's live output so far, in Graph.writers order
    reader = 0

    def swapped(readers: slice) -> Tensor:  # [reader, pos, d_model]: what the excluded writers' swap changes
        w = len(live)
        return torch.einsum("wr,wpd->rpd", excluded[:w, readers], torch.stack(live) - replace[:w])

    for layer in range(L):
        change = swapped(slice(reader, reader + 3 * H)).reshape(H, 3, n, d).permute(2, 1, 0, 3)  # [pos, qkv, head, d_model]
        reader += 3 * H
        normed = engine._ln(x[:, None, None, :] - change, engine.ln1[layer])
        q, k, v = (torch.einsum("pchm,mche->pche", normed, W[layer]) + b[layer]).unbind(1)
        pattern = torch.softmax((torch.einsum("qhd,khd->hqk", q, k) * engine.scale).masked_fill(~causal, float("-inf")), -1)
        z = torch.einsum("hqk,khd->qhd", pattern, v)
        heads = torch.einsum("phd,hdm->hpm", z, engine.W_O[layer])
        x = x + heads.sum(0) + engine.b_O[layer]
        live += [*heads]
        mlp_in = x - swapped(slice(reader, reader + 1))[0]
        reader += 1
        mlp = engine.act(engine._ln(mlp_in, engine.ln2[layer]) @ engine.W_in[layer] + engine.b_in[layer]) @ engine.W_out[layer] + engine.b_out[layer]
        x = x + mlp
        live.append(mlp)
    final = x - swapped(slice(reader, reader + 1))[0]
    return float(engine._metric(final[-1], direction))


def faithfulness(model: Model, pairs: list[ContrastPair], circuit: np.ndarray) -> float:
    """The fraction of the task's mean clean - corrupted gap the circuit recovers, exactly: each pair's
    clean run with every edge outside `circuit` ([writer, reader] bool) carrying the corrupted run's
    signal instead (at every position), mean (ablated - corrupted) / mean (clean - corrupted)."""
    engine = fast_engine(model)
    if engine is None:
        raise ValueError("Faithfulness needs a GPT-2-style model (learned positions, LayerNorm, attention then MLP).")
    graph = build_graph(engine.n_layers, engine.n_heads)
    excluded = torch.as_tensor(graph.edges & ~circuit, device=engine.device)
    ablated, clean, corrupted = [], [], []
    with torch.no_grad():
        for pair in pairs:
            direction = pair.metric.direction(engine.W_U, engine.b_U)
            replace = _writer_outputs(engine, pair.corrupted_tokens[0])
            nothing = torch.zeros_like(excluded)
            ablated.append(_ablated_metric(engine, pair.clean_tokens[0], replace, excluded, direction))
            clean.append(_ablated_metric(engine, pair.clean_tokens[0], replace, nothing, direction))
            corrupted.append(_ablated_metric(engine, pair.corrupted_tokens[0], replace, nothing, direction))
    gap = np.mean(clean) - np.mean(corrupted)
    return float((np.mean(ablated) - np.mean(corrupted)) / gap)
