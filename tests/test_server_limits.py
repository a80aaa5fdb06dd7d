"""What a hostile or careless client could do to a running server: routes around the queue, uploads,
a full disk under the downloads, markup in user text, directories left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

import app
import serving
from core import LIMITS
from serving.runner import Runner
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED, free_port
from ui.common import listed_only, literal
from ui.handlers import Handlers, example_rows

ROOT = Path(__file__).resolve().parent.parent


def post(url: str, body, content_type: str = "application/json", answer: bool = False):
    """POST `body` (bytes, or an iterable of bytes: sent chunked, with no declared length); the status
    code, or (status, the answer's text) when `answer`."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    return (status, text) if answer else status


def test_the_run_route_that_skips_the_queue_is_closed(server, client):
    body = json.dumps({"data": [IOI_CLEAN, 3]}).encode()
    for name in ("predict", "patching", "contrast"):
        assert post(f"{server}gradio_api/run/{name}", body, "application/json") >= 400, name
    assert client.predict(IOI_CLEAN, 3, api_name="/predict")["top_tokens"]  # gradio_client goes through the queue


def test_uploads_are_capped(server):
    boundary = "circuitbreaker"
    payload = b"x" * (8 * LIMITS.max_task_chars)  # twice the upload cap (the largest task's pairs), under the body cap
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    assert post(f"{server}gradio_api/upload", body, f"multipart/form-data; boundary={boundary}") == 413


def test_a_full_disk_gives_a_warning_never_a_truncated_download(demo_model, tmp_path, monkeypatch):
    handlers = Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    real_write = Path.write_bytes

    def disk_full(self, data):
        real_write(self, data[: len(data) // 2])  # what a full disk leaves: half a file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    *figures, download = handlers.explore(IOI_CLEAN, " Mary", "", 1, 0).values()
    assert download is None and all(figures) and list(tmp_path.iterdir()) == []  # results shown, nothing half-written
    monkeypatch.setattr(Path, "write_bytes", real_write)
    download = handlers.explore(IOI_CLEAN, " Mary", "", 1, 0)["download"]  # space again: the same request gets a whole file
    assert json.loads(Path(download).read_text(encoding="utf-8"))["predictions"]["top_tokens"]


def test_markdown_in_tokens_stays_text_in_the_summary(tiny_model, tmp_path):
    handlers = Handlers(Runner(tiny_model, cache_dir=None), str(tmp_path))
    *_, final = handlers.contrast_steps(IOI_CLEAN, IOI_CORRUPTED, "](", " [")
    summary = final["summary"]
    assert r"logit('\]\(')" in summary and r"logit(' \[')" in summary  # escaped: never a link
    assert literal("<b>x</b> [a](http://e)") == r"\<b\>x\</b\> \[a\]\(http://e\)"


def test_a_start_leaves_no_download_directory_behind(tmp_path):
    code = "import app; from core import load_model; app.build_demo(load_model('demo'), warm=False)"
    subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        check=True, capture_output=True, timeout=300,
    )
    assert not list(tmp_path.glob("circuitbreaker-downloads-*"))


def test_example_events_run_only_their_examples(demo_model, tmp_path):
    handlers = Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    rows = example_rows(demo_model)["circuit_map"][1]
    run = listed_only(handlers.circuit_map, rows)
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
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **app.launch_options())
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
    limit = LIMITS.max_requests_per_client
    runner.lock.acquire()  # the model is busy: every request waits
    try:
        answers = [join(url, demo, f"s{i}") for i in range(limit + 5)]  # one address, a new session each time
        assert answers[:limit] == [200] * limit and set(answers[limit:]) == {429}
        assert join(url, demo, "another", headers={"X-Forwarded-For": "203.0.113.9"}) == 200  # another user (behind a proxy) still gets in
        assert join(url, demo, "x" * 65, headers={"X-Forwarded-For": "203.0.113.10"}) == 422  # a long session id is refused
        status, _ = raw_post(url, "/gradio_api/queue/join", {"Content-Length": LIMITS.max_request_bytes + 1})
        assert status == 413  # a huge body (a megabytes-long session id, say) is refused before it is read
    finally:
        runner.lock.release()
    assert Client(url, verbose=False).predict(IOI_CLEAN, 2, api_name="/predict")["top_tokens"]  # and it all drains


def test_unknown_endpoints_and_missing_values_get_a_sentence(server, client):
    status, text = post(f"{server}gradio_api/call/nope", json.dumps({"data": ["x"]}).encode(), answer=True)
    assert status == 404 and "There is no endpoint '/nope'. The endpoints are " in text and "/predict" in text
    status, text = post(f"{server}gradio_api/call/predict", json.dumps({"data": []}).encode(), answer=True)
    assert status == 422 and "/predict takes 2 values (prompt, k); the request sent 0." in text
    body = {"data": ["x"], "fn_index": 10_000, "session_hash": "abc", "event_data": None, "trigger_id": None}
    status, text = post(f"{server}gradio_api/queue/join", json.dumps(body).encode(), answer=True)
    assert status == 404 and "There is no endpoint" in text
    assert client.predict(IOI_CLEAN, 3, api_name="/predict")["top_tokens"]  # and the server keeps serving


def raw_post(url: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, str]:
    """POST over a plain socket, sending only what the server will read before it answers (a server
    that answers early and closes with unread bytes pending resets the connection, and the client
    may then never see the answer), then read the answer: (status, body)."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode(errors="replace")


def test_request_bodies_are_capped_declared_or_streamed(server):
    limit = LIMITS.max_request_bytes
    status, text = raw_post(server, "/gradio_api/call/predict", {"Content-Length": limit + 1})  # refused on the header alone
    assert status == 413 and f"larger than {limit:,} bytes" in text
    over = b"x" * (limit + 1)  # chunked, no length: refused once more than the limit has arrived
    status, text = raw_post(server, "/gradio_api/call/predict", {"Transfer-Encoding": "chunked"}, f"{len(over):x}\r\n".encode() + over)
    assert status == 413 and f"larger than {limit:,} bytes" in text
    status, text = post(f"{server}gradio_api/call/predict", iter([b'{"data": ', json.dumps([IOI_CLEAN, 3]).encode(), b"}"]), answer=True)
    assert status == 200 and "event_id" in text  # a small streamed body still arrives whole


def test_a_drain_finishes_running_work_and_turns_the_rest_away_with_a_sentence(held_server):
    """What SIGTERM starts (app.main): requests already running finish; requests still waiting, and new
    ones, are told the server is restarting."""
    url, demo, runner = held_server
    running, waiting = Client(url, verbose=False), Client(url, verbose=False)
    runner.lock.acquire()  # the model is busy: the first request runs (waiting for the model), the second waits in its lane
    try:
        first = running.submit(20, 4, 0, api_name="/induction")  # the heavy lane runs one request at a time
        light = Client(url, verbose=False).submit(IOI_CLEAN, 3, api_name="/predict")  # the light lane runs several
        for _ in range(600):
            if first.status().code.name == "PROCESSING" and light.status().code.name == "PROCESSING":
                break
            threading.Event().wait(0.05)
        second = waiting.submit(20, 4, 1, api_name="/induction")
        for _ in range(600):  # it has joined the queue, behind the first
            if second.status().code.name == "IN_QUEUE":
                break
            threading.Event().wait(0.05)
        drained = []
        drainer = threading.Thread(target=lambda: drained.append(serving.drain(demo, 60)))
        drainer.start()
        for _ in range(600):
            if getattr(demo, "_circuitbreaker_finishing", None) is not None:
                break
            threading.Event().wait(0.05)
        status, text = post(f"{url}gradio_api/call/predict", json.dumps({"data": [IOI_CLEAN, 3]}).encode(), answer=True)
        assert status == 503 and serving.RESTARTING in text  # (gradio_client says "Queue is full! Please try again.")
    finally:
        runner.lock.release()
    assert first.result(timeout=60)["scores"]  # the running requests finished with their answers
    assert light.result(timeout=60)["top_tokens"]
    with pytest.raises(Exception, match="The server is restarting"):
        second.result(timeout=60)
    drainer.join(60)
    assert drained == [True]


def test_a_temporary_folder_that_takes_no_files_turns_downloads_off_and_says_so(demo_model, monkeypatch):
    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app, "write_whole", disk_full)
    demo = app.build_demo(runner=Runner(demo_model, cache_dir=None), warm=False)
    notices = [block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "downloads-notice"]
    assert len(notices) == 1 and "JSON downloads are off" in notices[0] and "No space left on device" in notices[0]
    files = [block.value for block in demo.blocks.values() if type(block).__name__ == "File"]
    assert files and all(value is None for value in files)  # no download offered, and no error: the results are shown


def test_a_cancel_storm_leaves_nothing_running_on_the_model(held_server):
    """Join-then-cancel calls cost nothing: none of them computes, and the next request is answered
    (before, each cancelled call ran to its end on the model while the next one waited)."""
    url, demo, runner = held_server
    client = Client(url, verbose=False)
    before = runner.computed  # (the page's first examples, computed when it was built)
    runner.lock.acquire()  # the model is busy while the storm joins, so each call is either running (waiting for the model) or queued
    try:
        jobs = [client.submit(20, 16, seed, api_name="/induction") for seed in range(6)]
        jobs += [client.submit(IOI_CLEAN, IOI_CORRUPTED, " Mary", " John", api_name="/patching") for _ in range(3)]
        jobs += [client.submit(IOI_CLEAN, k, api_name="/predict") for k in range(1, 4)]
        for _ in range(600):  # all of them are in the queue
            if len(demo._queue.event_ids_to_events) == len(jobs):
                break
            threading.Event().wait(0.05)
        for job in jobs:
            job.cancel()
        for _ in range(600):  # Gradio has let go of every one (waiting ones dropped, running ones cancelled)
            if not demo._queue.event_ids_to_events:
                break
            threading.Event().wait(0.05)
        assert not demo._queue.event_ids_to_events
    finally:
        runner.lock.release()
    assert client.predict(IOI_CLEAN, 5, api_name="/predict")["top_tokens"]
    assert runner.computed == before + 1  # only the request someone still waited for ran on the model


def test_path_patching_with_nothing_shown_says_what_to_do(demo_model):
    """The tab's path event traces what the page says is shown; a crafted or early request gets a sentence."""
    h = Handlers(Runner(demo_model, cache_dir=None), None)
    for shown in (None, {"x": 1}, ["only", "three", "values"], "text"):
        with pytest.raises(ValueError, match=r"Run patching \(or task patching\) first"):
            h.paths("task", shown, ["L1H2"])
