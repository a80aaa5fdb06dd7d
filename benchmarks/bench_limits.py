"""The largest request each endpoint allows, on a GPT-2 Small-shaped model: how long it takes and how
much memory it needs (the README's "Limits" quote this).

    python -m benchmarks.bench_limits [--threads 2] [--repeats 3]

Each endpoint (JSON API and UI events) gets the largest input core/config.py allows:
a 128-token prompt (BOS included) for the Prompt Explorer's techniques, a 32-token contrast pair
that differs at its first word (so every position is patched) for Contrast Pairs, the most pairs a
task request may patch (64, or fewer where they would need more than LIMITS.max_patching_tflop:
IOI, several lengths, head_out; induction, one length, every sweep; path patching from the
embeddings, every head a receiver), and
batch x (2 x seq_len + 1) = 2,046 tokens at GPT-2's full context (seq_len 511, batch 2) for the
Circuit Map. It runs through the app's own handlers and JSON endpoints (`ui.handlers`, `ui.api`: the runner, the figures and
the JSON download, everything but HTTP), with the results cache off so every repeat computes.
Prints the median seconds of `--repeats` runs and the peak resident memory above what the process
held just before the request (sampled every 2 ms; freed memory is handed back to the OS before
each request, as the server does), then the process's resident memory with the model loaded and its fast engine built (as the app's
warming builds it before users).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

from benchmarks.bench_patching import matmul_gflops  # noqa: E402
from benchmarks.common import arguments, peak_memory, rss_bytes  # noqa: E402
from core import LIMITS, load_model, save_random_gpt2  # noqa: E402
from core.induction import max_seq_len  # noqa: E402
from core.patching.cost import pairs_flops  # noqa: E402
from core.patching.path import parse_senders, path_flops  # noqa: E402
from core.patching.task import task_sweeps  # noqa: E402
from core.registry import techniques  # noqa: E402
from core.tasks import built_in_task  # noqa: E402
from serving.runner import Runner, release_freed_memory  # noqa: E402
from ui.api import endpoint as json_endpoint  # noqa: E402
from ui.handlers import Handlers  # noqa: E402

TEXT = " The quick brown fox jumps over the lazy dog while the old man reads a book about the history of Rome."


def measure(fn) -> tuple[float, int]:
    """(seconds, peak resident memory above the resident memory just before the call), freed memory
    handed back to the OS first, as the server does before each computation."""
    release_freed_memory()
    _, seconds, peak = peak_memory(fn)
    return seconds, peak


def prompt_of(model, n_tokens: int, first_word: str = " Once") -> str:
    """A prompt that is exactly `n_tokens` tokens with BOS (checked by tokenizing it again)."""
    ids = model.tokenizer.encode(first_word + TEXT * 20, add_special_tokens=False)[: n_tokens - 1]
    text = model.tokenizer.decode(ids)
    assert len(model.tokenizer.encode(text, add_special_tokens=False)) == n_tokens - 1, text
    return text


def largest(model, task: str, flops) -> int:
    """The most pairs of a built-in task (seed 0) one request may patch: LIMITS.max_task_patching_pairs,
    or fewer where their matrix products would exceed LIMITS.max_patching_tflop."""
    for n in range(LIMITS.max_task_patching_pairs, 0, -1):
        if flops(built_in_task(model, task, n, 0).contrast_pairs(model)) <= LIMITS.max_patching_tflop * 1e12:
            return n
    return 0


def main() -> None:
    args = arguments()
    with tempfile.TemporaryDirectory() as directory:
        model = load_model(save_random_gpt2(Path(directory) / "model"))
        runner = Runner(model, cache_dir=None, max_entries=0)  # no cache: every repeat computes
        runner.prepare()  # the fast engine built and checked, as the app's warming leaves it before users
        loaded = rss_bytes()
        h = Handlers(runner, directory)
        api = {name: json_endpoint(t, runner, model) for name, t in techniques().items()}  # the JSON endpoints, as the server runs them
        prompt = prompt_of(model, LIMITS.max_prompt_tokens)
        clean = prompt_of(model, LIMITS.max_patching_tokens)
        corrupted = prompt_of(model, LIMITS.max_patching_tokens, " When")  # differs at its first word
        seq_len = max_seq_len(model)
        batch = LIMITS.max_induction_tokens // (2 * seq_len + 1)
        layer = model.cfg.n_layers - 1
        pair = (clean, corrupted, " the", " a")
        ioi = largest(model, "ioi", lambda pairs: pairs_flops(model, pairs, task_sweeps(pairs)))
        induction = largest(model, "induction", lambda pairs: pairs_flops(model, pairs, task_sweeps(pairs)))
        paths = largest(model, "induction", lambda pairs: path_flops(model, pairs, parse_senders("embed", 12, 12)))
        requests = [
            ("/predict", f"{LIMITS.max_prompt_tokens} tokens, k {LIMITS.max_top_k}", lambda: api["predict"](prompt, LIMITS.max_top_k)),
            ("/logit_lens", f"{LIMITS.max_prompt_tokens} tokens, a target", lambda: api["logit_lens"](prompt, " the")),
            ("/dla", f"{LIMITS.max_prompt_tokens} tokens, target - competing", lambda: api["dla"](prompt, " the", " a")),
            ("/attention", f"{LIMITS.max_prompt_tokens} tokens", lambda: api["attention"](prompt, layer)),
            ("/explore (Prompt Explorer)", f"{LIMITS.max_prompt_tokens} tokens, all four + figures", lambda: h.explore(prompt, " the", " a", layer, 0)),
            ("/patching", f"{LIMITS.max_patching_tokens}-token pair, every position", lambda: api["patching"](*pair)),
            ("/attribution_patching", f"{LIMITS.max_patching_tokens}-token pair", lambda: api["attribution_patching"](*pair)),
            ("/contrast (Contrast Pairs)", f"{LIMITS.max_patching_tokens}-token pair, both + lenses + figures", lambda: h.contrast(*pair)),
            ("/induction", f"seq_len {seq_len}, batch {batch}", lambda: api["induction"](seq_len, batch, 0)),
            ("/circuit_map (Circuit Map)", f"seq_len {seq_len}, batch {batch} + figures", lambda: h.circuit_map(seq_len, batch, 0)),
            ("/path_patching", f"{LIMITS.max_patching_tokens}-token pair, the embeddings to every head", lambda: api["path_patching"](*pair, "embed")),
            ("/task_patching", f"{ioi} IOI pairs (head_out)", lambda: api["task_patching"]("ioi", ioi, 0, "")),
            ("/task_patching", f"{induction} induction pairs, every sweep", lambda: api["task_patching"]("induction", induction, 0, "")),
            ("/task_path_patching", f"{paths} induction pairs, the embeddings to every head", lambda: api["task_path_patching"]("embed", "induction", paths)),
        ]
        print(
            f"GPT-2 Small-shaped model (random weights), {args.threads} threads, torch {torch.__version__}, "
            f"float32 matmul at {matmul_gflops(model.cfg.d_model, model.cfg.d_mlp):.0f} GFLOP/s; median of {args.repeats}\n"
        )
        print("| endpoint | largest allowed request | seconds | peak memory above the idle server |")
        print("|---|---|---:|---:|")
        worst = 0
        for endpoint, what, request in requests:
            runs = [measure(request) for _ in range(args.repeats)]
            peak = max(m for _, m in runs)
            worst = max(worst, peak)
            print(f"| {endpoint} | {what} | {statistics.median(s for s, _ in runs):.2f} | {peak / 2**20:,.0f} MiB |", flush=True)
        print(
            f"\nresident memory with the model loaded (and its fast engine): {loaded / 2**20:,.0f} MiB; "
            f"with the largest request: {(loaded + worst) / 2**20:,.0f} MiB"
        )


if __name__ == "__main__":
    main()
