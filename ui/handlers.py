"""The handlers every tab and the JSON API call: widgets' values in, core results through the
runner, figures and JSON out. UI handlers return their outputs keyed by name (each tab maps the
names to its components)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Callable

import gradio as gr
import numpy as np

from core import (
    DEFAULTS,
    LIMITS,
    SWEEPS,
    activation_patching,
    agreement,
    attention_patterns,
    attribution_patching,
    induction_scores,
    plots,
)
from core.edges import circuit
from core.explorer import explore
from core.induction import max_seq_len
from core.logit_lens import final_lens
from core.model import Model
from core.patching.path import COMPONENTS, path_patching, task_path_patching
from core.patching.task import patch_task
from core.registry import Technique
from core.tasks import task_name
from examples import EXAMPLES
from serving.runner import NotCached, Runner, ServerBusy, write_whole
from ui.common import literal, three_places, whole


def _reporter(progress):
    """Core's progress callback, `report(fraction, description)`, for a gr.Progress (or None)."""
    return None if progress is None else (lambda fraction, desc: progress(fraction, desc=desc))


class Handlers:
    """Thin handlers: widgets in, core results through the runner, figures/JSON out."""

    def __init__(self, runner: Runner, download_dir: str | None, max_downloads: int = LIMITS.max_downloads):
        """`download_dir` None: downloads are off (the page says so); results are shown as usual.
        At most `max_downloads` files are kept (oldest removed first)."""
        self.runner = runner
        self.download_dir = None if download_dir is None else Path(download_dir)
        self.max_downloads = max_downloads
        self.defer_examples = False  # build_demo(warm="background"): a tab without its example in the cache fills it later

    def first_example(self, handler: Callable, *row) -> dict | None:
        """A tab's first example, for the page being built: `handler(*row)`'s outputs, or None where the page
        should not wait for it (`defer_examples` and the example not in the cache yet, or its model not loaded
        yet): the Explorer then fills it when the page loads (`ui.common.fill_on_load`), another tab when
        first opened (`ui.common.fill_when_opened`)."""
        if not self.defer_examples:
            return handler(*row, persist=True)
        try:
            with self.runner.cached_only():
                return handler(*row, persist=True)
        except NotCached:
            return None

    def _download(self, stem: str, data: dict | str, suffix: str = "json") -> str | None:
        """Write `data` as JSON (or text given as a str, e.g. CSV); the name is the content's hash, so repeats
        do not pile up files. Written to a temporary name and renamed, so a file under its final name is
        always whole; when the disk refuses, the results are still shown, with a warning instead of a download."""
        if self.download_dir is None:
            return None
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        path = self.download_dir / f"{stem}-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}.{suffix}"
        if path.exists():
            return str(path)
        try:
            write_whole(path, text.encode("utf-8"))
        except OSError as err:
            gr.Warning(f"The results are shown, but their {suffix.upper()} download could not be saved on the server ({err.strerror or err}).")
            return None
        files = sorted((f for f in self.download_dir.iterdir() if f.suffix in (".json", ".csv")), key=lambda f: f.stat().st_mtime)
        for old in files[: max(0, len(files) - self.max_downloads)]:
            old.unlink(missing_ok=True)
        return str(path)

    # --- UI events (outputs keyed by name) --------------------------------------------

    def explore_results(self, prompt: str, target: str, competing: str, layer: int, persist: bool = False) -> tuple:
        """The Prompt Explorer's four results from one forward pass (an empty target: the model's own top prediction)."""
        return self.runner.run(explore, prompt, target or None, competing or None, whole(layer), DEFAULTS.top_k, persist=persist)

    def explore(self, prompt: str, target: str, competing: str, layer: int, head: int = 0, persist: bool = False) -> dict:
        """Prompt Explorer: predictions, logit lens, DLA and one layer's attention (one head large, all heads small)."""
        top, lens, dla, attention = self.explore_results(prompt, target, competing, layer, persist=persist)
        if isinstance(prompt, str) and prompt != prompt.rstrip(" "):
            gr.Warning(TRAILING_SPACE, duration=12)
        data = {"predictions": top.to_dict(), "logit_lens": lens.to_dict(), "dla": dla.to_dict(), "attention": attention.to_dict()}
        return {
            "predictions": plots.top_predictions(top),
            "lens_heatmap": plots.logit_lens_heatmap(lens),
            "lens_final": plots.logit_lens_final(lens),
            "dla_heads": plots.dla_heads(dla),
            "dla_components": plots.dla_components(dla),
            **self._attention_figures(attention, head),
            "download": self._download("prompt-explorer", data),
        }

    def technique(self, technique: Technique, *values, progress=None) -> dict:
        """Any registered technique with its declared figures ("figure 0", "figure 1", ...) and its JSON."""
        progress = {"progress": _reporter(progress)} if technique.progress else {}
        result = self.runner.run(technique.run, *technique.arguments(values), **progress)
        figures = {f"figure {i}": draw(result) for i, draw in enumerate(technique.figures)}
        return figures | {"download": self._download(technique.name, result.to_dict())}

    @staticmethod
    def _attention_figures(attention, head) -> dict:
        return {"attention_head": plots.attention_head(attention, whole(head)), "attention": plots.attention_heads(attention)}

    def attention_figures(self, prompt: str, layer: int, head: int) -> dict:
        return self._attention_figures(self.runner.run(attention_patterns, prompt, layer), head)

    def contrast_steps(self, clean: str, corrupted: str, answer: str, wrong: str, persist: bool = False, progress=None):
        """Contrast Pairs, in two steps: first the approximate preview (attribution patching) with
        both prompts' logit lens, then exact activation patching beside it, their agreement, and DLA.
        Each step gives every output: status, summary, lens, "exact <sweep>", "approximate <sweep>",
        agreement, scatter, download."""
        approximate = self.runner.run(attribution_patching, clean, corrupted, answer, wrong, persist=persist)
        lenses = {  # the final position only (all the figure draws), both tokens from one pass per prompt
            f"clean: ...{plots.escape_token(clean[-40:])}": self.runner.run(final_lens, clean, answer, wrong, persist=persist),
            f"corrupted: ...{plots.escape_token(corrupted[-40:])}": self.runner.run(final_lens, corrupted, answer, wrong, persist=persist),
        }
        lens = plots.contrast_lens(lenses)
        values = (
            f"**logit({literal(repr(answer))}) − logit({literal(repr(wrong))})**: clean **{approximate.clean_value:+.3f}**, "
            f"corrupted **{approximate.corrupted_value:+.3f}**, swing **{approximate.swing:+.3f}**. "
            "Patching scores: 1 = clean behaviour restored, 0 = no effect."
        )
        if approximate.swing_warning:
            values += f"\n\n⚠️ **Small swing.** {approximate.swing_warning}"
        yield {
            "status": "**Running:** showing the **approximate preview** (attribution patching, right); exact activation patching is running…",
            "summary": values,
            "lens": lens,
            **{f"exact {name}": None for name in SWEEPS},
            **{f"approximate {name}": plots.patching_heatmap(approximate, name) for name in SWEEPS},
            "agreement": None,
            "scatter": None,
            "download": None,
        }
        report = _reporter(progress)
        exact = self.runner.run(activation_patching, clean, corrupted, answer, wrong, progress=report, persist=persist)
        stats = agreement(exact, approximate)
        rows = "\n".join(
            f"| {name} | {three_places(s['pearson_r'])} | {three_places(s['slope'])} | {s['top_k_overlap']}/{s['top_k']} |" for name, s in stats.items()
        )
        summary = (
            f"{values}\n\nPearson r (head patching vs head DLA) = **{three_places(exact.pearson_r)}**. "
            "Exact activation patching (left) is the result; attribution patching (right) is its linear "
            "approximation. How well they agree (slope: approximate ≈ slope × exact, 1 = the right size):\n\n"
            "| sweep | Pearson r | slope | top-10 overlap |\n|---|---:|---:|---:|\n" + rows
        )
        data = {"exact": exact.to_dict(), "approximate": approximate.to_dict(), "agreement": stats}
        limits = {name: plots.shared_limit(getattr(exact, name), getattr(approximate, name)) for name in SWEEPS}
        yield {  # exact and approximate side by side on one colour scale per sweep, so sizes compare
            "status": "**Done:** exact activation patching (left) beside its approximation (right), on one colour scale per sweep.",
            "summary": summary,
            "lens": lens,
            **{f"exact {name}": plots.patching_heatmap(exact, name, limits[name]) for name in SWEEPS},
            **{f"approximate {name}": plots.patching_heatmap(approximate, name, limits[name]) for name in SWEEPS},
            "agreement": plots.approximation_vs_exact(exact, approximate, stats),
            "scatter": plots.dla_vs_patching(exact),
            "download": self._download("contrast-pair", data),
        }

    def contrast(self, clean: str, corrupted: str, answer: str, wrong: str, persist: bool = False, progress=None) -> dict:
        """Contrast Pairs' final outputs (what /contrast returns to gradio_client)."""
        *_, final = self.contrast_steps(clean, corrupted, answer, wrong, persist=persist, progress=progress)
        return final

    # --- Contrast Pairs on a task, and path patching -----------------------------------

    def task(self, task: str, n: int, seed: int, pairs: str, persist: bool = False, progress=None) -> dict:
        """Contrast Pairs on a task: the task's metric, each sweep's mean scores, the JSON (per pair and mean)."""
        result = self.runner.run(patch_task, *_task_args(task, n, seed, pairs), progress=_reporter(progress), persist=persist)
        return {
            "task_summary": task_summary(result),
            **{f"task {name}": plots.task_heatmap(result, name) for name in SWEEPS},
            "task_download": self._download(f"task-{result.task}", result.to_dict()),
            # pairs of several lengths: only head_out is computed, so show its tab (the others say why they are empty)
            "task_tab": gr.Tabs(selected=task_tab_id("head_out")) if result.resid_pre is None else gr.skip(),
        }

    def top_senders(self, kind: str, values: list) -> list[str]:
        """The heads head patching singled out (largest |score| first) for the pair (`kind` "pair": clean,
        corrupted, answer, wrong) or task ("task": task, n, seed, pairs) whose results are shown; the run
        put them in the runner's cache."""
        _check_shown(values)
        if kind == "task":
            scores = self.runner.run(patch_task, *_task_args(*values)).head_out
        else:
            scores = self.runner.run(activation_patching, *values).head_out
        order = np.argsort(-np.abs(scores), axis=None)[: DEFAULTS.path_senders]
        return [f"L{layer}H{head}" for layer, head in zip(*np.unravel_index(order, scores.shape))]

    def paths(self, kind: str, values: list | None, senders, progress=None) -> dict:
        """Path patching from the chosen senders on the pair or the task whose results are shown (`values`
        as for top_senders; None: no task run yet): q, k, v, logits, the JSON."""
        _check_shown(values)
        senders = ", ".join(senders) if isinstance(senders, list) and all(isinstance(s, str) for s in senders) else senders
        report = _reporter(progress)
        if kind == "task":
            result = self.runner.run(task_path_patching, senders, *_task_args(*values), progress=report)
        else:
            result = self.runner.run(path_patching, *values, senders, progress=report)
        return {
            **{f"path {c}": plots.path_heatmap(result, c) for c in COMPONENTS},
            "path logits": plots.path_to_logits(result),
            "path_download": self._download("path-patching", result.to_dict()),
        }

    def task_circuit(self, task, n, seed, pairs, method, steps, selection, k, target, ablation, checks, progress=None) -> dict:
        """Circuit Map's task view: the circuit graph, its faithfulness curve, the exact checks, the table of
        its edges; downloads of the whole result (JSON) and the table (CSV). The inputs: /circuit's."""
        how = (method, whole(steps), selection, whole(k), whole(target), ablation, whole(checks))
        result = self.runner.run(circuit, *_task_args(task, n, seed, pairs), *how, progress=_reporter(progress))
        table = [[e["writer"], e["reader"], round(e["score"], 4), None if e["exact"] is None else round(e["exact"], 4)] for e in result.edges]
        csv = "writer,reader,score,exact\n" + "".join(f"{w},{r},{s!r},{'' if x is None else repr(x)}\n" for w, r, s, x in (
            (e["writer"], e["reader"], e["score"], e["exact"]) for e in result.edges))
        return {
            "circuit_summary": circuit_summary(result),
            "circuit_graph": plots.circuit_graph(result),
            "circuit_curve": plots.faithfulness_curve(result),
            "circuit_checks": plots.edge_checks(result),
            "circuit_table": table,
            "circuit_json": self._download(f"circuit-{result.task}", result.to_dict()),
            "circuit_csv": self._download(f"circuit-edges-{result.task}", csv, "csv"),
        }

    def circuit_map(self, seq_len: int, batch: int, seed: int, persist: bool = False, progress=None) -> dict:
        """Circuit Map: head scores on repeated random sequences, heads above the threshold."""
        report = _reporter(progress)
        result = self.runner.run(induction_scores, whole(seq_len), whole(batch), whole(seed), progress=report, persist=persist)
        return {
            "induction": plots.induction_heatmap(result),
            "previous": plots.induction_heatmap(result, "previous-token"),
            "duplicate": plots.induction_heatmap(result, "duplicate-token"),
            "layer_max": plots.induction_layer_max(result),
            "loss": plots.loss_by_position(result),
            "heads": [[f"L{h['layer']}H{h['head']}", round(h["score"], 4)] for h in result.induction_heads],
            "download": self._download("circuit-map", result.to_dict()),
        }


TASK_MODE = "A task"  # the Contrast Pairs tab's second mode (the first: one pair)


def _task_args(task, n, seed, pairs) -> tuple:
    """A task's four inputs on the page as the task techniques take them, so the task run and the senders proposed
    from it ask the runner's cache for the same key. The pairs box is for task custom (its label says so): a
    built-in task chosen in the list runs without what the box holds, which waits there for custom. (The API,
    which has no list to choose from, refuses pairs beside a built-in task: core.tasks.)"""
    return task, whole(n), whole(seed), pairs if task_name(task) == "custom" else ""


def page_task_errors(errors_of: Callable) -> Callable:
    """A task technique's input_errors(model, task, n, seed, pairs, *rest) for a page's validator: the task as the
    page's run takes it (`_task_args`)."""
    return lambda model, task, n, seed, pairs, *rest: errors_of(model, *_task_args(task, n, seed, pairs), *rest)


def task_tab_id(sweep: str) -> str:
    """The id of a sweep's tab in Contrast Pairs' task results."""
    return f"task-{sweep}"


TRAILING_SPACE = (
    "Your prompt ends with a space, which GPT-2 reads as a token of its own: the predictions are for the token after that "
    "space. GPT-2's words carry their space in front (' Paris'), so a prompt usually ends without one."
)


NOTHING_SHOWN = "Run patching (or task patching) first: path patching traces the pair or task whose results are shown."


def is_shown(values) -> bool:
    """What the page says is shown: a pair's or a task's four inputs (anything else: nothing run yet)."""
    return isinstance(values, list) and len(values) == 4


def _check_shown(values) -> None:
    if not is_shown(values):
        raise ValueError(NOTHING_SHOWN)


def circuit_summary(result) -> str:
    """A circuit in two sentences: its size and faithfulness, how it was found, and how well the scores agree with the exact effects."""
    stats = result.agreement
    asked = f"the smallest found reaching **{result.target:g}**" if result.target is not None else "the size asked for"
    text = (
        f"**{literal(result.task)}**, {result.n_pairs} pairs. Circuit: **{result.k}** of {result.n_edges:,} edges ({asked}), "
        f"{len(result.nodes)} nodes, chosen {result.selection} by {result.method.upper()} scores"
        + (f" ({result.steps} steps)" if result.method == "eap-ig" else "")
        + f". **Faithfulness {result.faithfulness:.3f}** (exact): with every other edge carrying the {result.ablation} output, "
        f"the circuit recovers that fraction of the mean clean − corrupted gap ({result.gap:+.3f})."
    )
    if len(result.checked):
        text += (
            f"\n\nThe top {len(result.checked)} edges checked exactly, each alone: Pearson r **{three_places(stats['pearson_r'])}**, "
            f"top-{stats['top_k']} overlap **{stats['top_k_overlap']}/{stats['top_k']}**, slope **{three_places(stats['slope'])}** "
            "(approximate ≈ slope × exact; 1 = the right size)."
        )
    return text


def task_summary(result) -> str:
    """A task's metric in a sentence: each mean with its standard error, the gap scores divide by."""

    def mean(value: float, error: float | None) -> str:
        return f"**{value:+.3f}**" + ("" if error is None else f" ± {error:.3f}")

    text = (
        f"**{literal(result.task)}**, {result.n_pairs} pairs: {literal(result.description)}\n\n"
        f"Mean logit difference (answer − wrong) ± standard error: clean {mean(result.clean_mean, result.clean_error)}, "
        f"corrupted {mean(result.corrupted_mean, result.corrupted_error)}, gap {mean(result.gap, result.gap_error)}. "
        "Each score is the mean over the pairs of (patched − corrupted), divided by the mean gap: 1 = the task's clean "
        "behaviour restored on average, 0 = no effect."
    )
    if result.note:
        text += f"\n\nℹ️ {result.note}"
    return text


def example_rows(model: Model) -> dict[str, tuple[list[str], list[list]]]:
    """Each tab's examples as (labels, input rows), fitted to the model (layer, context length)."""
    longest = max_seq_len(model)
    explorer = [
        ex | {"layer": min(ex["layer"], model.cfg.n_layers - 1), "head": min(ex.get("head", 0), model.cfg.n_heads - 1)}
        for ex in EXAMPLES["explorer"]
    ]
    circuit = [  # an example longer than the model's context is shown shortened, and says so
        ex if ex["seq_len"] <= longest else ex | {"seq_len": longest, "name": f"{ex['name']} (seq_len {longest}: this model's context)"}
        for ex in EXAMPLES["circuit_map"]
    ]
    return {
        "explorer": ([ex["name"] for ex in explorer], [[ex["prompt"], ex["target"], ex["competing"], ex["layer"], ex.get("head", 0)] for ex in explorer]),
        "contrast": ([ex["name"] for ex in EXAMPLES["contrast"]], [[ex["clean"], ex["corrupted"], ex["answer"], ex["wrong"]] for ex in EXAMPLES["contrast"]]),
        "circuit_map": ([ex["name"] for ex in circuit], [[ex["seq_len"], ex["batch"], ex["seed"]] for ex in circuit]),
    }


def warm_examples(handlers: Handlers, say=None, yield_to_users: bool = False, stopping=None) -> None:
    """Compute every example once (or load it from disk), in the order listed, so clicking one answers
    at once; then prepare the runner (its model's fast engine), so a user's first new prompt does not wait
    for it. `say(line)`, if given, hears one line per example (which, and whether it was computed or
    cached) and a last line when all are ready. `yield_to_users`: before each example, wait while a
    request is waiting for the model (a user's click runs before the examples nobody asked for yet; an
    example under way runs to its end), and try again when the model stays busy too long.
    `stopping()`, if given, is asked before each example and each line: once true, nothing more is done or said."""
    stopped = stopping or (lambda: False)
    rows = example_rows(handlers.runner.model)
    work = [
        (name, handler, row)
        for tab, handler in (("explorer", handlers.explore), ("contrast", handlers.contrast), ("circuit_map", handlers.circuit_map))
        for name, row in zip(*rows[tab])
    ]
    began, fresh = time.perf_counter(), 0  # examples computed (not all from the cache)

    def after_users() -> bool:  # waits while a request waits for the model (yield_to_users); False once stopping
        while yield_to_users and handlers.runner.waiting and not stopped():
            time.sleep(0.1)
        return not stopped()

    for i, (name, handler, row) in enumerate(work, 1):
        if not after_users():
            return
        computed, start = handlers.runner.computed, time.perf_counter()
        while True:
            try:
                handler(*row, persist=True)
                break
            except ServerBusy:  # users kept the model longer than a request may wait: try again
                if stopped():
                    return
        fresh += handlers.runner.computed != computed
        if say is not None and not stopped():
            how = "from the cache" if handlers.runner.computed == computed else f"computed in {time.perf_counter() - start:.1f} s"
            say(f"warming examples {i}/{len(work)}: {name} ({how})")
    if not after_users():
        return
    handlers.runner.prepare()  # examples all from the cache (a restart) computed nothing: the fast engine too, before a user's first prompt
    if say is not None and not stopped():
        say(f"examples ready: {len(work)} ({fresh} computed, {len(work) - fresh} from the cache) in {time.perf_counter() - began:.1f} s")


def warm_in_background(handlers: Handlers, say=None, stopping=None) -> threading.Thread:
    """warm_examples on a daemon thread, yielding to users, until `stopping()`: the page serves meanwhile,
    and an example not computed yet runs when clicked. A failure is said, not raised (the app serves on)."""

    def work() -> None:
        try:
            warm_examples(handlers, say, yield_to_users=True, stopping=stopping)
        except Exception as err:  # noqa: BLE001 - a background thread has nobody to raise to
            if say is not None:
                say(f"warming examples stopped: {type(err).__name__}: {err} (examples are computed when clicked)")

    thread = threading.Thread(target=work, name="warm-examples", daemon=True)
    thread.start()
    return thread
