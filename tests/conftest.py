"""Models built locally, offline: tests never touch the network."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("TQDM_DISABLE", "1")

import pytest

from core import ModelLoadError, load_model, save_random_gpt2
from examples import EIFFEL, IOI_CLEAN, IOI_CORRUPTED  # noqa: F401  (defined once, in examples/prompts.json; tests import them from here)
from tests.circuits import save_induction_circuit


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """2 layers, 4 heads, d_model 64, GPT-2's real tokenizer: milliseconds per call."""
    path = save_random_gpt2(tmp_path_factory.mktemp("tiny"), n_layers=2, n_heads=4, d_model=64, n_ctx=64, seed=1)
    return load_model(path)


@pytest.fixture(scope="session")
def gpt2_shaped(tmp_path_factory):
    """GPT-2 Small's shape (12 layers x 12 heads, d_model 768) with random weights, non-zero
    biases and non-unit LayerNorm gains, and GPT-2's real tokenizer, loaded from a local directory."""
    return load_model(save_random_gpt2(tmp_path_factory.mktemp("gpt2_shaped"), seed=0))


@pytest.fixture(scope="session")
def induction_circuit(tmp_path_factory):
    return load_model(save_induction_circuit(tmp_path_factory.mktemp("induction_circuit")))


@pytest.fixture(scope="session")
def gpt2():
    """Real GPT-2 Small: only where it is cached or the Hub can be reached."""
    try:
        return load_model("gpt2")
    except ModelLoadError as err:
        pytest.skip(f"needs real GPT-2 weights (internet or the HF cache): {err}")


@pytest.fixture(scope="session")
def demo_model():
    """The small model trained by demo_model/train.py and committed in the repository."""
    return load_model("demo")


def assert_same_answer(served: dict, expected: dict) -> None:
    """An answer another process served equals ours: text, tokens and counts exactly, numbers to 1e-6 relative.
    Another process's float32 sums can add in another order (seen here: 1e-7 of a probability, in about one start
    in three), so its numbers can differ from ours in their last float32 digits."""
    assert served.keys() == expected.keys()
    for key, value in expected.items():
        numbers = isinstance(value, list) and value and all(isinstance(v, float) for v in value)
        assert served[key] == (pytest.approx(value, rel=1e-6) if numbers else value), key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(demo_model, tmp_path_factory):
    """The app on the bundled demo model (a real Gradio server), so API tests exercise real circuits."""
    import app
    from serving.runner import Runner

    demo = app.build_demo(runner=Runner(demo_model, cache_dir=tmp_path_factory.mktemp("cache")))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, **app.launch_options(), quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="session")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)
