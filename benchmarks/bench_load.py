"""Many users at once: the real app in its own process, N gradio_client users, every endpoint.

    python -m benchmarks.bench_load load [--model demo|gpt2-shaped] [--users 1 4 16] [--requests 60] [--lane all|light]
        [--heavy 0] [--heavy-endpoint /patching|/contrast]
    python -m benchmarks.bench_load soak [--model demo] [--requests 500] [--users 4]

load: a fixed, seeded list of distinct requests spread over every endpoint (JSON API and UI
events; `--lane light`: the one-pass ones, which share forward passes) is answered once by one
user (the serial answers), then, on a freshly started server each time (so nothing is answered
from the results cache) once it has warmed its examples, by N concurrent users (with `--heavy H`, beside H users sending exact
patching requests all along: the JSON API's `/patching`, or with `--heavy-endpoint /contrast` the
Contrast Pairs tab's event, which reports its progress, so that it runs in smaller steps). Prints throughput, p50/p95 latency, errors (must be 0), whether
every answer equals the serial one, the share of the machine's CPU the server and the users' own
process used meanwhile (they share the machine), the server's CPU seconds a request (all its threads),
and the server's resident memory after the run, its peak while the users were served, and its peak
since start (loading the model included); then, for `--lane light`, the server's ceiling on this machine at that CPU a
request: every core busy with the server's own work, no users' process beside it and no idle time (an
upper bound on what users on other machines could get; users here share its cores).
`--lane light` also prints the model's own requests/s for the same requests: the app's runner in
the benchmark's process, 1 and N threads, without HTTP or figures; and, endpoint by endpoint, what a
request costs the model alone and among the most users at once.

soak: one server answers `--requests` mixed requests (mostly distinct, so the caches fill and
evict) from `--users` concurrent users; prints the server's resident memory at launch, after the
first 50 requests (warm) and at the end, and the growth from warm to end.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TQDM_DISABLE", "1")  # the model the benchmark writes, and loads for its "model alone" line

import numpy as np  # noqa: E402
from gradio_client import Client  # noqa: E402

from benchmarks.common import cpu_seconds, memory_status, reset_peak  # noqa: E402
from core.registry import techniques  # noqa: E402
from demo_model import corpus  # noqa: E402

TECHNIQUES = techniques()
CORES = os.cpu_count() or 1  # "CPU": the share of all the machine's cores the server and the users' process used during the row
ENDPOINTS = [*(f"/{name}" for name in TECHNIQUES), "/explore", "/circuit_map", "/contrast"]  # every technique's, and the tabs' events
LIGHT = [*(f"/{name}" for name, t in TECHNIQUES.items() if t.lane == "light"), "/explore"]  # one forward pass each: batched together


def ioi_pair(rng: random.Random, order: str | None = None) -> tuple[str, str, str, str, str]:
    """(clean, corrupted, indirect object, subject, the corrupted prompt's other name): a seeded IOI pair,
    the corrupted prompt naming another indirect object; `order` None: ABBA or BABA at random."""
    subject, io, other = rng.sample(corpus.NAMES, 3)
    template, place, obj = rng.choice(corpus.IOI_TEMPLATES), rng.choice(corpus.PLACES), rng.choice(corpus.OBJECTS)
    order = order or rng.choice(["ABBA", "BABA"])
    clean = corpus.ioi_prompt(template, io, subject, place, obj, order)
    return clean, corpus.ioi_prompt(template, other, subject, place, obj, order), io, subject, other


def make_requests(n: int, seed: int, n_layers: int, endpoints: list[str] = ENDPOINTS) -> list[tuple[str, tuple]]:
    """n requests, round-robin over `endpoints`, with seeded IOI prompts, facts and induction sizes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        endpoint = endpoints[i % len(endpoints)]
        clean, corrupted, io, subject, other = ioi_pair(rng)
        fact = corpus.sample_fact(rng).rsplit(" ", 1)[0]  # without the city
        layer = rng.randrange(n_layers)
        args = {
            "/predict": (rng.choice([clean, fact]), rng.randint(1, 20)),
            "/logit_lens": (rng.choice([clean, fact]), f" {io}"),
            "/dla": (clean, f" {io}", f" {subject}"),
            "/attention": (rng.choice([clean, fact]), layer),
            "/explore": (rng.choice([clean, fact]), "", rng.choice(["", f" {subject}"]), layer),
            "/induction": (rng.randint(5, 20), rng.randint(1, 4), rng.randrange(1000)),
            "/circuit_map": (rng.randint(5, 20), rng.randint(1, 4), rng.randrange(1000)),
            "/patching": (clean, corrupted, f" {io}", f" {other}"),
            "/attribution_patching": (clean, corrupted, f" {io}", f" {other}"),
            "/contrast": (clean, corrupted, f" {io}", f" {other}"),
        }.get(endpoint)
        if args is None:  # a technique this list does not know yet: its declared example
            t = TECHNIQUES[endpoint[1:]]
            args = t.request()
        out.append((endpoint, args))
    return out


def comparable(value):
    """An answer with downloaded files replaced by their content (paths differ per run), figures by their
    parsed JSON (so their numbers are compared as numbers)."""
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    if isinstance(value, dict) and value.get("type") == "plotly" and isinstance(value.get("plot"), str):
        return comparable(value | {"plot": json.loads(value["plot"])})
    if isinstance(value, dict) and isinstance(value.get("bdata"), str) and "dtype" in value:  # Plotly's packed array
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, str) and value.endswith(".json") and os.path.isfile(value):
        return json.loads(Path(value).read_text())
    return value


def difference(a, b, key: str = "") -> float | None:
    """How far answer `a` is from the serial answer `b`: None where they differ in structure, text or a
    count, else the largest absolute difference of their numbers (0.0: bit for bit). A batched forward
    pass adds its rows in another order than a pass over one prompt (float32 rounding, about 1e-6 of a
    logit), so a rank among the vocabulary (a key ending "ranks") may move by the logits that tie the
    target's to rounding (rank_slack)."""
    if isinstance(a, dict) and isinstance(b, dict):
        parts = [difference(a[k], b[k], k) for k in b] if a.keys() == b.keys() else [None]
    elif isinstance(a, list) and isinstance(b, list):
        parts = [difference(x, y, key) for x, y in zip(a, b)] if len(a) == len(b) else [None]
    elif isinstance(b, float) and isinstance(a, (int, float)):
        return abs(a - b)
    elif isinstance(b, int) and isinstance(a, int) and key.endswith("ranks") and abs(a - b) <= rank_slack(b):
        return 0.0 if a == b else 1e-12  # a tie broken the other way: not bit for bit
    else:
        return 0.0 if a == b else None
    return None if None in parts else max(parts, default=0.0)


def rank_slack(rank: int) -> int:
    """How far a rank among the vocabulary may move between two float32 runs that add in another order: by
    the logits within rounding (about 1e-6) of the target's. Near the top of the vocabulary that is one
    at most; deep in it, where the logits lie densest, a few: a five-thousandth of the rank (measured on the
    GPT-2-shaped model: ranks of 27,975 and of 19,402 moved by 2)."""
    return max(1, rank // 5_000)


def where_different(a, b, path: str = "", key: str = "") -> str | None:
    """Where answer `a` first differs from the serial answer `b` beyond what `difference` allows, and how
    (`key`: the dict key a list's items are compared under, as in `difference`)."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        found = (where_different(a[k], b[k], f"{path}.{k}", k) for k in b)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        found = (where_different(x, y, f"{path}[{i}]", key) for i, (x, y) in enumerate(zip(a, b)))
    else:
        return None if difference(a, b, key) is not None else f"{path}: {str(a)[:80]!r} against {str(b)[:80]!r}"
    return next((place for place in found if place), None)


def agreement(answers: list, serial: list, atol: float = 1e-4) -> str:
    """"yes, bit for bit", "yes, to <largest absolute difference>" (at most `atol`), or "NO" (where, on stderr)."""
    worst = [difference(a, s) for a, s in zip(answers, serial)]
    if None in worst or max(worst) > atol:
        for index, (found, a, s) in enumerate(zip(worst, answers, serial)):
            if found is None or found > atol:
                print(f"request {index} differs from its serial answer at {where_different(a, s) or 'a number'}", file=sys.stderr)
        return "NO"
    return "yes, bit for bit" if max(worst) == 0 else f"yes, to {max(worst):.0e}"


class Server:
    """`python app.py` in its own process on a free port, with an empty cache directory. Its console
    lines are kept (`lines`); `warmed()` waits until the examples it computes in the background are
    ready, so that a row measures the users' requests, not the users beside the app's own warming."""

    def __init__(self, model: str, cache_dir: str):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = os.environ | {"CIRCUITBREAKER_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--model", model, "--port", str(self.port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.lines: list[str] = []
        self._said = threading.Condition()
        threading.Thread(target=self._read_console, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the app exited during start-up")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the app did not start in 15 minutes")

    def _read_console(self) -> None:
        for line in self.process.stdout:  # read all along: a full pipe would block the app's prints
            with self._said:
                self.lines.append(line.rstrip("\n"))
                self._said.notify_all()
        with self._said:  # the app exited
            self._said.notify_all()

    def warmed(self, timeout_s: float = 900) -> None:
        """Wait until the app says its background warming of the examples ended."""
        ended = lambda: any("examples ready" in line or "warming examples stopped" in line for line in self.lines)  # noqa: E731
        with self._said:
            if not self._said.wait_for(lambda: ended() or self.process.poll() is not None, timeout_s) or not ended():
                raise RuntimeError(f"the app did not finish warming its examples; its last lines: {self.lines[-3:]}")

    def rss_mib(self, field: str = "VmRSS") -> float:
        """Resident memory now (VmRSS) or at its peak so far (VmHWM)."""
        return memory_status(self.process.pid)[field] / 2**20

    def start_peak(self) -> bool:
        """Start the server's peak resident memory afresh (False where that is not possible)."""
        return reset_peak(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def run_users(url: str, requests: list[tuple[str, tuple]], users: int) -> tuple[list, list[float], int, float]:
    """Answers (in request order), latencies, error count, wall seconds; user u takes requests u, u+N, ..."""
    answers, latencies, errors = [None] * len(requests), [0.0] * len(requests), [0]

    def user(u: int):
        client = Client(url, verbose=False)
        for i in range(u, len(requests), users):
            endpoint, args = requests[i]
            start = time.perf_counter()
            try:
                answers[i] = comparable(client.predict(*args, api_name=endpoint))
            except Exception as err:  # noqa: BLE001  (counted and reported: must be 0)
                errors[0] += 1
                answers[i] = f"ERROR {type(err).__name__}: {err}"
            latencies[i] = time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=users) as pool:
        list(pool.map(user, range(users)))
    return answers, latencies, errors[0], time.perf_counter() - start


def heavy_user(url: str, stop: threading.Event, done: list[float], failed: list[str], endpoint: str = "/patching") -> None:
    """Exact patching on IOI pairs through `endpoint`, one after another until `stop` (each one's seconds
    into `done`, each error's message into `failed`)."""
    client = Client(url, verbose=False)
    rng = random.Random(1)
    while not stop.is_set():
        clean, corrupted, io, _, other = ioi_pair(rng, "ABBA")
        start = time.perf_counter()
        try:
            client.predict(clean, corrupted, f" {io}", f" {other}", api_name=endpoint)
        except Exception as err:  # noqa: BLE001  (counted and reported: must be none)
            failed.append(f"{type(err).__name__}: {err}")
            continue
        done.append(time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def model_argument(name: str, workdir: str) -> tuple[str, int]:
    if name == "demo":
        return "demo", json.loads((ROOT / "demo_model" / "weights" / "config.json").read_text())["n_layer"]
    from core import save_random_gpt2

    return save_random_gpt2(Path(workdir) / "gpt2-shaped"), 12


def model_alone(model_name: str, requests: list[tuple[str, tuple]], users: list[int]) -> tuple[dict[int, float], dict[str, tuple[float, float]]]:
    """The model's part of the light `requests`: the app's runner in this process (batching what waits
    together, as the server's does), no HTTP and no figures. Returns the requests/s of N threads at once,
    for each N in `users`, and for each endpoint the seconds a request of its own takes alone and
    with the most users at once (only that endpoint's requests)."""
    from core import DEFAULTS, load_model
    from core.explorer import explore
    from serving.runner import Runner

    model = load_model(model_name)
    runner = Runner(model, cache_dir=None, max_entries=0)  # keeps no results: every call computes (the requests are distinct)

    def call(endpoint: str, args: tuple):
        if endpoint == "/explore":  # what ui.handlers.Handlers.explore asks of the runner
            prompt, target, competing, layer = args
            return runner.run(explore, prompt, target or None, competing or None, layer, DEFAULTS.top_k)
        technique = TECHNIQUES[endpoint[1:]]
        return runner.run(technique.run, *technique.arguments(args))

    def seconds(todo: list[tuple[str, tuple]], n: int) -> float:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(lambda u: [call(*todo[i]) for i in range(u, len(todo), n)], range(n)))
        return time.perf_counter() - start

    call(*requests[0])  # warm-up
    rates = {n: len(requests) / seconds(requests, n) for n in users}
    by_endpoint = {}
    for endpoint in dict.fromkeys(endpoint for endpoint, _ in requests):
        own = [request for request in requests if request[0] == endpoint]
        by_endpoint[endpoint] = (seconds(own, 1) / len(own), seconds(own, max(users)) / len(own))
    return rates, by_endpoint


def load(args) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        model, n_layers = model_argument(args.model, workdir)
        endpoints = LIGHT if args.lane == "light" else ENDPOINTS
        requests = make_requests(args.requests, seed=0, n_layers=n_layers, endpoints=endpoints)
        server = Server(model, tempfile.mkdtemp(dir=workdir))
        try:
            server.warmed()
            serial, _, serial_errors, serial_wall = run_users(server.url, requests, 1)
        finally:
            server.stop()
        assert serial_errors == 0, [a for a in serial if isinstance(a, str) and a.startswith("ERROR")][:3]
        one_user = len(requests) / serial_wall  # "vs one user": the users=1 row where there is one, else this run
        print(f"model: {args.model}; {len(requests)} distinct requests over {len(endpoints)} endpoints ({', '.join(endpoints)}); fresh server per row\n")
        print(f"serial answers (one user, its own server): {one_user:.2f} requests/s\n")
        if args.lane == "light":
            alone, by_endpoint = model_alone(model, requests, sorted({1, *args.users}))
            shown = "; ".join(f"{n} user{'s' * (n > 1)} {rate:.2f} requests/s ({rate / alone[1]:.1f}x)" for n, rate in alone.items())
            print(f"the model alone (the same requests through the app's runner in this process: no HTTP, no figures): {shown}\n")
            most = max(args.users)
            print(f"| the model alone, one endpoint's requests | ms a request, alone | ms a request, {most} at once | gain |")
            print("|---|---:|---:|---:|")
            for endpoint, (one, many) in by_endpoint.items():
                print(f"| {endpoint[1:]} | {one * 1e3:.1f} | {many * 1e3:.1f} | {one / many:.1f}x |")
            print()
        columns = ["users", "requests/s", "vs one user", "p50 latency (s)", "p95 latency (s)", "errors", "every answer = serial answer"]
        columns += ["CPU: server / users", "server CPU a request (ms)", "memory after (MiB)", "peak while serving (MiB)", "peak, loading included (MiB)"]
        print("| " + " | ".join(columns) + " |")
        print("|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|")
        bounds = []  # (users, the server's requests/s if it had every core to itself at its measured CPU a request)
        for users in args.users:
            server = Server(model, tempfile.mkdtemp(dir=workdir))
            stop, heavy_seconds, heavy_errors = threading.Event(), [], []
            heavy = [threading.Thread(target=heavy_user, args=(server.url, stop, heavy_seconds, heavy_errors, args.heavy_endpoint)) for _ in range(args.heavy)]
            try:
                server.warmed()
                peak = server.rss_mib("VmHWM")  # loading the model and warming the examples included
                fresh = server.start_peak()
                for thread in heavy:
                    thread.start()
                cpu_before = cpu_seconds(server.process.pid), cpu_seconds("self")
                answers, latencies, errors, wall = run_users(server.url, requests, users)
                used = [cpu_seconds(pid) - before for pid, before in zip((server.process.pid, "self"), cpu_before)]  # CPU seconds: server, users
                after, serving = server.rss_mib(), server.rss_mib("VmHWM")
                peak, serving = max(peak, serving), serving if fresh else None
            finally:
                stop.set()
                for thread in heavy:
                    thread.join()
                server.stop()
            rate = len(requests) / wall
            if users == 1:
                one_user = rate
            label = users
            if heavy:
                what = "exact patching run" if args.heavy_endpoint == "/patching" else f"`{args.heavy_endpoint}` run"
                what += "s" * (len(heavy_seconds) != 1)
                runs = f"{len(heavy_seconds)} {what}, median {statistics.median(heavy_seconds or [0]):.1f} s, {len(heavy_errors)} errors"
                option = "" if args.heavy_endpoint == "/patching" else f" --heavy-endpoint {args.heavy_endpoint}"
                label = f"{users} + {args.heavy} heavy (`--heavy {args.heavy}{option}`: {runs})"
            p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
            cells = [label, f"{rate:.2f}", f"{rate / one_user:.1f}x", f"{p50:.2f}", f"{p95:.2f}", errors, agreement(answers, serial)]
            share = [seconds / (wall * CORES) for seconds in used]  # of all the machine's cores
            per_request = used[0] / len(requests)  # the server's CPU seconds (all its threads) a request
            cells += [f"{share[0]:.0%} / {share[1]:.0%}", f"{per_request * 1e3:.0f}", f"{after:.0f}"]
            cells += ["n/a" if serving is None else f"{serving:.0f}", f"{peak:.0f}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
            if not heavy and args.lane == "light":  # the light lane's: issue 17's many-users measure
                bounds.append((users, CORES / per_request))
        if bounds:  # the most a server on this machine could answer at its measured CPU a request, with no users' process beside it
            shown = "; ".join(f"{users} user{'s' * (users > 1)} {bound:.1f} requests/s ({bound / one_user:.1f}x one user)" for users, bound in bounds)
            print(f"\nthe server's ceiling, every core busy with its own work at its CPU a request (the users' process and idle time left out): {shown}")


def soak(args) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        model, n_layers = model_argument(args.model, workdir)
        requests = make_requests(args.requests, seed=1, n_layers=n_layers)
        server = Server(model, tempfile.mkdtemp(dir=workdir))
        trajectory, errors, latencies = [], 0, []
        start = time.perf_counter()
        try:
            launch = server.rss_mib()
            for first in range(0, len(requests), 50):
                _, part_latencies, part_errors, _ = run_users(server.url, requests[first : first + 50], args.users)
                errors += part_errors
                latencies += part_latencies
                trajectory.append(server.rss_mib())
        finally:
            server.stop()
        warm, end = trajectory[0], trajectory[-1]
        seconds = time.perf_counter() - start
        print(f"model: {args.model}; {len(requests)} mixed requests (mostly distinct) from {args.users} concurrent users in {seconds:.0f} s")
        print(f"errors: {errors}; p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} s")
        print(f"server resident memory (MiB): launch {launch:.0f}; after every 50 requests: {', '.join(f'{v:.0f}' for v in trajectory)}")
        print(f"growth from the first 50 requests (warm) to the end: {100 * (end - warm) / warm:+.1f}%  (from launch: {100 * (end - launch) / launch:+.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p_load = sub.add_parser("load")
    p_load.add_argument("--model", choices=["demo", "gpt2-shaped"], default="demo")
    p_load.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    p_load.add_argument("--requests", type=int, default=60)
    p_load.add_argument("--lane", choices=["all", "light"], default="all", help="light: the one-pass endpoints only (they share passes)")
    p_load.add_argument("--heavy", type=int, default=0, help="users sending exact patching requests throughout each row (light users' latency beside them)")
    heavy_endpoints = ["/patching", "/contrast"]  # the API's exact patching, the Contrast Pairs tab's event
    p_load.add_argument("--heavy-endpoint", choices=heavy_endpoints, default="/patching", help="what the heavy users send")
    p_soak = sub.add_parser("soak")
    p_soak.add_argument("--model", choices=["demo", "gpt2-shaped"], default="demo")
    p_soak.add_argument("--requests", type=int, default=500)
    p_soak.add_argument("--users", type=int, default=4)
    args = parser.parse_args()
    (load if args.mode == "load" else soak)(args)


if __name__ == "__main__":
    main()
