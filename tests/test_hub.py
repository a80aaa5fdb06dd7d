"""The path every online user takes: `python app.py` downloads GPT-2 from the Hugging Face Hub, and
after a restart serves it from the Hub cache, with the Hub gone, without recomputing an example.

The Hub is a stand-in on loopback (tests/hub_standin.py) serving a small GPT-2 with GPT-2's real
tokenizer under the name `gpt2`, so this runs offline, in CI, in under two minutes on two CPU cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from core import load_model, predict, save_random_gpt2
from serving.runner import code_fingerprint
from tests.conftest import EIFFEL, free_port
from tests.hub_standin import HubStandIn

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(n_layers=2, n_heads=4, d_model=64, n_ctx=128)  # not the demo model's 5 layers x 4 heads
HEADER = "Watch **gpt2** (2 layers x 4 heads) think"  # app.py's first Markdown, for the model the Hub served
START_DEADLINE_S = 600  # generous: a loaded CI machine; the tiny model starts in well under a minute
# Settings that would send the app somewhere other than the Hub stand-in and the fresh cache.
UNSET = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE",
    "HF_TOKEN", "CIRCUITBREAKER_MODEL", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT",
)


class App:
    """`python app.py --port N` as a subprocess, its console (stdout and stderr) drained to a file."""

    def __init__(self, env: dict[str, str], console: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.console_path = console
        self._console = open(console, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._console, stderr=subprocess.STDOUT,
        )

    def console(self) -> str:
        return self.console_path.read_text(encoding="utf-8", errors="replace")

    def wait_until_serving(self, report) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"app.py exited with {self.process.returncode} before serving\n{report()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)  # polling a server that is still starting
        pytest.fail(f"app.py did not answer within {START_DEADLINE_S} s\n{report()}")

    def wait_for_examples(self, report) -> None:
        """Until the console says every example is ready (they are computed after the page serves)."""
        deadline = time.monotonic() + START_DEADLINE_S
        while "CircuitBreaker: examples ready" not in self.console():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"app.py did not say its examples were ready\n{report()}")
            time.sleep(0.5)  # polling the console of a server that is still warming

    def page(self) -> str:
        """The page and its configuration (where Gradio keeps every Markdown's text)."""
        texts = []
        for path in ("", "config"):
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                texts.append(response.read().decode("utf-8", errors="replace"))
        return "\n".join(texts)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._console.close()  # our copy of the file handle; the app wrote through its own


def files_with_mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


def changes(before: dict[str, int], after: dict[str, int]) -> str:
    new, gone = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    rewritten = sorted(name for name in set(before) & set(after) if before[name] != after[name])
    return f"{len(new)} new files {new[:3]}, {len(rewritten)} rewritten {rewritten[:3]}, {len(gone)} removed {gone[:3]}"


def lines(console: str) -> list[str]:
    return [line.strip() for line in console.splitlines() if line.strip().startswith("CircuitBreaker:")]


def missing_console_lines(console: str, first_start: bool) -> list[str]:
    """What the start-up progress should say and does not: loading, where from, serving, then warming."""
    ours = lines(console)
    opening = "CircuitBreaker: loading gpt2" if first_start else "CircuitBreaker: restarting on gpt2"
    checks = {
        f"a first line '{opening}'": bool(ours) and ours[0].startswith(opening),
        "a line 'CircuitBreaker: warming examples' with a count like 1/14": any(
            "warming examples" in line and re.search(r"\b1/\d+", line) for line in ours
        ),
        "Gradio's 'Running on local URL'": "Running on local URL" in console,
        "'ready in' before the first warming line (the page serves first)": any(line.startswith("CircuitBreaker: ready in") for line in ours)
        and not any("warming examples" in line for line in ours[: next((i for i, line in enumerate(ours) if "ready in" in line), 0)]),
        "a last line 'CircuitBreaker: examples ready'": any(line.startswith("CircuitBreaker: examples ready") for line in ours),
        "no Traceback": "Traceback" not in console,
    }
    loading = [line for line in ours if line.startswith("CircuitBreaker: loading gpt2")]
    warming = [line for line in ours if "warming examples" in line]
    if first_start:
        checks["the loading line saying it is downloading (from the Hub)"] = any("downloading" in line.lower() for line in loading)
        checks["a warming line saying an example was computed"] = any("computed" in line for line in warming)
    else:  # the page first (from the first start's record and the example cache), then gpt2 from the Hub cache
        ready = next((i for i, line in enumerate(ours) if line.startswith("CircuitBreaker: ready in")), None)
        checks["the restarting line saying gpt2 comes from the Hub cache's snapshot"] = "models--gpt2/snapshots" in ours[0] if ours else False
        checks["'loaded gpt2' after 'ready in' (the page serves before the model loads)"] = ready is not None and any(
            line.startswith("CircuitBreaker: loaded gpt2") for line in ours[ready:]
        )
        checks["every warming line saying the example came from the cache"] = bool(warming) and all(
            "from the cache" in line and "computed" not in line for line in warming
        )
    return [what for what, ok in checks.items() if not ok]


def check_serves_gpt2(app: App, expected: dict, report) -> None:
    """The page names gpt2 with the served model's shape, shows no demo fallback, and answers its JSON API
    with the served model's numbers."""
    page = app.page()
    assert HEADER in page, f"the page does not say {HEADER!r}\n{report()}"
    assert "model-notice" not in page and "bundled demo model" not in app.console(), f"fell back to the demo model\n{report()}"
    result = Client(app.url, verbose=False).predict(EIFFEL, 3, api_name="/predict")
    assert result["tokens"] == expected["tokens"] and result["top_tokens"] == expected["top_tokens"], report()
    assert result["top_probs"] == pytest.approx(expected["top_probs"], abs=1e-5), report()


@pytest.fixture(scope="module")
def hub_model_dir(tmp_path_factory) -> Path:
    return Path(save_random_gpt2(tmp_path_factory.mktemp("hub_gpt2"), **SHAPE, seed=7))


def test_gpt2_downloads_from_the_hub_then_restarts_from_the_cache_with_the_hub_gone(hub_model_dir, tmp_path):
    hf_home, example_cache = tmp_path / "hf_home", tmp_path / "examples"
    hf_home.mkdir()
    expected = predict(load_model(str(hub_model_dir)), EIFFEL, 3).to_dict()
    code = code_fingerprint.__wrapped__()
    hub = HubStandIn(hub_model_dir).start()
    env = {k: v for k, v in os.environ.items() if k not in UNSET} | {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(hf_home),
        "CIRCUITBREAKER_CACHE_DIR": str(example_cache),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",  # the console reaches the file as it is printed, even if the app is killed
    }
    consoles: dict[str, str] = {}
    app = None

    def report() -> str:
        shown = dict(consoles) | ({"current start": app.console()} if app is not None else {})
        parts = [f"--- console, {name} ---\n{text[-6000:]}" for name, text in shown.items()]
        return "\n".join(parts + [f"--- Hub stand-in requests ---\n{hub.log()}"])

    try:
        # First start: an empty Hugging Face cache, the Hub reachable.
        app = App(env, tmp_path / "console-first.txt")
        app.wait_until_serving(report)
        app.wait_for_examples(report)
        assert hub.count("GET", "model.safetensors", status=200) == 1, f"the weights were not downloaded once\n{report()}"
        assert hub.count("GET", "config.json", status=200) >= 1, report()
        snapshot = hf_home / "hub" / "models--gpt2" / "snapshots" / hub.commit
        assert (snapshot / "model.safetensors").is_file(), f"no Hub cache in {hf_home}: {sorted(map(str, hf_home.rglob('*')))}\n{report()}"
        check_serves_gpt2(app, expected, report)
        examples = files_with_mtimes(example_cache)
        assert any(name.endswith(".json") for name in examples), f"no example was written to {example_cache}\n{report()}"
        app.stop()
        consoles["first start"] = app.console()

        # Restart with the Hub gone: its port is closed, so any network attempt fails at once.
        hub.stop()
        app = App(env, tmp_path / "console-second.txt")
        app.wait_until_serving(report)
        app.wait_for_examples(report)
        check_serves_gpt2(app, expected, report)
        after = files_with_mtimes(example_cache)
        if after != examples and code_fingerprint.__wrapped__() != code:  # the cache is keyed by core/'s source
            pytest.fail(f"core/ was edited while this test ran, so the examples' cache keys changed: run it again\n{report()}")
        assert after == examples, f"examples were recomputed on the restart: {changes(examples, after)}\n{report()}"
        app.stop()
        consoles["second start"] = app.console()
        app = None
    finally:
        if app is not None:
            app.stop()
        hub.stop()

    # The start-up progress on the console, checked last so the behaviour above is always verified.
    missing = {name: missing_console_lines(text, first_start=name == "first start") for name, text in consoles.items()}
    missing = {name: what for name, what in missing.items() if what}
    assert not missing, f"console lacks {missing}\n{report()}"

