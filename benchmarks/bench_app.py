"""How fast the app starts and answers, on a GPT-2 Small-shaped model (random weights), 2 threads.

    python -m benchmarks.bench_app

Starts `python app.py --model <dir>` for real, as a user does: with an empty example cache (a first
start) and again with the cache on disk (a restart). Measures, from the process's start: the page
answering (HTTP 200 on /), and the console's "examples ready" (every example computed or loaded, in
the background after the page serves); the app's peak resident memory (VmHWM). Then, through
gradio_client on the restarted app, the latency of an example (served from the cache) versus a new
prompt.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client  # noqa: E402

from benchmarks.common import memory_status  # noqa: E402
from core import save_random_gpt2  # noqa: E402
from examples import EXAMPLES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


class App:
    """`python app.py` on a model directory and an example cache, timed from the process's start."""

    def __init__(self, model_dir: str, cache_dir: str, console: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url, self.console_path = f"http://127.0.0.1:{self.port}/", console
        env = os.environ | {"CIRCUITBREAKER_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.start = time.perf_counter()
        with open(console, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "app.py"), "--model", model_dir, "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )

    def until(self, ready, what: str, limit_s: float = 900) -> float:
        """Seconds from the start until ready() (polled every 50 ms)."""
        while not ready():
            if self.process.poll() is not None or time.perf_counter() - self.start > limit_s:
                raise SystemExit(f"app.py never reached {what}:\n{self.console_path.read_text()[-3000:]}")
            time.sleep(0.05)
        return time.perf_counter() - self.start

    def page(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def examples_ready(self) -> bool:
        return "CircuitBreaker: examples ready" in self.console_path.read_text()

    def peak_rss_mib(self) -> float:
        return memory_status(self.process.pid).get("VmHWM", float("nan")) / 2**20

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def main() -> None:
    with tempfile.TemporaryDirectory() as model_dir, tempfile.TemporaryDirectory() as cache_dir, tempfile.TemporaryDirectory() as logs:
        save_random_gpt2(model_dir)
        rows = []
        for name, console in (("first start (empty example cache)", "first.txt"), ("restart (the example cache on disk)", "second.txt")):
            app = App(model_dir, cache_dir, Path(logs) / console)
            page = app.until(app.page, "serving its page")
            examples = app.until(app.examples_ready, "its examples")
            rows.append((name, page, examples, app.peak_rss_mib()))
            if name.startswith("restart"):
                client = Client(app.url, verbose=False)
                example = EXAMPLES["contrast"][1]
                args = (example["clean"], example["corrupted"], example["answer"], example["wrong"])
                client.predict(*args, api_name="/contrast")  # from the disk cache into memory
                cached = statistics.median(seconds(lambda: client.predict(*args, api_name="/contrast"))[0] for _ in range(3))
                where = "When Anne and Tom went to the bank,"
                new_pair = (f"{where} Anne gave a coin to", f"{where} Tom gave a coin to", " Tom", " Anne")
                fresh, _ = seconds(lambda: client.predict(*new_pair, api_name="/contrast"))
                explore = [EXAMPLES["explorer"][0][k] for k in ("prompt", "target", "competing", "layer")]
                explorer_cached = statistics.median(seconds(lambda: client.predict(*explore, api_name="/explore"))[0] for _ in range(3))
            app.stop()
    print(f"GPT-2 Small-shaped model (random weights), `python app.py --model <dir>`, {sum(len(v) for v in EXAMPLES.values())} examples\n")
    print("| start | page answers | every example ready | peak memory |")
    print("|---|---:|---:|---:|")
    for name, page, examples, peak in rows:
        print(f"| {name} | {page:.1f} s | {examples:.1f} s | {peak:.0f} MiB |")
    print("\n| request via gradio_client (on the restarted app) | seconds |")
    print("|---|---:|")
    print(f"| Prompt Explorer example (cached) | {explorer_cached:.3f} |")
    print(f"| Contrast Pairs example (cached) | {cached:.3f} |")
    print(f"| Contrast Pairs, a new pair | {fresh:.1f} |")


if __name__ == "__main__":
    main()
