"""How fast the app starts and answers, on a GPT-2 Small-shaped model (random weights), 2 threads.

    python -m benchmarks.bench_app

Measures: build_demo with an empty example cache (first start: every example computed),
build_demo again with the cache on disk (a restart), and through gradio_client the latency
of an example (served from the cache) versus a new prompt.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402
from gradio_client import Client  # noqa: E402

import app  # noqa: E402
from core import load_model, save_random_gpt2  # noqa: E402
from examples import EXAMPLES  # noqa: E402
from serving.runner import Runner  # noqa: E402


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as model_dir, tempfile.TemporaryDirectory() as cache_dir:
        model = load_model(save_random_gpt2(model_dir))
        cold, _ = seconds(lambda: app.build_demo(runner=Runner(model, cache_dir=cache_dir)))
        warm, demo = seconds(lambda: app.build_demo(runner=Runner(model, cache_dir=cache_dir)))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        demo.launch(prevent_thread_lock=True, server_port=port, quiet=True)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        example = EXAMPLES["contrast"][1]
        args = (example["clean"], example["corrupted"], example["answer"], example["wrong"])
        cached = statistics.median(seconds(lambda: client.predict(*args, api_name="/contrast"))[0] for _ in range(3))
        fresh, _ = seconds(
            lambda: client.predict(
                "When Anne and Tom went to the bank, Anne gave a coin to",
                "When Anne and Tom went to the bank, Tom gave a coin to",
                " Tom",
                " Anne",
                api_name="/contrast",
            )
        )
        explorer_cached = statistics.median(
            seconds(lambda: client.predict(*[EXAMPLES["explorer"][0][k] for k in ("prompt", "target", "competing", "layer")], api_name="/explore"))[0]
            for _ in range(3)
        )
        demo.close()
    print("GPT-2 Small-shaped model, 2 threads\n")
    print("| what | seconds |")
    print("|---|---:|")
    print(f"| first start: build_demo computing all {sum(len(v) for v in EXAMPLES.values())} examples | {cold:.1f} |")
    print(f"| restart: build_demo with the example cache on disk | {warm:.1f} |")
    print(f"| Prompt Explorer example via gradio_client (cached) | {explorer_cached:.3f} |")
    print(f"| Contrast Pairs example via gradio_client (cached) | {cached:.3f} |")
    print(f"| Contrast Pairs, a new pair via gradio_client | {fresh:.1f} |")


if __name__ == "__main__":
    main()
