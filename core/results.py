"""Result dataclasses: arrays plus the labels aligned to each axis, and `to_dict()` for JSON.

Arrays are NumPy (float64 for values) so results are detached from the model and
serialise exactly. `to_dict()` is derived, never written per class: it gives the names in the
class's `JSON` (default: its fields, in order; a class may leave fields out or add derived
properties), each as plain data (arrays as nested lists, float64 or, for integer arrays, int;
fields declared `float` as Python floats). The API returns exactly that.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from jaxtyping import Bool, Float, Int

from core.config import DEFAULTS
from core.contrast import SWEEPS
from core.graph import build_graph


def mean_and_error(values: np.ndarray) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation / sqrt(N); None for one value)."""
    error = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return float(values.mean()), error


def _plain_value(value, declared: str | None):
    """One value as JSON-ready data: arrays as lists (int for integer dtypes, else float64), NumPy
    scalars as Python numbers, a value declared `float` as a float."""
    if isinstance(value, np.ndarray):
        return value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float64).tolist()
    if declared == "float" and value is not None:
        return float(value)
    return value.item() if isinstance(value, np.generic) else value


class _Result:
    """What every result shares: `to_dict()` derived from `JSON` (field and property names)."""

    JSON: ClassVar[tuple[str, ...] | None] = None  # None: every field, in order

    @classmethod
    def json_keys(cls) -> tuple[str, ...]:
        """The keys of to_dict(), in order (what the technique's endpoint returns)."""
        return cls.JSON if cls.JSON is not None else tuple(field.name for field in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        declared = {field.name: field.type for field in dataclasses.fields(self)}
        return {name: _plain_value(getattr(self, name), declared.get(name)) for name in self.json_keys()}


@dataclass(frozen=True)
class Predictions(_Result):
    """Top-k next tokens at the final position."""

    tokens: list[str]  # the prompt's tokens, BOS first
    top_tokens: list[str]  # [k], most likely first
    top_probs: Float[np.ndarray, " k"]  # most likely first


@dataclass(frozen=True)
class LogitLensResult(_Result):
    """Final LayerNorm + unembedding applied to the residual stream at each checkpoint, at every position
    (or at the final one only: `core.logit_lens.final_lens`; then `tokens` is that one token)."""

    tokens: list[str]  # [pos] the positions read
    layers: list[str]  # [layer] checkpoint labels: 0_pre .. {L-1}_pre, final_post
    top_tokens: list[list[str]]  # [layer][pos] top-1 token
    top_probs: Float[np.ndarray, "layer pos"]  # the top-1 token's probability
    target: str | None  # the tracked token, if any
    target_probs: Float[np.ndarray, "layer pos"] | None  # P(target)
    target_ranks: Int[np.ndarray, "layer pos"] | None  # 0 = top-1


@dataclass(frozen=True)
class DLAResult(_Result):
    """Direct logit attribution of logit(target) [- logit(competing)] at the final position."""

    tokens: list[str]  # [pos]
    target: str
    competing: str | None  # None: attribute the target logit alone
    value: float  # the model's actual logit (difference)
    heads: Float[np.ndarray, "layer head"]
    mlps: Float[np.ndarray, " layer"]
    embed: float  # token embedding
    pos_embed: float  # positional embedding
    bias: float  # everything else: attention output biases and the unembedding bias
    ln_scaled: bool  # True: each part divided by the final LayerNorm scale, so parts sum to value

    JSON = ("tokens", "target", "competing", "value", "heads", "mlps", "embed", "pos_embed", "bias", "total")

    @property
    def total(self) -> float:
        return float(self.heads.sum() + self.mlps.sum() + self.embed + self.pos_embed + self.bias)


@dataclass(frozen=True)
class AttentionResult(_Result):
    """Every head's attention pattern in one layer."""

    tokens: list[str]  # [pos]
    layer: int
    patterns: Float[np.ndarray, "head dest_pos src_pos"]  # rows sum to 1


@dataclass(frozen=True)
class InductionResult(_Result):
    """Head scores on random token sequences repeated twice (BOS in front)."""

    seq_len: int
    batch: int
    seed: int
    scores: Float[np.ndarray, "layer head"]  # induction: mean attention on the 1 - seq_len stripe
    prev_token_scores: Float[np.ndarray, "layer head"]  # mean attention to the previous position
    duplicate_token_scores: Float[np.ndarray, "layer head"]  # mean attention to the token's first copy
    loss_by_position: Float[np.ndarray, " pos"]  # next-token loss at each position after BOS (2 x seq_len), mean over the batch
    threshold: float  # heads scoring above it are listed as induction heads

    JSON = ("scores", "prev_token_scores", "duplicate_token_scores", "loss_by_position", "threshold", "induction_heads")

    @property
    def induction_heads(self) -> list[dict]:
        layers, heads = np.nonzero(self.scores > self.threshold)
        found = [
            {"layer": int(l), "head": int(h), "score": float(self.scores[l, h])} for l, h in zip(layers, heads)
        ]
        return sorted(found, key=lambda item: -item["score"])


_SCORES_JSON = ("clean_tokens", "corrupted_tokens", "clean_value", "corrupted_value", "swing", "min_swing", "swing_warning", *SWEEPS)


@dataclass(frozen=True)
class _SweepScores(_Result):
    """One array of scores per sweep (core.contrast.SWEEPS, which a check below holds these fields to),
    normalised so that 0 = corrupted and 1 = clean; None where a sweep was not computed."""

    resid_pre: Float[np.ndarray, "layer pos"] | None
    attn_out: Float[np.ndarray, "layer pos"] | None
    mlp_out: Float[np.ndarray, "layer pos"] | None
    head_out: Float[np.ndarray, "layer head"]  # each head's output at all positions


_SWEEP_FIELDS = [f.name for f in dataclasses.fields(_SweepScores)]
if _SWEEP_FIELDS != list(SWEEPS):  # the sweep table and the results' fields are one list
    raise TypeError(f"patching results hold {_SWEEP_FIELDS}, but core.contrast.SWEEPS lists {list(SWEEPS)}")


@dataclass(frozen=True)
class _PatchingScores(_SweepScores):
    """What exact and approximate patching of one pair share: the pair, its metric, and the scores."""

    clean_tokens: list[str]  # [pos]
    corrupted_tokens: list[str]  # [pos]
    answer: str
    wrong_answer: str
    clean_value: float  # logit(answer) - logit(wrong) on the clean prompt
    corrupted_value: float  # the same on the corrupted prompt

    @property
    def swing(self) -> float:
        """clean - corrupted: what every score is divided by."""
        return float(self.clean_value - self.corrupted_value)

    @property
    def min_swing(self) -> float:
        """The swing below which `swing_warning` speaks (DEFAULTS.min_swing)."""
        return DEFAULTS.min_swing

    @property
    def swing_warning(self) -> str | None:
        """A sentence when the swing is too small for normalised scores to mean much (|swing| below
        DEFAULTS.min_swing logits: the answer's odds against the wrong token change less than e-fold)."""
        if abs(self.swing) >= DEFAULTS.min_swing:
            return None
        return (
            f"The swing (clean minus corrupted logit difference) is only {self.swing:+.3f}, less than "
            f"{DEFAULTS.min_swing:g} logit: the prompts barely change the model's preference. Every score is divided "
            "by the swing, so small effects and numerical noise show up as large scores (above 1 or below 0): "
            "read them as noise. Pick a pair whose prompts change the answer (IOI pairs swing several logits on GPT-2)."
        )


@dataclass(frozen=True)
class PatchingResult(_PatchingScores):
    """Activation patching, clean -> corrupted, exact."""

    head_dla: Float[np.ndarray, "layer head"]  # DLA of the same logit difference on the clean prompt

    JSON = (*_SCORES_JSON, "head_dla", "pearson_r")

    @property
    def pearson_r(self) -> float | None:
        """Correlation of head patching scores with head DLA over all heads (None if undefined)."""
        x, y = self.head_out.ravel(), self.head_dla.ravel()
        if x.std() == 0 or y.std() == 0:
            return None
        return float(np.corrcoef(x, y)[0, 1])


@dataclass(frozen=True)
class ApproximatePatchingResult(_PatchingScores):
    """Attribution patching: the linear APPROXIMATION of activation patching, same axes and
    normalisation. Exact patching (PatchingResult) is the truth."""

    method: str = "attribution patching (linear approximation: gradient x activation difference)"
    approximate: ClassVar[bool] = True  # in the JSON, so a client can never take it for /patching's exact scores

    JSON = ("approximate", "method", *_SCORES_JSON)


class _OverPairs:
    """What a result over several pairs (`clean_values`, `corrupted_values`) derives: the task's means
    with their standard errors (sample standard deviation / sqrt(N); None for one pair), and the mean
    gap that task-level scores are divided by."""

    n_pairs = property(lambda self: len(self.clean_values))
    clean_mean = property(lambda self: mean_and_error(self.clean_values)[0])
    clean_error = property(lambda self: mean_and_error(self.clean_values)[1])  # standard error of the mean
    corrupted_mean = property(lambda self: mean_and_error(self.corrupted_values)[0])
    corrupted_error = property(lambda self: mean_and_error(self.corrupted_values)[1])
    gap = property(lambda self: mean_and_error(self.clean_values - self.corrupted_values)[0])  # what scores are divided by
    gap_error = property(lambda self: mean_and_error(self.clean_values - self.corrupted_values)[1])


@dataclass(frozen=True)
class TaskPatchingResult(_SweepScores, _OverPairs):
    """Activation patching over a task: each sweep's mean effect over the pairs, (patched - corrupted)
    averaged, divided by the task's mean clean - corrupted gap. By-position sweeps only when every pair
    has one token length (else None, and `note` says why)."""

    task: str
    description: str
    lengths: list[int]  # the pairs' token lengths (BOS included)
    positions: list[str]  # [pos] the first pair's clean tokens, labelling the by-position sweeps ([] with several lengths)
    clean_values: Float[np.ndarray, " pair"]  # each pair's logit difference on its clean prompt
    corrupted_values: Float[np.ndarray, " pair"]  # ... and on its corrupted prompt
    pairs: list[list[str]]  # [pair] clean, corrupted, answer, wrong
    head_out_effects: Float[np.ndarray, "pair layer head"]  # each pair's patched - corrupted logit difference per head (head_out = their mean / gap)

    JSON = (
        "task", "description", "n_pairs", "lengths", "note", "clean_mean", "clean_error", "corrupted_mean", "corrupted_error",
        "gap", "gap_error", "positions", *SWEEPS, "pairs", "clean_values", "corrupted_values", "head_out_effects",
    )

    @property
    def note(self) -> str | None:
        if len(self.lengths) == 1:
            return None
        return (
            f"The pairs have {len(self.lengths)} token lengths ({', '.join(map(str, self.lengths))}), so positions do not line "
            "up across pairs: only head_out (each head at all positions) is computed. Pick pairs of one length for the others."
        )


@dataclass(frozen=True)
class PathPatchingResult(_Result, _OverPairs):
    """Path patching (core.patching.path), exact: the senders' clean-minus-corrupted write reaching one
    receiver alone; each score is the mean (patched - corrupted) over the pairs / the mean gap (one
    pair: the pair's own normalisation)."""

    task: str  # "one pair", or the task's name
    description: str
    senders: list[str]  # ["L9H9", ...]
    first_receiver_layer: int  # heads of lower layers cannot receive (their q, k, v scores are 0.0 placeholders)
    q: Float[np.ndarray, "layer head"]  # through the receiver head's query input alone
    k: Float[np.ndarray, "layer head"]  # ... key input
    v: Float[np.ndarray, "layer head"]  # ... value input
    logits: float  # through the final residual stream alone (what the unembedding reads)
    head_to_logits: Float[np.ndarray, "layer head"]  # each head alone as the sender, into the logits
    clean_values: Float[np.ndarray, " pair"]
    corrupted_values: Float[np.ndarray, " pair"]

    JSON = (
        "task", "description", "n_pairs", "senders", "first_receiver_layer", "clean_mean", "clean_error", "corrupted_mean",
        "corrupted_error", "gap", "gap_error", "logits", "q", "k", "v", "head_to_logits", "clean_values", "corrupted_values",
    )


def agreement_stats(exact: np.ndarray, approximate: np.ndarray, top: int = 10) -> dict:
    """Pearson r between exact and approximate scores; how many of the `top` with the largest |exact|
    are also among the `top` largest |approximate|; and `slope`, the least-squares fit approximate =
    slope x exact (through 0, which means "no effect" in both): r and the overlap say whether the
    ranking is right, the slope whether the size is (0.3 = the approximation shows a third of the real effect)."""
    x, y = np.ravel(exact), np.ravel(approximate)
    k = min(top, x.size)
    r = None if x.size < 2 or x.std() == 0 or y.std() == 0 else float(np.corrcoef(x, y)[0, 1])
    slope = None if not np.any(x) else float(np.dot(x, y) / np.dot(x, x))
    shared = set(np.argsort(-np.abs(x), kind="stable")[:k]) & set(np.argsort(-np.abs(y), kind="stable")[:k])
    return {"pearson_r": r, "slope": slope, "top_k": k, "top_k_overlap": len(shared)}


@dataclass(frozen=True)
class _EdgeScores(_Result, _OverPairs):
    """A task's edge scores over the position-summed graph (core.edges): writers x readers, 0.0 where
    there is no edge; each score is the mean over the pairs, in the metric's units (logit difference)."""

    task: str
    description: str
    method: str  # "eap" or "eap-ig"
    steps: int  # EAP-IG's interpolation steps (1 for EAP)
    writers: list[str]  # "embed", "L0H0", ..., "MLP0", ...: every component that writes to the residual stream
    readers: list[str]  # "L0H0.q", "L0H0.k", "L0H0.v", ..., "MLP0", ..., "logits": every input that reads it
    scores: Float[np.ndarray, "writer reader"]
    n_edges: int
    clean_values: Float[np.ndarray, " pair"]
    corrupted_values: Float[np.ndarray, " pair"]

    @property
    def graph_edges(self) -> Bool[np.ndarray, "writer reader"]:
        """Which (writer, reader) are edges (core.graph), for the model these writers are: `scores` is 0.0
        where there is none, and at an edge whose score is exactly 0.0."""
        n_layers = sum(1 for w in self.writers if w.startswith("MLP"))
        return build_graph(n_layers, sum(1 for w in self.writers if w.startswith("L0H"))).edges

    def ranked(self, limit: int | None = None) -> list[list]:
        """[writer, reader, score] of every edge (0.0 scores too), largest |score| first (ties: the graph's order)."""
        flat = np.flatnonzero(self.graph_edges)
        order = flat[np.argsort(-np.abs(self.scores.ravel()[flat]), kind="stable")][:limit]
        rows, columns = np.unravel_index(order, self.scores.shape)
        return [[self.writers[w], self.readers[r], float(self.scores[w, r])] for w, r in zip(rows, columns)]


@dataclass(frozen=True)
class EdgeAttributionResult(_EdgeScores):
    """Every edge's approximate score (EAP or EAP-IG), for the logit difference."""

    JSON = ("task", "description", "n_pairs", "method", "steps", "n_edges", "writers", "readers", "edges", "clean_mean", "corrupted_mean", "gap")
    edges = property(lambda self: self.ranked())  # [writer, reader, score], every edge, largest |score| first


@dataclass(frozen=True)
class CircuitResult(_EdgeScores):
    """A circuit (edges chosen by their approximate scores) and its exact checks: the faithfulness of the
    circuit and of the curve's circuits, and the exact effect of the top edges alone."""

    selection: str  # "greedy" (connected, grown from the logits) or "top" (largest |score|)
    ablation: str  # what edges outside the circuit carry: "corrupted" (the writer's output on the corrupted prompt) or "mean"
    circuit: Bool[np.ndarray, "writer reader"]
    faithfulness: float  # the fraction of the clean - corrupted gap the circuit recovers, exactly
    target: float | None  # the faithfulness asked for (None: the size k was)
    curve_k: Int[np.ndarray, " point"]  # circuits of these sizes (same selection) ...
    curve_faithfulness: Float[np.ndarray, " point"]  # ... and their exact faithfulness
    checked: list[list[str]]  # [writer, reader] of the top edges by |score|, checked exactly
    checked_scores: Float[np.ndarray, " checked"]  # their approximate scores
    checked_exact: Float[np.ndarray, " checked"]  # their exact effect alone: mean (patched - corrupted), the same units

    JSON = (
        "task", "description", "n_pairs", "method", "steps", "selection", "ablation", "n_edges", "k", "target", "faithfulness",
        "edges", "nodes", "curve_k", "curve_faithfulness", "checks", "agreement", "clean_mean", "corrupted_mean", "gap",
    )
    k = property(lambda self: int(self.circuit.sum()))  # the circuit's edges
    agreement = property(lambda self: agreement_stats(self.checked_exact, self.checked_scores))  # the scores against the exact effects

    @property
    def exact(self) -> dict[tuple[str, str], float]:
        return {(w, r): float(e) for (w, r), e in zip(self.checked, self.checked_exact)}

    @property
    def edges(self) -> list[dict]:
        """The circuit's edges, largest |score| first: writer, reader, score, exact (None if not checked)."""
        exact = self.exact
        kept = np.where(self.circuit, self.scores, 0.0)
        flat = np.flatnonzero(self.circuit)
        order = flat[np.argsort(-np.abs(kept.ravel()[flat]), kind="stable")]
        rows, columns = np.unravel_index(order, kept.shape)
        out = []
        for w, r in zip(rows, columns):
            writer, reader = self.writers[w], self.readers[r]
            out.append({"writer": writer, "reader": reader, "score": float(self.scores[w, r]), "exact": exact.get((writer, reader))})
        return out

    @property
    def nodes(self) -> list[str]:
        """The components the circuit's edges connect, in the model's order ("logits" last)."""
        used = {self.writers[w] for w in np.flatnonzero(self.circuit.any(1))}
        used |= {self.readers[r].split(".")[0] for r in np.flatnonzero(self.circuit.any(0))}
        return [w for w in self.writers if w in used] + (["logits"] if "logits" in used else [])

    @property
    def checks(self) -> list[dict]:
        return [
            {"writer": w, "reader": r, "score": float(s), "exact": float(e)}
            for (w, r), s, e in zip(self.checked, self.checked_scores, self.checked_exact)
        ]


# --- storing results on disk: data only, never code ------------------------------------

def result_types() -> dict[str, type]:
    """Every registered technique's result type, by class name: what the disk cache may hold."""
    from core.registry import techniques  # the registry reads the technique modules, which import this one

    return {t.result.__name__: t.result for t in techniques().values()}


_ARRAY_DTYPES = ("float64", "float32", "int64", "int32", "bool")  # what a stored array may be
_PLAIN = (str, int, float, bool, type(None))


def storable(result) -> bool:
    """A registered technique's result, or a tuple of them (one pass read several ways): what `dumps` writes."""
    types = result_types()
    return type(result).__name__ in types or (isinstance(result, tuple) and bool(result) and all(type(item).__name__ in types for item in result))


def dumps(result) -> bytes:
    """A result (or a tuple of results) as JSON that `loads` reads back exactly (floats by repr, arrays
    with dtype and shape). JSON cannot carry code, so a file planted in the cache can at worst be refused, never executed."""
    if not storable(result):
        raise TypeError(f"not a result type: {type(result).__name__}")
    stored = {"type": "tuple", "items": [_stored(item) for item in result]} if isinstance(result, tuple) else _stored(result)
    return json.dumps(stored, allow_nan=True).encode("utf-8")


def _stored(result) -> dict:
    fields = {}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if isinstance(value, np.ndarray):
            value = {"dtype": str(value.dtype), "shape": list(value.shape), "data": value.ravel().tolist()}
        elif isinstance(value, np.generic):
            value = value.item()
        fields[field.name] = value
    return {"type": type(result).__name__, "fields": fields}


def _plain(value) -> bool:
    """Strings, numbers, None, and lists of them (token lists, nested for the logit lens)."""
    return isinstance(value, _PLAIN) or (isinstance(value, list) and all(_plain(v) for v in value))


def loads(data: bytes):
    """The result `dumps` wrote, or ValueError if `data` is anything else (checked against the schema:
    a known type, exactly its fields, arrays of an allowed dtype whose data fits their shape)."""
    try:
        stored = json.loads(data.decode("utf-8"))
        if isinstance(stored, dict) and stored.get("type") == "tuple":
            items = stored["items"]
            if not isinstance(items, list) or not items:
                raise ValueError("a stored tuple holds results")
            return tuple(_restored(item) for item in items)
        return _restored(stored)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as err:
        raise ValueError(f"not a stored result: {err}") from None


def _restored(stored):
    """One stored result (dumps's `_stored`), checked against its type's fields."""
    cls = result_types()[stored["type"]]
    fields = stored["fields"]
    names = [field.name for field in dataclasses.fields(cls)]
    if not isinstance(fields, dict) or sorted(fields) != sorted(names):
        raise ValueError("the stored fields are not the result's")
    values = {}
    for name, value in fields.items():
        if isinstance(value, dict):
            if value.get("dtype") not in _ARRAY_DTYPES or not _plain(value.get("data")):
                raise ValueError(f"{name}: not a stored array")
            array = np.asarray(value["data"], dtype=value["dtype"])
            values[name] = array.reshape([int(n) for n in value["shape"]])
        elif _plain(value):
            values[name] = value
        else:
            raise ValueError(f"{name}: not plain data")
    return cls(**values)
