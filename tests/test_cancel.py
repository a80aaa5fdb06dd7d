"""Cancelled work stops: Gradio frees a cancelled event's slot but lets its thread run on, holding the
model. The runner asks `still_wanted()` at every step boundary (waiting for the model, between
calls, at each progress step of a technique) and stops work nobody waits for."""

from __future__ import annotations

import threading

import gradio as gr
import pytest
from gradio_client import Client

import serving
from core import activation_patching, attribution_patching, induction_scores, predict
from serving.runner import Abandoned, Runner
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED, free_port

WAIT_S = 60  # generous bounds for liveness only (these tests assert what happened, never how fast)


def test_unwanted_work_never_starts(demo_model):
    runner = Runner(demo_model, cache_dir=None, still_wanted=lambda: False)
    with pytest.raises(Abandoned):
        runner.run(predict, IOI_CLEAN, 3)
    assert runner.computed == 0 and runner.lock.acquire(blocking=False)  # and the model is free


def test_a_waiter_nobody_wants_leaves_the_line(demo_model):
    wanted = threading.Event()
    wanted.set()
    runner = Runner(demo_model, cache_dir=None, still_wanted=wanted.is_set)
    outcome = []

    def wait_for_the_model():
        try:
            runner.run(predict, IOI_CLEAN, 3)
            outcome.append("computed")
        except Abandoned:
            outcome.append("abandoned")

    runner.lock.acquire()  # another request holds the model
    waiter = threading.Thread(target=wait_for_the_model)
    waiter.start()
    wanted.clear()  # its client cancels
    waiter.join(WAIT_S)
    runner.lock.release()
    assert outcome == ["abandoned"] and runner.computed == 0


def test_exact_patching_stops_at_its_next_step_when_abandoned(demo_model):
    """Patching has many steps; the runner checks between them (through the technique's progress hook)."""
    steps = []

    def wanted():
        steps.append(1)
        return len(steps) <= 1  # wanted when it takes the model, cancelled before its first patching step

    runner = Runner(demo_model, cache_dir=None, still_wanted=wanted)
    with pytest.raises(Abandoned):
        runner.run(activation_patching, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John")
    assert runner.computed == 0 and runner.lock.acquire(blocking=False)
    runner.lock.release()
    runner.still_wanted = lambda: True  # the same call, wanted: the full result (the stop left nothing half-cached)
    reported = []
    result = runner.run(activation_patching, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John", progress=lambda f, d: reported.append(f))
    assert result.head_out.shape == (5, 4) and len(reported) >= 2  # the caller's progress still hears every step


@pytest.mark.parametrize(
    "technique, args",
    [(induction_scores, (20, 32, 0)), (attribution_patching, (IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"))],
    ids=["induction", "attribution_patching"],
)
def test_single_pass_techniques_stop_inside_their_pass(demo_model, technique, args):
    """Induction (one forward pass, checked at each layer) and attribution patching (checked between its
    runs) stop too, and the same call, wanted, still gives the full result."""
    calls = []

    def wanted():
        calls.append(1)
        return len(calls) <= 2  # wanted when it takes the model and at its first step, then cancelled

    runner = Runner(demo_model, cache_dir=None, still_wanted=wanted)
    with pytest.raises(Abandoned):
        runner.run(technique, *args)
    assert runner.computed == 0 and runner.lock.acquire(blocking=False)
    runner.lock.release()
    runner.still_wanted = lambda: True
    assert runner.run(technique, *args).to_dict() == technique(demo_model, *args).to_dict()


def test_event_wanted_follows_a_real_gradio_cancel():
    """`serving.event_wanted` against Gradio itself: a running handler sees its event cancelled by the client."""
    started, seen = threading.Event(), []

    def slow(x: str) -> str:
        started.set()
        stop = threading.Event()
        while serving.event_wanted() and not stop.wait(0.05):
            pass
        seen.append(serving.event_wanted())
        return x

    with gr.Blocks() as demo:
        gr.api(slow, api_name="slow")
    demo.queue(api_open=False)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        assert serving.event_wanted()  # outside any event (start-up, tests): wanted
        job = Client(f"http://127.0.0.1:{port}/", verbose=False).submit("x", api_name="/slow")
        assert started.wait(WAIT_S)
        for _ in range(WAIT_S * 20):  # the client knows its event is running (and so how to cancel it)
            if job.status().code.name == "PROCESSING":
                break
            threading.Event().wait(0.05)
        job.cancel()
        for _ in range(WAIT_S * 20):
            if seen:
                break
            threading.Event().wait(0.05)
        assert seen == [False]  # the handler learnt its event was cancelled, and stopped
    finally:
        demo.close()
