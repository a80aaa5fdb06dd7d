"""The Prompt Explorer: one forward pass for its four readings, against the bare forward pass, against
the four techniques run one by one and against the bridge's pass they read before the fast engine, in one run; then end to end through gradio_client,
`/explore` against `/predict` on prompts of the same length, same server.

    python -m benchmarks.bench_explorer [--threads 2] [--repeats 15]

GPT-2 Small-shaped model (random weights, GPT-2's tokenizer). Every call gets a prompt not seen before
(the app caches answers): one template, one word varied, all of the same token length. Medians; peak
resident memory above the loaded model.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402
from gradio_client import Client  # noqa: E402

import app  # noqa: E402
from benchmarks.common import arguments, peak_memory, rss_bytes, torch_products  # noqa: E402
from core import attention_patterns, direct_logit_attribution, load_model, logit_lens, predict, products, save_random_gpt2  # noqa: E402
from core.config import DEFAULTS  # noqa: E402
from core.explorer import explore  # noqa: E402
from core.model import to_tokens  # noqa: E402
from core.patching import exact  # noqa: E402
from serving.runner import Runner  # noqa: E402

TEMPLATE = "After a long day at work, when John and Mary went to the {}, John gave a bottle of milk to"
WORDS = [" store", " park", " bank", " school", " beach", " market", " house", " office", " church", " river", " garden", " station",
         " library", " hospital", " restaurant", " hotel", " museum", " theater", " airport", " farm", " castle", " village", " forest",
         " island", " bridge", " kitchen", " lake", " city", " town", " street", " hall", " camp", " club", " shop", " court", " field"]


def main() -> None:
    args = arguments(repeats=15)
    with tempfile.TemporaryDirectory() as model_dir, tempfile.TemporaryDirectory() as cache_dir:
        model = load_model(save_random_gpt2(model_dir))
        length_of = {w: to_tokens(model, TEMPLATE.format(w)).shape[-1] for w in WORDS}
        lengths, n_tokens = set(length_of.values()), length_of[WORDS[0]]
        words = [w for w in WORDS if length_of[w] == n_tokens]
        fresh = iter(TEMPLATE.format(w) for w in words * 100)  # a prompt per call (the cache only matters in the app)
        base = rss_bytes()

        def forward(prompt):
            with torch.no_grad():
                return model(to_tokens(model, prompt))

        def on_the_bridge(call):  # the prompt pass through the bridge's hooks, as before this version (no fast engine)
            engine, exact._ENGINES[model] = exact._ENGINES[model], None  # None: as for a model the engine does not fit
            try:
                return call()
            finally:
                exact._ENGINES[model] = engine

        def separately(prompt):
            top = predict(model, prompt)
            target = top.top_tokens[0]
            return top, logit_lens(model, prompt, target), direct_logit_attribution(model, prompt, target, None), attention_patterns(model, prompt, 0)

        parts = {
            "bare forward pass (the bridge, no cache)": forward,
            "bare forward pass, torch's own products (before)": lambda p: torch_products(lambda: forward(p)),
            "predict": lambda p: predict(model, p),
            "predict, the bridge's pass (before)": lambda p: on_the_bridge(lambda: predict(model, p)),
            "logit lens (a target)": lambda p: logit_lens(model, p, " Mary"),
            "logit lens, torch's own products (before)": lambda p: torch_products(lambda: logit_lens(model, p, " Mary")),
            "DLA": lambda p: direct_logit_attribution(model, p, " Mary", " John"),
            "attention (one layer)": lambda p: attention_patterns(model, p, 0),
            "the four, one after another (before)": separately,
            "`explore`: the four from one pass": lambda p: explore(model, p, None, None, 0),
            "`explore`, the bridge's pass (before)": lambda p: on_the_bridge(lambda: explore(model, p, None, None, 0)),
        }
        for fn in parts.values():  # warm-up
            fn(next(fresh))
        times, peaks = {}, {}
        for name, fn in parts.items():
            runs = [peak_memory(lambda: fn(next(fresh)), base) for _ in range(args.repeats)]
            times[name], peaks[name] = statistics.median(s for _, s, _ in runs), max(m for _, _, m in runs)

        unembedding = unembedding_products(model, 13 * n_tokens, args.repeats)

        demo = app.build_demo(model, runner=Runner(model, cache_dir=cache_dir), warm=False)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        demo.launch(prevent_thread_lock=True, server_port=port, quiet=True)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        served = {"/predict": lambda p: client.predict(p, 10, api_name="/predict"),
                  "/explore": lambda p: client.predict(p, "", "", 0, 0, api_name="/explore")}
        for fn in served.values():
            fn(next(fresh))
        over_http = {name: statistics.median(peak_memory(lambda: fn(next(fresh)))[1] for _ in range(args.repeats)) for name, fn in served.items()}
        demo.close()

    forward_s = times["bare forward pass (the bridge, no cache)"]
    print(f"GPT-2 Small-shaped model (random weights), {args.threads} threads, torch {torch.__version__}; a {n_tokens}-token prompt "
          f"(BOS included; {len(lengths)} lengths in the template's variants, one used), median of {args.repeats}, a new prompt each call\n")
    print("| in process | median seconds | x the bare forward pass | peak memory (MB) |")
    print("|---|---:|---:|---:|")
    for name, value in times.items():
        print(f"| {name} | {value:.3f} | {value / forward_s:.2f} | {peaks[name] / 2**20:.0f} |")
    ratio = over_http["/explore"] / over_http["/predict"]
    print("\n| through gradio_client, same server | median seconds |")
    print("|---|---:|")
    for name, value in over_http.items():
        print(f"| a new prompt to `{name}` | {value:.3f} |")  # a row starting "| `/" would read as README's endpoint table
    print(f"| ratio `/explore` / `/predict` | {ratio:.2f}x |")
    rows, flops = unembedding.pop("rows"), unembedding.pop("flops")
    shape = f"[{rows} x {model.cfg.d_model}] x [{model.cfg.d_model} x {model.cfg.d_vocab}]"
    print(f"\n| the lens's unembedding: {shape}, {DEFAULTS.vocab_block} tokens a product | median seconds | GFLOP/s | max abs difference from torch's |")
    print("|---|---:|---:|---:|")
    for name, (seconds, difference) in unembedding.items():
        print(f"| {name} | {seconds:.3f} | {flops / seconds / 1e9:.0f} | {difference:.1e} |")


def unembedding_products(model, rows: int, repeats: int) -> dict:
    """The logit lens's products alone (one row per checkpoint and position): torch's linear, core.products.linear,
    and core.products.linear on the fast engine's prepared blocks (core.products.prepare), which the lens reads."""
    x = torch.randn(rows, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    plain = [(block, block_bias) for _, block, block_bias in products.row_blocks(model.W_U.T.contiguous(), model.b_U, DEFAULTS.vocab_block)]
    prepared = [(block, block_bias) for _, block, block_bias in exact.fast_engine(model).unembed_blocks]

    def blocks(product, weights):
        with torch.no_grad():
            return [product(x, block, block_bias) for block, block_bias in weights]

    reference = torch.cat(blocks(torch.nn.functional.linear, plain), -1)
    found = {"rows": rows, "flops": 2 * rows * model.cfg.d_model * model.cfg.d_vocab}
    runs = {
        "torch.nn.functional.linear (MKL here)": (torch.nn.functional.linear, plain),
        "core.products.linear (oneDNN here)": (products.linear, plain),
        "core.products.linear, the engine's prepared blocks (the lens's)": (products.linear, prepared),
    }
    for name, (product, weights) in runs.items():
        blocks(product, weights)  # warm-up
        seconds = statistics.median(peak_memory(lambda: blocks(product, weights))[1] for _ in range(repeats))
        found[name] = (seconds, (torch.cat(blocks(product, weights), -1) - reference).abs().max().item())
    return found


if __name__ == "__main__":
    main()
