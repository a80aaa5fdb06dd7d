"""Many users' light requests share forward passes: one-pass techniques (core.model.one_pass) waiting
for the model together are answered from one batched pass (core.model.read_prompts, through the
Runner), each with its own result or its own error, equal to its call alone up to float32 rounding."""

from __future__ import annotations

import functools
import random
import threading
import time
import types

import numpy as np
import pytest
import torch
from gradio_client import Client

import app
import core.model
import serving.runner
from benchmarks.bench_load import rank_slack
from core import attention_patterns, direct_logit_attribution, induction_scores, logit_lens, predict
from core.explorer import explore
from core.model import NO_HOOKS, prompt_pass, read_prompts, to_tokens
from core.patching.exact import prompt_engine
from core.registry import techniques
from demo_model import corpus
from serving.runner import Abandoned, Runner
from tests.conftest import IOI_CLEAN, free_port

WAIT_S = 60  # liveness bound only


def calls(prompts: list[str]) -> list[tuple]:
    """Each one-pass technique on each prompt, then inputs that fail (each must fail alone)."""
    out = []
    for i, prompt in enumerate(prompts):
        out += [
            (predict, prompt, 1 + i),
            (logit_lens, prompt, " Paris" if i % 2 else None),
            (direct_logit_attribution, prompt, " Mary", " John" if i % 2 else None),
            (attention_patterns, prompt, i % 2),
            (explore, prompt, None, " John", 1),
        ]
    return out + [(predict, "", 3), (logit_lens, IOI_CLEAN, "not one token"), (attention_patterns, IOI_CLEAN, 99)]


def assert_same(batched, alone) -> None:
    """Equal structure and text; numbers to float32 rounding; a rank among the vocabulary may move by
    the logits that tie the target's to rounding (the padded pass adds in another order; rank_slack)."""
    if isinstance(alone, Exception):
        assert type(batched) is type(alone) and str(batched) == str(alone)
    elif isinstance(alone, tuple):
        for b, a in zip(batched, alone, strict=True):
            assert_same(b, a)
    else:
        compare(batched.to_dict(), alone.to_dict(), "")


def compare(b, a, key: str) -> None:
    if isinstance(a, dict):
        assert b.keys() == a.keys()
        for k in a:
            compare(b[k], a[k], k)
    elif isinstance(a, (int, float, list)) and np.size(a) and isinstance(np.ravel(a)[0].item(), (int, float)) and not isinstance(np.ravel(a)[0], bool):
        b, a = np.asarray(b, dtype=float), np.asarray(a, dtype=float)
        if key.endswith("ranks"):
            assert all(abs(x - y) <= rank_slack(int(y)) for x, y in zip(b.ravel(), a.ravel())), key
        else:
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=key)
    else:
        assert b == a, key


def wait_until_waiting(runner: Runner, count: int) -> None:
    """Until `count` calls wait for the model (its lock is held by the test), then check it."""
    for _ in range(int(WAIT_S / 0.01)):
        if runner.waiting == count:
            break
        threading.Event().wait(0.01)
    assert runner.waiting == count


def outcome(fn, model, *args):
    try:
        return fn(model, *args)
    except ValueError as err:
        return err


def test_every_one_pass_technique_declares_its_job():
    """The runner batches a call when its function has `.job` (core.model.one_pass)."""
    readers = [t for t in techniques().values() if t.reads_prompt is not None]
    assert readers and all(callable(getattr(t.run, "job", None)) for t in readers) and callable(explore.job)


def test_a_batched_pass_answers_every_call_as_its_own_pass_would(gpt2_shaped, monkeypatch):
    """Calls of every one-pass technique on prompts of different lengths, in passes of at most 160
    padded tokens (several passes, each computing only the final positions' logits), plus bad inputs:
    each result equals the call alone."""
    rng = random.Random(0)
    prompts = [corpus.sample_fact(rng) for _ in range(4)] + [IOI_CLEAN, "Hello"]
    assert len({to_tokens(gpt2_shaped, p).shape[-1] for p in prompts}) >= 4
    todo = calls(prompts)
    passes = []

    def spy(model, tokens, names, positions):
        logits, cache = prompt_pass(model, tokens, names, positions)
        passes.append((tokens.shape, len(positions), logits.shape[1]))
        return logits, cache

    monkeypatch.setattr(core.model, "prompt_pass", spy)
    batched = read_prompts(gpt2_shaped, [functools.partial(fn.job, gpt2_shaped, *args) for fn, *args in todo], max_tokens=160)
    monkeypatch.undo()
    assert 1 < len(passes) < len(todo) - 3 and all(shape.numel() <= 160 and (kept == positions or shape[0] == 1) for shape, kept, positions in passes)
    alone = [outcome(fn, gpt2_shaped, *args) for fn, *args in todo]
    assert sum(isinstance(a, ValueError) for a in alone) == 3
    for b, a in zip(batched, alone, strict=True):
        assert_same(b, a)


def test_calls_waiting_for_the_model_share_one_pass_each_with_its_own_answer(demo_model):
    """While another request holds the model, calls pile up; the first to get the model answers all of
    them in one pass (one from the results cache, a repeated one computed once, one with its own error), and a caller that
    leaves while waiting is neither computed nor answered."""
    runner = Runner(demo_model, cache_dir=None, still_wanted=lambda: threading.current_thread().name != "leaves")
    cached = (predict, IOI_CLEAN, 2)
    runner.run(*cached)
    todo = [cached, (predict, IOI_CLEAN, 5), (logit_lens, IOI_CLEAN, " Mary"), (direct_logit_attribution, "When Mary and John", " Mary", None)]
    todo += [(explore, IOI_CLEAN, None, None, 0), (attention_patterns, "The Eiffel Tower is in", 1), (predict, IOI_CLEAN, 5)]
    todo += [(logit_lens, IOI_CLEAN, "not a token")]
    answers: dict[int, object] = {}

    def call(i, fn, *args):
        try:
            answers[i] = runner.run(fn, *args)
        except ValueError as err:  # Abandoned and input errors
            answers[i] = err

    threads = [threading.Thread(target=call, args=(i, *c)) for i, c in enumerate(todo)]
    threads.append(threading.Thread(target=call, args=(len(todo), predict, IOI_CLEAN, 7), name="leaves"))
    passes, computed = runner.passes, runner.computed
    runner.lock.acquire()  # another request holds the model
    try:
        for t in threads:
            t.start()
        for t in threads[-1:]:
            t.join(WAIT_S)  # the caller that left is gone before the model is free
        assert isinstance(answers[len(todo)], Abandoned)
        wait_until_waiting(runner, len(todo))
    finally:
        runner.lock.release()
    for t in threads:
        t.join(WAIT_S)
    assert runner.passes == passes + 1 and runner.computed == computed + len(todo) - 3  # not the cached call, the repeat, the error
    for i, (fn, *args) in enumerate(todo):
        assert_same(answers[i], outcome(fn, demo_model, *args))
    assert "not a token" in str(answers[len(todo) - 1])


LIGHT_CALLS = [(predict, IOI_CLEAN, 3), (logit_lens, IOI_CLEAN, " Mary"), (explore, "When Mary and John", None, None, 1)]


def arriving(runner: Runner, answers: dict) -> list[threading.Thread]:
    """LIGHT_CALLS sent by three users (their answers into `answers`); back once all wait for the model."""

    def call(i, fn, *args):
        answers[i] = runner.run(fn, *args)

    threads = [threading.Thread(target=call, args=(i, *c)) for i, c in enumerate(LIGHT_CALLS)]
    for t in threads:
        t.start()
    wait_until_waiting(runner, len(LIGHT_CALLS))
    return threads


def test_a_long_run_answers_the_light_calls_waiting_at_its_next_step(demo_model):
    """Light calls that arrive while a heavy technique holds the model (here induction, a step per layer of
    every pass) are answered at its next step boundary, in one shared pass, each as its call alone, and
    their users have their answers while it still runs; its result is the same as without them."""
    alone = induction_scores(demo_model, 20, 4, 0)
    runner = Runner(demo_model, cache_dir=None)
    answers, threads, steps = {}, [], []

    def report(fraction: float, description: str) -> None:  # runs after the runner's own step work
        steps.append(runner.passes)
        if not threads:  # the first step: the users arrive now
            threads.extend(arriving(runner, answers))
        elif len(steps) == 3:  # the run still holds the model: its users are answered all the same
            for t in threads:
                t.join(WAIT_S)
            assert not any(t.is_alive() for t in threads)

    passes = runner.passes
    heavy = runner.run(induction_scores, 20, 4, 0, progress=report)
    assert len(steps) > 3 and steps[:2] == [passes, passes + 1] and runner.passes == passes + 1  # one pass, at the second step
    for i, (fn, *args) in enumerate(LIGHT_CALLS):
        assert_same(answers[i], fn(demo_model, *args))
    np.testing.assert_array_equal(heavy.scores, alone.scores)
    np.testing.assert_array_equal(heavy.loss_by_position, alone.loss_by_position)


def _hooked(model):
    return model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: act * 0)])


def _split_qkv(model):
    from transformer_lens import patching as tl_patching

    return tl_patching._split_qkv_input(model)  # what path patching's hook fallback runs its steps inside


@pytest.mark.parametrize("altered", [_hooked, _split_qkv], ids=["hooks", "split q/k/v input"])
def test_a_step_where_the_models_pass_is_not_its_own_answers_no_light_call(demo_model, altered):
    """A step boundary reached while a hook is on the model, or a setting forks its pass per head,
    answers nothing (a pass then would not be the model's own); the next one, after it, does, and the
    answers are the model's own."""
    runner = Runner(demo_model, cache_dir=None)
    answers, threads, passes = {}, [], []

    def heavy(model, progress=None):
        with altered(model):
            threads.extend(arriving(runner, answers))
            progress(0.5, "inside")
            passes.append(runner.passes)
        progress(1.0, "after it")
        passes.append(runner.passes)
        return "done"

    before = runner.passes
    assert runner.run(heavy) == "done"
    for t in threads:
        t.join(WAIT_S)
    assert passes == [before, before + 1]
    for i, (fn, *args) in enumerate(LIGHT_CALLS):
        assert_same(answers[i], fn(demo_model, *args))


def test_a_long_run_and_the_light_calls_take_turns(demo_model, monkeypatch):
    """After answering light calls for t seconds, a long run computes for at least t before it answers
    again: a stream of light requests cannot take more than half of its time. (The runner's clock is
    the test's: each step says how long it took.)"""
    runner = Runner(demo_model, cache_dir=None)
    now, served = [1000.0], []
    monkeypatch.setattr(serving.runner, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=time.time))

    def serving_batch() -> bool:  # a batch of light calls that takes 0.2 s
        served.append(now[0])
        now[0] += 0.2
        return True

    monkeypatch.setattr(runner, "_serve_waiting", serving_batch)

    def heavy(model, progress=None):
        progress(0.25, "first step")  # answers: 0.2 s
        now[0] += 0.1
        progress(0.5, "0.1 s later")  # the run's turn: answers nothing
        now[0] += 0.15
        progress(0.75, "0.25 s after the batch")  # longer than it took: answers again
        return len(served)

    assert runner.run(heavy) == 2


def test_concurrent_users_of_the_app_share_passes_and_get_their_own_answers(demo_model):
    """Real Gradio lanes: light requests from several clients run together (the light lane admits a
    batch) and are answered from one pass, each equal to its call alone."""
    runner = Runner(demo_model, cache_dir=None)
    demo = app.build_demo(runner=runner, warm=False)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **app.launch_options())
    try:
        url = f"http://127.0.0.1:{port}/"
        requests = [("/predict", (IOI_CLEAN, k)) for k in (1, 2, 3)] + [("/logit_lens", (IOI_CLEAN, " Mary")), ("/attention", ("When Mary and John", 1))]
        clients = [Client(url, verbose=False) for _ in requests]
        passes = runner.passes
        runner.lock.acquire()  # the model is busy: every request waits for it, together
        try:
            jobs = [c.submit(*args, api_name=name) for c, (name, args) in zip(clients, requests)]
            wait_until_waiting(runner, len(requests))
        finally:
            runner.lock.release()
        answers = [job.result(timeout=WAIT_S) for job in jobs]
        assert runner.passes == passes + 1
        runs = {"/predict": predict, "/logit_lens": logit_lens, "/attention": attention_patterns}
        for (name, args), answer in zip(requests, answers):
            compare(answer, runs[name](demo_model, *args).to_dict(), name)
    finally:
        demo.close()


def test_one_call_alone_is_exactly_its_own_pass(demo_model):
    """A batch of one is the pass over that prompt alone (the fast engine's, once checked against the model),
    unembedding its final position only, bit for bit (the cache relies on it); the model's own pass, every
    position unembedded, gives the same final logits to float32 rounding."""
    (result,) = read_prompts(demo_model, [functools.partial(predict.job, demo_model, IOI_CLEAN, 5)])
    tokens = to_tokens(demo_model, IOI_CLEAN)
    engine = prompt_engine(demo_model, NO_HOOKS)
    assert engine is not None and engine.verified
    with torch.no_grad():
        final = engine.run_with_cache(tokens, NO_HOOKS, [tokens.shape[-1] - 1])[0][0, -1]
        whole = demo_model(tokens)[0, -1]
    assert np.array_equal(result.top_probs, torch.softmax(final.double(), -1).topk(5).values.numpy())
    torch.testing.assert_close(final, whole, rtol=1e-5, atol=1e-5)  # logits of up to ~10: a few ulps either way
