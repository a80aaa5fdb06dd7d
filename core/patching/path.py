"""Path patching (Wang et al., 2022), exact: where does a component's effect go?

A set of senders' clean-minus-corrupted write (a head's z @ W_O, an MLP's output, or the embeddings,
at every position) is added to ONE receiver's input while everything else reads the corrupted run,
with exactly the semantics of `transformer_lens.patching.get_act_patch_direct_path` (which takes one
sender head): the receiver is one later head's query, key or value input (its own copy of the
residual stream, before ln1); whatever that head then writes flows on through the rest of the
corrupted run as usual. Receivers:

- q, k, v [layer, head]: every head of a layer above the lowest sender; a receiver at layer l gets the
  writes of the senders below l (a sender cannot reach a head of its own layer or below). Heads that
  no sender can reach hold 0.0 and `first_receiver_layer` says where receivers start;
- logits: the senders' write reaching only the final residual stream the unembedding reads;
- head_to_logits [layer, head]: the same for every head alone as the sender (the direct path of each
  head into the logits).

Scores are normalised like activation patching: (patched - corrupted) / (clean - corrupted); over a
task, mean (patched - corrupted) / mean (clean - corrupted).

The fast engine (GPT-2 family) computes each receiver from the corrupted run's activations: the
receiver layer's attention for all heads at once with one input patched, then the rest of the run
from that layer on (`Engine.patched_metrics`), the patches of many receivers and pairs together.
Other models, and a fast engine that disagrees with its model, go through TransformerLens hooks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from core import plots
from core.config import DEFAULTS
from core.contrast import ON_A_PAIR, PAIR, PAIR_EXAMPLE, ContrastPair
from core.contrast import input_errors as pair_errors
from core.graph import COMPONENTS
from core.model import Model, run_cached
from core.patching.cost import check_budget, pairs_flops
from core.patching.exact import run_pairs
from core.patching.fast import Engine, FastRun, Job, Trace, evaluate_jobs
from core.patching.hooks import HookRun
from core.registry import Input, Progress, Technique
from core.results import PathPatchingResult
from core.tasks import TASK_INPUTS, Task, chosen_task

Head = tuple[int, int]


class Sender(NamedTuple):
    """A component whose clean-minus-corrupted write is sent: a head (layer, head), an MLP (layer,
    head None) or the embeddings (layer -1). Its write reaches heads of the layers above `layer`."""

    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        return "embed" if self.layer < 0 else f"MLP{self.layer}" if self.head is None else f"L{self.layer}H{self.head}"


_HEAD = re.compile(r"^(?:L(\d+)H(\d+)|(\d+)\.(\d+))$", re.IGNORECASE)
_MLP = re.compile(r"^(?:MLP|M)(\d+)$", re.IGNORECASE)
_EMBED = re.compile(r"^(?:embed|embeddings?|emb)$", re.IGNORECASE)
FORMS = "a head as layer.head (9.9) or L9H9, an MLP as MLP3, the embeddings as embed"


def parse_senders(text: str, n_layers: int, n_heads: int) -> tuple[Sender, ...]:
    """Senders separated by commas or spaces ("9.9, 9.6", "L9H9 MLP0 embed"); in order, without repeats."""
    if not isinstance(text, str):
        raise ValueError(f"The senders must be text such as '9.9, 9.6' ({FORMS}); got {type(text).__name__}.")
    words = [word for word in re.split(r"[\s,;]+", text.strip()) if word]
    if not words:
        raise ValueError(f"Name at least one sender: {FORMS}; several with commas, e.g. 9.9, 9.6.")
    found: list[Sender] = []
    for word in words:
        if head := _HEAD.match(word):
            layer, index = (int(g) for g in (head.group(1, 2) if head.group(1) is not None else head.group(3, 4)))
            sender = Sender(layer, index)
        elif mlp := _MLP.match(word):
            sender = Sender(int(mlp.group(1)))
        elif _EMBED.match(word):
            sender = Sender(-1)
        else:
            raise ValueError(f"{word[:40]!r} is not a sender: write {FORMS}; several with commas.")
        if sender.layer >= n_layers or (sender.head is not None and sender.head >= n_heads):
            raise ValueError(f"There is no {word[:40]!r}: this model has layers 0-{n_layers - 1} and heads 0-{n_heads - 1}.")
        if sender not in found:
            found.append(sender)
    return tuple(found)


# --- the fast engine ----------------------------------------------------------------------


def _attend(engine: Engine, q: Tensor, k: Tensor, v: Tensor, start: int) -> Float[Tensor, "batch pos head d_head"]:
    """z at the query positions start.. for batches of (q [b, T, H, dh], k and v [b, n, H, dh]), causal."""
    n = k.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * engine.scale
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[start:]
    pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    return torch.einsum("bhqk,bkhd->bqhd", pattern, v)


def receiver_writes(engine: Engine, corrupted: Trace, layer: int, start: int, change: Tensor) -> Float[Tensor, "component head pos d_model"]:
    """How each head of `layer` changes its write (z @ W_O, positions start..) when `change` ([pos, d_model],
    positions start..) is added to its query, key or value input alone: all heads at once per component."""
    H, dh = engine.n_heads, engine.d_head
    x = corrupted.resid_pre[layer, start:]
    old = engine.qkv(layer, x).reshape(-1, 3, H, dh)
    new = engine.qkv(layer, x + change).reshape(-1, 3, H, dh)
    k_all, v_all = corrupted.k[layer], corrupted.v[layer]  # [pos, head, d_head], every position
    q_old = old[:, 0]
    k_new = torch.cat([k_all[:start], new[:, 1]])
    v_new = torch.cat([v_all[:start], new[:, 2]])
    queries = torch.stack([new[:, 0], q_old, q_old])
    keys = torch.stack([k_all, k_new, k_all])
    values = torch.stack([v_all, v_all, v_new])
    z = _attend(engine, queries, keys, values, start)  # [component, pos, head, d_head]
    return torch.einsum("cphd,hdm->chpm", z - corrupted.z[layer, start:], engine.W_O[layer])


def sender_writes(
    engine: Engine, clean: Trace | Sequence[Trace], corrupted: Trace | Sequence[Trace], start: int, senders: Sequence[Sender]
) -> list[tuple[int, Tensor]]:
    """(layer, clean-minus-corrupted write [pos, d_model] at positions start..) of each sender; given
    several pairs' traces (of one token length), each write is [pair, pos, d_model], in one product."""
    one = isinstance(clean, Trace)
    cleans, corrupteds = ([clean], [corrupted]) if one else (list(clean), list(corrupted))

    def stacked(field: str, *index) -> Tensor:  # [pair, pos, ...]: clean minus corrupted
        return torch.stack([getattr(a, field)[index] - getattr(b, field)[index] for a, b in zip(cleans, corrupteds)])

    def write(sender: Sender) -> Tensor:
        layer, head = sender
        if layer < 0:
            return stacked("resid_pre", 0, slice(start, None))
        if head is None:
            return stacked("mlp_out", layer, slice(start, None))
        return stacked("z", layer, slice(start, None), head) @ engine.W_O[layer, head]

    return [(sender.layer, write(sender)[0] if one else write(sender)) for sender in senders]


def path_jobs(engine: Engine, run: FastRun, start: int, senders: Sequence[Sender], pair: int = 0) -> Iterator[tuple[str, Head, Job]]:
    """(component, receiver head, job) for every receiver the senders can change."""
    writes = sender_writes(engine, run.clean, run.corrupted, start, senders)
    lowest = min(layer for layer, _ in writes)
    for layer in range(lowest + 1, engine.n_layers):
        change = sum(write for at, write in writes if at < layer)
        if not torch.any(change != 0):
            continue
        heads_change = receiver_writes(engine, run.corrupted, layer, start, change)
        base = run.corrupted.resid_mid[layer, start:]
        for c, component in enumerate(COMPONENTS):
            for head in range(engine.n_heads):
                if torch.any(heads_change[c, head] != 0):
                    yield component, (layer, head), Job(layer, Job.MID, base + heads_change[c, head], 0, pair)


def to_logits(engine: Engine, run: FastRun, start: int, senders: Sequence[Sender]) -> tuple[float, Float[np.ndarray, "layer head"]]:
    """The metric with the senders' write added to the final residual stream alone, and the same for
    each head alone as the sender."""
    final = run.corrupted.resid_pre[-1, -1]
    together = sum(write[-1] for _, write in sender_writes(engine, run.clean, run.corrupted, start, senders))
    each = torch.einsum("lhd,lhdm->lhm", run.clean.z[:, -1] - run.corrupted.z[:, -1], engine.W_O)
    return float(engine._metric(final + together, run.direction)), engine._metric(final + each, run.direction).double().cpu().numpy()


def _fast_values(runs: list[FastRun], senders: Sequence[Sender], rows_per_pass: int, progress: Progress | None) -> dict[str, np.ndarray]:
    """Raw metrics per pair: q, k, v [pair, layer, head], logits [pair], head_to_logits [pair, layer, head]."""
    engine = runs[0].engine
    L, H = engine.n_layers, engine.n_heads
    raw = {c: np.stack([np.full((L, H), run.corrupted_value) for run in runs]) for c in COMPONENTS}
    logits = [to_logits(engine, run, run.corrupted.resid_pre.shape[1] - 1, senders) for run in runs]  # the final position's writes only
    raw["logits"] = np.array([together for together, _ in logits])
    raw["head_to_logits"] = np.stack([each for _, each in logits])
    lowest = min(sender.layer for sender in senders)

    def jobs_of(run: FastRun, start: int, local: int):
        return path_jobs(engine, run, start, senders, local)

    def count(run: FastRun, start: int) -> int:
        return len(COMPONENTS) * H * (L - 1 - lowest)

    for i, component, head, value in evaluate_jobs(runs, jobs_of, count, rows_per_pass, progress, "path patching"):
        raw[component][i][head] = value
    return raw


# --- hooks (any model) ----------------------------------------------------------------------


def _hook_values(model: Model, run: HookRun, senders: Sequence[Sender], progress: Progress | None) -> dict[str, np.ndarray]:
    """The same raw metrics through TransformerLens hooks, one forward pass per receiver (as
    get_act_patch_direct_path), for models the fast engine does not fit."""
    pair, cfg = run.pair, model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    names = {f"blocks.{layer}.{hook}" for layer in range(L) for hook in ("attn.hook_z", "hook_mlp_out")} | {"blocks.0.hook_resid_pre"}
    _, clean = run_cached(model, pair.clean_tokens, lambda name: name in names)
    _, corrupted = run_cached(model, pair.corrupted_tokens, lambda name: name in names)
    writes = {
        Sender(layer, head): (clean[f"blocks.{layer}.attn.hook_z"][0, :, head] - corrupted[f"blocks.{layer}.attn.hook_z"][0, :, head]) @ model.W_O[layer, head]
        for layer in range(L)
        for head in range(H)
    }
    writes |= {Sender(layer): clean[f"blocks.{layer}.hook_mlp_out"][0] - corrupted[f"blocks.{layer}.hook_mlp_out"][0] for layer in range(L)}
    writes[Sender(-1)] = clean["blocks.0.hook_resid_pre"][0] - corrupted["blocks.0.hook_resid_pre"][0]
    raw = {c: np.full((L, H), run.corrupted_value) for c in COMPONENTS}
    lowest = min(sender.layer for sender in senders)

    def metric(hooks) -> float:
        return float(pair.metric.of_logits(model.run_with_hooks(pair.corrupted_tokens, fwd_hooks=hooks))[0])

    def add(change: Tensor, head: int | None = None, fired: list[bool] | None = None):
        def hook(activation, hook):
            if fired is not None:
                fired.append(True)
            activation = activation.clone()
            if head is None:
                activation[0] += change
            else:
                activation[0, :, head] += change
            return activation

        return hook

    from transformer_lens import patching as tl_patching  # here, not at import: loading a model imports TransformerLens

    try:  # what TransformerLens refuses for direct path patching (attention writes that are not z @ W_O, K/V on GQA)
        for component in COMPONENTS:
            tl_patching._check_direct_path_support(model, sorted({s.layer for s in senders if s.head is not None} or {max(lowest, 0)}), component)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(f"Path patching does not apply to this model: {err}") from None
    fired: list[bool] = []
    with tl_patching._split_qkv_input(model):
        for layer in range(lowest + 1, L):
            if progress is not None:
                progress((layer - lowest - 1) / (L - lowest), "path patching (hooks)")
            change = sum(writes[s] for s in senders if s.layer < layer)
            for component in COMPONENTS:
                for head in range(H):
                    fired.clear()
                    raw[component][layer, head] = metric([(f"blocks.{layer}.attn.hook_{component}_input", add(change, head, fired))])
                    if not fired:  # without the per-head input fork the hook never runs and the value would be unpatched
                        raise ValueError(f"Path patching cannot reach the heads' {component} inputs of this model's layer {layer}.")
    final = f"blocks.{L - 1}.hook_resid_post"
    raw["logits"] = metric([(final, add(sum(writes[s] for s in senders)))])
    raw["head_to_logits"] = np.array([[metric([(final, add(writes[Sender(layer, head)]))]) for head in range(H)] for layer in range(L)])
    return raw


# --- the technique ---------------------------------------------------------------------------


def raw_path_values(
    model: Model,
    pairs: list[ContrastPair],
    senders: Sequence[Sender],
    progress: Progress | None = None,
    rows_per_pass: int = DEFAULTS.patch_rows_per_pass,
    engine: Literal["auto", "hooks"] = "auto",
):
    """(each pair's clean and corrupted values, raw metrics per receiver kind, [pair, ...]);
    `engine="hooks"` runs the hook engine whatever the model."""
    runs, clean, corrupted = run_pairs(model, pairs, engine)
    with torch.no_grad():
        if all(isinstance(run, FastRun) for run in runs):
            raw = _fast_values(runs, senders, rows_per_pass, progress)
        else:
            def part(i: int) -> Progress | None:  # pair i's share of the bar
                return None if progress is None else (lambda fraction, desc: progress((i + fraction) / len(runs), desc))

            each = [_hook_values(model, run, senders, part(i)) for i, run in enumerate(runs)]
            raw = {name: np.stack([np.asarray(e[name]) for e in each]) for name in each[0]}
    return clean, corrupted, raw


def path_patching_on(
    model: Model,
    task: Task | ContrastPair,
    senders: str | Sequence[Sender],
    progress: Progress | None = None,
    engine: Literal["auto", "hooks"] = "auto",
    budget: bool = False,
) -> PathPatchingResult:
    """Path patching from `senders` on one pair or over a task's pairs. `budget`: refuse (before any
    patching) work over LIMITS.max_patching_tflop, as the server does."""
    given = isinstance(senders, (list, tuple)) and senders and all(isinstance(s, Sender) for s in senders)
    heads = tuple(senders) if given else parse_senders(senders, model.cfg.n_layers, model.cfg.n_heads)  # text, or a sentence
    pairs = [task] if isinstance(task, ContrastPair) else task.contrast_pairs(model)
    if budget:
        check_budget(path_flops(model, pairs, heads), len(pairs), f"Path patching from {', '.join(s.name for s in heads)} over {len(pairs)} pairs")
    clean, corrupted, raw = raw_path_values(model, pairs, heads, progress, engine=engine)
    gap = float((clean - corrupted).mean())
    lowest = min(sender.layer for sender in heads)

    def score(values: np.ndarray) -> np.ndarray:  # [pair, ...] raw metrics -> the mean effect / the mean gap
        return (values - corrupted.reshape(-1, *([1] * (values.ndim - 1)))).mean(0) / gap

    receivers = {c: score(raw[c]) for c in COMPONENTS}
    for c in COMPONENTS:
        receivers[c][: lowest + 1] = 0.0  # no sender reaches these heads (placeholders, as TransformerLens's)
    is_pair = isinstance(task, ContrastPair)
    return PathPatchingResult(
        task="one pair" if is_pair else task.name,
        description=f"{task.clean_prompt!r} vs {task.corrupted_prompt!r}" if is_pair else task.description,
        senders=[sender.name for sender in heads],
        first_receiver_layer=lowest + 1,
        logits=float(score(raw["logits"])),
        head_to_logits=score(raw["head_to_logits"]),
        clean_values=clean,
        corrupted_values=corrupted,
        **receivers,
    )


def path_flops(model: Model, pairs: list[ContrastPair], senders: Sequence[Sender]) -> float:
    """The matrix products path patching from `senders` needs (core.patching.cost): three patched runs
    (q, k, v) per head above the lowest sender, like head patching's one."""
    return pairs_flops(model, pairs, ("head_out",), head_from=min(s.layer for s in senders) + 1, head_copies=len(COMPONENTS))


def path_patching(
    model: Model, clean_prompt: str, corrupted_prompt: str, answer: str, wrong_answer: str, senders: str, progress: Progress | None = None
) -> PathPatchingResult:
    """Path patching on one contrast pair."""
    pair = ContrastPair.of(model, clean_prompt, corrupted_prompt, answer, wrong_answer)
    return path_patching_on(model, pair, senders, progress, budget=True)


def task_path_patching(
    model: Model, senders: str, task: str = "ioi", n: int = 32, seed: int = 0, pairs: str = "", progress: Progress | None = None
) -> PathPatchingResult:
    """Path patching over a task: a built-in one (`task`, `n` pairs drawn with `seed`) or your own `pairs`."""
    parse_senders(senders, model.cfg.n_layers, model.cfg.n_heads)  # the senders' message before the task's
    return path_patching_on(model, chosen_task(model, task, n, seed, pairs), senders, progress, budget=True)


def input_errors(model: Model, clean_prompt: str, corrupted_prompt: str, answer: str, wrong_answer: str, senders: str) -> dict[str, str]:
    """The pair's problems (core.contrast.input_errors) and the senders', by input name, without running the model."""
    errors = pair_errors(model, clean_prompt, corrupted_prompt, answer, wrong_answer)
    try:
        parse_senders(senders, model.cfg.n_layers, model.cfg.n_heads)
    except ValueError as err:
        errors["senders"] = str(err)
    return errors


SENDERS = Input("senders", "text", f"whose write is sent, one receiver at a time: {FORMS}; several with commas")
FIGURES = (*(functools.partial(plots.path_heatmap, component=c) for c in COMPONENTS), plots.path_to_logits)

TECHNIQUE = Technique(
    **(ON_A_PAIR | dict(inputs=(*PAIR, SENDERS), example=PAIR_EXAMPLE | {"senders": "embed, MLP0"}, input_errors=input_errors)),
    name="path_patching",
    run=path_patching,
    result=PathPatchingResult,
    summary="Path patching, exact: the senders' (heads, MLPs, embeddings) effect through each later head's q, k or v input alone, and into the logits.",
    figures=FIGURES,
)

TASK_TECHNIQUE = Technique(
    name="task_path_patching",
    run=task_path_patching,
    result=PathPatchingResult,
    summary="Path patching over a task (many pairs): each receiver's mean effect / the task's mean clean - corrupted gap.",
    inputs=(SENDERS, *TASK_INPUTS),
    lane="heavy",
    example={"senders": "1.2", "task": "induction", "n": 8, "seed": 0},
    figures=FIGURES,
    progress=True,
    tab="Contrast Pairs",
)
TECHNIQUES = (TASK_TECHNIQUE,)  # the registry reads TECHNIQUE and these
