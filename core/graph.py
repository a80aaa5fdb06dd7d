"""The computational graph of a GPT-2-style model that edge attribution scores (core.edges): writers, readers
and which pairs are edges. Pure: no model, no torch; core.results reads it too."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMPONENTS = ("q", "k", "v")  # a head's inputs, each its own reader


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
