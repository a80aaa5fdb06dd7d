"""Time every core technique on a GPT-2 Small-shaped model (random weights, GPT-2's tokenizer).

    python -m benchmarks.bench_core [--threads 2] [--repeats 3]

Prints a markdown table (median wall-clock seconds over --repeats runs, after one warm-up)
that the README quotes. Timing lives here, never in tests.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.common import arguments, median_seconds  # noqa: E402
from core import (  # noqa: E402
    activation_patching,
    attention_patterns,
    attribution_patching,
    direct_logit_attribution,
    induction_scores,
    load_model,
    logit_lens,
    predict,
    save_random_gpt2,
)
from examples import EIFFEL, IOI_CLEAN, IOI_CORRUPTED  # noqa: E402


def main() -> None:
    args = arguments()
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        model = load_model(save_random_gpt2(directory))
        load_s = time.perf_counter() - start
        cases = {
            "predict (Eiffel, k=10)": lambda: predict(model, EIFFEL),
            "logit lens (Eiffel, 11 tokens, 13 checkpoints)": lambda: logit_lens(model, EIFFEL, " Paris"),
            "DLA (IOI clean, 17 tokens)": lambda: direct_logit_attribution(model, IOI_CLEAN, " Mary", " John"),
            "attention (IOI clean, one layer)": lambda: attention_patterns(model, IOI_CLEAN, 5),
            "induction (seq_len 50, batch 10)": lambda: induction_scores(model),
            "activation patching, exact, 4 sweeps (IOI pair, 17 tokens)": lambda: activation_patching(
                model, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"
            ),
            "attribution patching, approximate, 4 sweeps (IOI pair)": lambda: attribution_patching(
                model, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"
            ),
        }
        print(f"GPT-2 Small-shaped model, {args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
        print(f"model build + load: {load_s:.1f} s\n")
        print("| technique | median seconds |")
        print("|---|---:|")
        for name, fn in cases.items():
            print(f"| {name} | {median_seconds(fn, args.repeats)[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
