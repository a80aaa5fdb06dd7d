"""What a hostile or careless client could do to a running server: routes around the queue, uploads,
a full disk under the downloads, markup in user text, directories left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gradio_client import Client

import app
from core import DEFAULTS
from core.runner import Runner
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED, free_port

ROOT = Path(__file__).resolve().parent.parent


def post(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_run_route_that_skips_the_queue_is_closed(server, client):
    body = json.dumps({"data": [IOI_CLEAN, 3]}).encode()
    for name in ("predict", "patching", "contrast"):
        assert post(f"{server}gradio_api/run/{name}", body, "application/json") >= 400, name
    assert client.predict(IOI_CLEAN, 3, api_name="/predict")["top_tokens"]  # gradio_client goes through the queue


def test_uploads_are_capped(server):
    boundary = "circuitbreaker"
    payload = b"x" * 100_000
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    assert post(f"{server}gradio_api/upload", body, f"multipart/form-data; boundary={boundary}") == 413


def test_a_full_disk_gives_a_warning_never_a_truncated_download(demo_model, tmp_path, monkeypatch):
    handlers = app.Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    real_write = Path.write_bytes

    def disk_full(self, data):
        real_write(self, data[: len(data) // 2])  # what a full disk leaves: half a file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    *figures, download = handlers.explore(IOI_CLEAN, " Mary", "", 1, 0)
    assert download is None and all(figures) and list(tmp_path.iterdir()) == []  # results shown, nothing half-written
    monkeypatch.setattr(Path, "write_bytes", real_write)
    *_, download = handlers.explore(IOI_CLEAN, " Mary", "", 1, 0)  # space again: the same request gets a whole file
    assert json.loads(Path(download).read_text(encoding="utf-8"))["predictions"]["top_tokens"]


def test_markdown_in_tokens_stays_text_in_the_summary(tiny_model, tmp_path):
    handlers = app.Handlers(Runner(tiny_model, cache_dir=None), str(tmp_path))
    *_, final = handlers.contrast_steps(IOI_CLEAN, IOI_CORRUPTED, "](", " [")
    summary = final[1]
    assert r"logit('\]\(')" in summary and r"logit(' \[')" in summary  # escaped: never a link
    assert app._literal("<b>x</b> [a](http://e)") == r"\<b\>x\</b\> \[a\]\(http://e\)"


def test_a_start_leaves_no_download_directory_behind(tmp_path):
    code = "import app; from core import load_model; app.build_demo(load_model('demo'), warm=False)"
    subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        check=True, capture_output=True, timeout=300,
    )
    assert not list(tmp_path.glob("circuitbreaker-downloads-*"))


def test_example_events_run_only_their_examples(demo_model, tmp_path):
    handlers = app.Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    rows = app.example_rows(demo_model)["circuit_map"][1]
    run = app._listed_only(handlers.circuit_map, rows)
    assert run(*[float(v) for v in rows[0]])  # the page sends numbers as floats: still the listed example
    with pytest.raises(ValueError, match="only the listed examples"):
        run(31, 64, 0)  # the largest Circuit Map request, smuggled through an example event


def test_error_messages_carry_user_markup_as_text(client):
    """The page's toasts render HTML, and messages quote the input: the markup arrives escaped."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as error:
        client.predict('When <a href="http://evil">John</a> <b>went', 1, api_name="/predict")
    message = str(error.value)
    assert "&lt;" in message and "<a" not in message and "<b>" not in message


@pytest.fixture()
def held_server(demo_model):
    """A server whose model is held busy by the test (so requests pile up), and its runner."""
    runner = Runner(demo_model, cache_dir=None)
    demo = app.build_demo(runner=runner, warm=False)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **app.LOOK)
    yield f"http://127.0.0.1:{port}/", demo, runner
    demo.close()


def join(url: str, demo, session: str, headers: dict | None = None) -> int:
    (fn_index,) = [fn._id for fn in demo.fns.values() if fn.api_name == "predict"]
    body = json.dumps({"data": [IOI_CLEAN, 3], "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None})
    request = urllib.request.Request(
        f"{url}gradio_api/queue/join", data=body.encode(), headers={"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_one_client_cannot_take_the_whole_queue_and_session_ids_are_capped(held_server):
    url, demo, runner = held_server
    limit = DEFAULTS.max_requests_per_client
    runner.lock.acquire()  # the model is busy: every request waits
    try:
        answers = [join(url, demo, f"s{i}") for i in range(limit + 5)]  # one address, a new session each time
        assert answers[:limit] == [200] * limit and set(answers[limit:]) == {429}
        assert join(url, demo, "another", headers={"X-Forwarded-For": "203.0.113.9"}) == 200  # another user (behind a proxy) still gets in
        assert join(url, demo, "x" * 100_000, headers={"X-Forwarded-For": "203.0.113.10"}) == 422  # a huge session id is refused
    finally:
        runner.lock.release()
    assert Client(url, verbose=False).predict(IOI_CLEAN, 2, api_name="/predict")["top_tokens"]  # and it all drains
