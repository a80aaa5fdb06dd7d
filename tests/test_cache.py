"""The on-disk example cache: data only (a planted file runs no code), anything unreadable is a miss
(start-up never stops on it), results read back exactly, and partial files do not pile up."""

from __future__ import annotations

import os
import pickle
import random
import time

import numpy as np
import pytest

from core import logit_lens, predict
from core.registry import techniques
from core.results import dumps, loads, result_types
from serving.runner import Runner
from tests.conftest import IOI_CLEAN

CALLS = [(t.run, t.arguments()) for t in techniques().values()] + [(logit_lens, (IOI_CLEAN,))]  # every technique, and a lens without a target


def same(a, b) -> bool:
    """Field by field: arrays equal in value, dtype and shape; everything else equal."""
    if type(a) is not type(b):
        return False
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            if not (isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)):
                return False
        elif x != y:
            return False
    return True


@pytest.fixture(scope="module")
def results(tiny_model):
    return [fn(tiny_model, *args) for fn, args in CALLS]


def test_every_result_type_reads_back_exactly(results):
    assert {type(r).__name__ for r in results} == set(result_types())
    for result in results:
        assert same(loads(dumps(result)), result), type(result).__name__
    together = tuple(results[:4])  # the Prompt Explorer's one pass is stored as a tuple of results
    back = loads(dumps(together))
    assert isinstance(back, tuple) and len(back) == 4 and all(same(a, b) for a, b in zip(back, together))
    for bad in (b'{"type": "tuple", "items": []}', b'{"type": "tuple", "items": [{"type": "tuple", "items": []}]}', b'{"type": "tuple"}'):
        with pytest.raises(ValueError):
            loads(bad)


class Planted:
    """A pickle that, when loaded, writes a marker file: what an attacker would plant."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_runs_nothing_and_the_result_is_recomputed(tiny_model, tmp_path):
    cache = tmp_path / "cache"
    runner = Runner(tiny_model, cache_dir=cache)
    fresh = runner.run(predict, IOI_CLEAN, 3, persist=True)
    (stored,) = cache.glob("*.json")
    marker = tmp_path / "pwned"
    for path in (stored, stored.with_suffix(".pkl")):  # under the key's name, and under the old pickle name
        path.write_bytes(pickle.dumps(Planted(str(marker))))
    again = Runner(tiny_model, cache_dir=cache).run(predict, IOI_CLEAN, 3, persist=True)
    assert not marker.exists()
    assert same(again, fresh)


def test_garbage_flipped_and_truncated_files_are_misses(tiny_model, results, tmp_path):
    """Random bytes, every kind of damage to a real file, other JSON: each is a miss, never an exception."""
    rng = random.Random(0)
    good = [dumps(r) for r in results]
    damaged = [os.urandom(n) for n in (0, 1, 7, 1000)]
    damaged += [b"[" * 100_000, b'{"type": "Predictions", "fields": 1}', b'{"type": "os.system", "fields": {}}', b"null", b"1e999999"]
    for data in good:
        damaged += [data[: rng.randrange(len(data))] for _ in range(30)]  # truncated
        for _ in range(30):  # one byte changed
            i = rng.randrange(len(data))
            damaged.append(data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :])
    refused = 0
    for data in damaged:
        try:
            loaded = loads(data)
        except ValueError:
            refused += 1
            continue
        assert type(loaded).__name__ in result_types()  # a flip inside a number can still be a valid result
    assert refused > len(damaged) // 2

    cache = tmp_path / "cache"
    runner = Runner(tiny_model, cache_dir=cache)
    fresh = runner.run(predict, IOI_CLEAN, 3, persist=True)
    (stored,) = cache.glob("*.json")
    for data in damaged[:200]:
        stored.write_bytes(data)
        Runner(tiny_model, cache_dir=cache).run(predict, IOI_CLEAN, 3, persist=True)  # never raises
    stored.write_bytes(os.urandom(64))
    assert same(Runner(tiny_model, cache_dir=cache).run(predict, IOI_CLEAN, 3, persist=True), fresh)


def test_stale_partial_files_are_removed_and_a_full_disk_leaves_none(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale, recent = cache / "a.123.tmp", cache / "b.456.tmp"
    for path in (stale, recent):
        path.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    runner = Runner(tiny_model, cache_dir=cache)
    assert not stale.exists() and recent.exists()  # another process may still be writing a recent one

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_bytes", disk_full)
    result = runner.run(predict, IOI_CLEAN, 2, persist=True)  # computed and served; only not stored
    assert result.top_tokens and sorted(p.name for p in cache.iterdir()) == ["b.456.tmp"]


def test_the_model_fingerprint_covers_every_weight(tmp_path):
    """Cached results are keyed by the weights: one number changed in any tensor, whichever of the two
    hashing threads takes it, is a new key; the number put back, the old key again. (The same weights
    loaded from another place are the same key: test_model's Hub-cache test.)"""
    import torch

    from core import load_model, save_random_gpt2
    from serving.runner import model_fingerprint

    directory = save_random_gpt2(tmp_path / "m", n_layers=1, n_heads=2, d_model=16, n_ctx=16, seed=5)
    model = load_model(directory)
    before = model_fingerprint(model)
    keys = set()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and tensor.numel():
                last = tuple(size - 1 for size in tensor.shape)
                old = tensor[last].item()
                tensor[last] = old + 1.0
                keys.add((name, model_fingerprint(model)))
                tensor[last] = old
    assert model_fingerprint(model) == before
    assert len({key for _, key in keys}) == len(keys) and before not in {key for _, key in keys}, sorted(keys)


def test_the_code_fingerprint_covers_every_source_file_under_core(tmp_path, monkeypatch):
    """Cached results are keyed by core's source: an edit anywhere under core/ (core/patching/ too) is a new key."""
    import shutil

    from serving import runner

    copy = tmp_path / "core"
    shutil.copytree(runner.CORE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runner, "CORE_DIR", copy)
    before = runner.code_fingerprint.__wrapped__()
    engine = copy / "patching" / "fast.py"
    engine.write_text(engine.read_text() + "\n# edited\n")
    assert runner.code_fingerprint.__wrapped__() != before


def test_background_warming_yields_to_waiting_requests_and_stops_when_asked(demo_model, tmp_path):
    """The app's examples are computed after its page serves (ui.handlers.warm_in_background): never while
    a request waits for the model (the runner counts waiters), all of them in the end, and nothing more
    once the app is stopping."""
    import threading

    from ui.handlers import Handlers, example_rows, warm_in_background

    runner = Runner(demo_model, cache_dir=tmp_path / "cache")
    runner.lock.acquire()  # the model busy: a request arrives and waits
    user = threading.Thread(target=runner.run, args=(predict, IOI_CLEAN, 3))
    user.start()
    deadline = time.monotonic() + 30
    while runner.waiting != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.waiting == 1
    said: list[str] = []
    warming = warm_in_background(Handlers(runner, str(tmp_path)), said.append)
    time.sleep(0.5)
    assert said == [] and runner.computed == 0 and runner.waiting == 1  # the warming does not even queue behind the waiting request
    runner.lock.release()
    user.join(30)
    warming.join(300)
    n = sum(len(labels) for labels, _ in example_rows(demo_model).values())
    assert runner.waiting == 0 and len(said) == n + 1 and all(f"warming examples {i}/{n}: " in line for i, line in enumerate(said[:-1], 1))
    assert said[-1].startswith(f"examples ready: {n} ({n} computed, 0 from the cache)")

    quiet: list[str] = []
    warm_in_background(Handlers(runner, str(tmp_path)), quiet.append, stopping=lambda: True).join(30)
    assert quiet == []  # stopping: nothing computed or said


def test_warming_from_the_cache_still_prepares_the_fast_engine(tiny_model, tmp_path, monkeypatch):
    """A restart finds every example on disk and computes nothing; the warming still builds and checks the
    model's fast engine, so a user's first new prompt does not wait for it."""
    from core.patching import exact
    from ui.handlers import Handlers, warm_examples

    warm_examples(Handlers(Runner(tiny_model, cache_dir=tmp_path / "cache"), str(tmp_path)))  # the first start: examples to disk
    monkeypatch.delitem(exact._ENGINES, tiny_model, raising=False)  # a new process: no engine yet
    restarted = Runner(tiny_model, cache_dir=tmp_path / "cache")
    said: list[str] = []
    warm_examples(Handlers(restarted, str(tmp_path)), said.append)
    assert restarted.computed == 0 and "(0 computed, " in said[-1]
    assert exact._ENGINES[tiny_model] is not None and exact._ENGINES[tiny_model].verified
