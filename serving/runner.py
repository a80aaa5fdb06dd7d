"""Run techniques on one shared model safely and cheaply.

- One at a time: TransformerLens hooks live on the model object, so two calls running hooks
  at once could corrupt each other's results. Every call holds the runner's lock; a call that
  cannot get it within `limits.max_wait_s` is turned away with "busy, try again" (ServerBusy,
  a ValueError, so the app shows it as a message).
- Batched: calls of one-pass techniques (`core.model.one_pass`: predictions, the logit lens, DLA,
  attention, the Explorer) wait together; whichever of them gets the lock answers every waiting one
  from shared forward passes (`core.model.read_prompts`). Each call still gets its own result or its
  own error. A long technique holding the lock answers them at its step boundaries (where it reports
  progress, and the model's pass is its own plain one: no hook, no per-head fork), so they wait for
  one of its steps, not for all of it; the two take turns.
- Input checks (the validators: tokenizing only) never wait for the model: they tokenize with a copy
  of its tokenizer, one check at a time (`check`).
- Memoised: results are immutable, so a repeated call (an example clicked again, a layer
  slider moved back) is answered from a bounded in-memory LRU.
- Persisted where asked (the app's examples): on disk, keyed by a fingerprint of the model's
  weights, of the code in `core/` and of the call, so a restart reuses them and a change to the
  model or the code can never serve stale numbers. Stored as JSON checked against the result's
  schema on load (`core.results.dumps/loads`), never as pickles: a file planted under a key's name
  can only be refused, never run; anything unreadable is a cache miss.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import ctypes
import functools
import hashlib
import inspect
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from core.config import LIMITS, Limits
from core.model import NO_HOOKS, Model, plain
from core.patching.exact import prompt_engine
from core.results import dumps, loads, storable

CORE_DIR = Path(__file__).resolve().parent.parent / "core"  # the source that computes results
DEFAULT_CACHE_DIR = Path(os.environ.get("CIRCUITBREAKER_CACHE_DIR", Path.home() / ".cache" / "circuitbreaker"))
UNCACHED_KWARGS = ("progress",)  # arguments that do not change the result


def model_fingerprint(model: Model) -> str:
    """Hash of the model's configuration and every weight (GPT-2 Small: 0.2 s, its 650 MB hashed with
    SHA-256 in two shares, one thread each, which hashlib runs outside the GIL; the shares are fixed, as
    the key depends on them). Where the weights were loaded from (the name, a path, the device) is
    left out: the same weights and code hit the same cached results whether GPT-2 came from the Hub,
    its cache or a local directory."""
    config = repr(sorted((k, repr(v)) for k, v in vars(model.cfg).items() if k not in ("device", "model_name")))
    shares, loads = [[], []], [0, 0]  # the weights dealt out largest first, each to the lightest share
    for name, param in sorted(model.state_dict().items(), key=lambda item: (-item[1].numel(), item[0])):
        lightest = loads.index(min(loads))
        shares[lightest].append((name, param))
        loads[lightest] += param.numel()

    def digest(share: list) -> bytes:
        hashed = hashlib.sha256()
        with torch.no_grad():
            for name, param in share:
                hashed.update(name.encode())
                hashed.update(param.detach().to("cpu", torch.float32).contiguous().numpy())  # the buffer itself: no copy
        return hashed.digest()

    with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:
        parts = list(pool.map(digest, shares))
    return hashlib.blake2b(config.encode() + b"".join(parts), digest_size=16).hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the source that computes results, and of the libraries it relies on."""
    from importlib.metadata import version

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"torch {torch.__version__} transformer-lens {version('transformer-lens')}".encode())
    for path in sorted(CORE_DIR.rglob("*.py")):  # core/patching/ too
        digest.update(path.relative_to(CORE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


_LIBC = _libc()


def release_freed_memory() -> None:
    """Give memory that finished requests freed back to the OS. glibc keeps freed blocks in
    per-thread arenas, so a server answering from many threads creeps up in resident memory
    without this; with it the soak benchmark's memory stays flat."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def write_whole(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name beside it, so a reader sees the whole file or
    none. When the disk refuses, the partial file is removed and the OSError raised."""
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


class ServerBusy(ValueError):
    """The model stayed busy with other requests for too long."""


class NotCached(LookupError):
    """Inside `Runner.cached_only()`: the call's result is in neither cache, and nothing was computed."""


class ModelChanged(RuntimeError):
    """A runner's loader gave a model with other weights than the fingerprint it was promised."""


class Abandoned(ValueError):
    """Nobody waits for this work any more (the request was cancelled or its client left): it stopped."""


def _always() -> bool:
    return True


class _Call:
    """A one-pass call waiting for a batched pass: its job, and then its result or error."""

    def __init__(self, job: Callable, key: str, persist: bool):
        self.job, self.key, self.persist = job, key, persist
        self.taken = False  # a pass that answers it has started (it can no longer leave the batch)
        self.done = threading.Event()
        self.outcome: Any = None  # the result, or the exception to raise in the caller's thread

    def answer(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Tokenizing:
    """The model as input checks see it: its tokenizer a copy of the model's (a fast tokenizer is not to be
    called from two threads at once: a call sets its padding and truncation), every other attribute the
    model's, and its methods (`to_tokens`, `to_str_tokens`, ...) the model's own, reading that copy."""

    def __init__(self, model: Model):
        self._model = model
        self.tokenizer = copy.deepcopy(model.tokenizer)

    def __getattr__(self, name: str):
        method = getattr(type(self._model), name, None)
        return method.__get__(self) if inspect.isfunction(method) else getattr(self._model, name)


class Runner:
    """A model plus a lock, an LRU of results and an on-disk store for persistent ones."""

    def __init__(
        self,
        model: Model | None = None,
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        max_entries: int = 64,
        still_wanted: Callable[[], bool] = _always,
        limits: Limits = LIMITS,
        *,
        loader: Callable[[], Model] | None = None,
        fingerprint: str | None = None,
    ):
        """`still_wanted()` says whether the request the current thread works for still has someone
        waiting (the app asks Gradio); work nobody wants stops at the next step boundary.
        `loader` instead of `model` (the page first, `serving.restart`): the model is loaded by the first
        caller that needs it (`runner.model`); with the `fingerprint` of its weights (a restart), results the
        caches hold are served before, and the model must have it; without (a first start), the caches are
        read once the model has loaded, keyed by its weights' fingerprint then."""
        if (model is None) == (loader is None) or (model is not None and fingerprint is not None):
            raise TypeError("Runner needs a model, or a loader (and the fingerprint of the model it loads, where known)")
        self._model, self._loader = model, loader
        self._loading = threading.Lock()
        self._load_error: Exception | None = None
        self.still_wanted = still_wanted
        self.limits = limits  # waits: max_wait_s, lock_poll_s, batch_poll_s
        self.lock = threading.RLock()
        self.max_entries = max_entries
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self.fingerprint = model_fingerprint(model) if model is not None else fingerprint  # None: learnt when the model loads
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._remove_stale_partials()
        if model is not None:
            release_freed_memory()  # what loading the model freed (TransformerLens's weight processing: hundreds of MB)
        self.computed = 0  # calls that really ran the model (not answered from memory or disk)
        self.waiting = 0  # calls waiting for the lock now (background work yields to them)
        self._counting = threading.Lock()  # guards the counters and the batch
        self._batch: list[_Call] = []  # one-pass calls waiting for the next batched pass
        self.passes = 0  # batched runs of one-pass calls (each one or more forward passes)
        self._cached_only = threading.local()  # per thread: inside cached_only(), run() computes nothing
        self._checks = threading.Lock()  # one input check at a time, on the model's tokenizing copy
        # copied before any pass can use the tokenizer (copying reads it: not while a pass calls it); 0.12 s for GPT-2's
        self._tokenizing = _Tokenizing(model) if model is not None else None

    @property
    def model(self) -> Model:
        """The model; given a loader, the first caller loads it (the others wait) and checks its fingerprint
        (ModelChanged: not the model the caches' results were computed with; nothing is answered from it)."""
        if self._model is None:
            with self._loading:
                if self._load_error is not None:  # loaded once, failed: every later caller hears the same
                    raise self._load_error
                if self._model is None:
                    try:
                        model = self._loader()
                        found = model_fingerprint(model)
                        if self.fingerprint is None:  # a first start's page first: the caches are keyed by it from now on
                            self.fingerprint = found
                        elif found != self.fingerprint:
                            raise ModelChanged(
                                f"The model's weights are not the ones the last start recorded (fingerprint {found}, expected "
                                f"{self.fingerprint}), though their files kept their size and time: start the app again."
                            )
                    except Exception as err:
                        self._load_error = err
                        raise
                    self._tokenizing = _Tokenizing(model)  # first: `loaded` is what check() asks
                    self._model = model
                    release_freed_memory()
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _key(self, fn: Callable, args: tuple, kwargs: dict) -> str:
        """The cache's key of a call: the model's weights (loading it first where their fingerprint is not known yet),
        the code, the call."""
        if self.fingerprint is None:
            self.model  # loads it, which sets the fingerprint
        call = (fn.__module__, fn.__qualname__, args, sorted((k, v) for k, v in kwargs.items() if k not in UNCACHED_KWARGS))
        return hashlib.blake2b(f"{self.fingerprint}-{code_fingerprint()}|{call!r}".encode(), digest_size=20).hexdigest()

    def prepare(self) -> None:
        """Under the lock, what a user's first new prompt would otherwise wait for: the model's fast engine,
        built and checked against the model (core.patching.exact.prompt_engine; about 0.5 s for GPT-2).
        After a restart every example comes from the cache, so nothing else builds it."""
        with self.lock:
            prompt_engine(self.model, NO_HOOKS)

    @contextlib.contextmanager
    def cached_only(self):
        """In this thread, meanwhile: run() answers from its caches or raises NotCached, computing nothing."""
        self._cached_only.on = True
        try:
            yield
        finally:
            self._cached_only.on = False

    def run(self, fn: Callable, *args, persist: bool = False, **kwargs):
        """fn(model, *args, **kwargs), from the cache when this exact call was made before."""
        if getattr(self._cached_only, "on", False) and self.fingerprint is None:
            raise NotCached(fn.__qualname__)  # the model not loaded yet, its weights unknown: nothing to look up by
        key = self._key(fn, args, kwargs)
        if getattr(self._cached_only, "on", False):
            with self.lock:
                result = self._recall(key, persist)
            if result is None:
                raise NotCached(key)
            return result
        if hasattr(fn, "job"):  # a one-pass technique: answered in a batch with the other waiting ones
            return self._run_batched(_Call(lambda: fn.job(self.model, *args, **kwargs), key, persist))  # the model read when the pass runs
        if "progress" in inspect.signature(fn).parameters:  # its step boundaries: stop there when abandoned
            kwargs["progress"] = self._checking(kwargs.get("progress"))
        with self._counting:
            self.waiting += 1
        try:
            self._acquire()
        finally:
            with self._counting:
                self.waiting -= 1
        try:
            result = self._recall(key, persist)
            if result is None:
                release_freed_memory()
                result = fn(self.model, *args, **kwargs)
                self.computed += 1
                self._remember(key, result, persist)
            return result
        finally:
            self.lock.release()

    def _recall(self, key: str, persist: bool):
        """The result stored for `key` (memory, then disk where persisted), or None. Under the lock."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        result = self._load(key) if persist else None
        if result is not None:
            self._remember(key, result, persist=False)
        return result

    def _remember(self, key: str, result, persist: bool) -> None:
        if persist:
            self._store(key, result)
        self._memory[key] = result
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    def _run_batched(self, call: _Call):
        """Wait with the other one-pass calls; the first to get the lock answers every call waiting then
        (at most `limits.max_batch_calls`, its own first). A call answered by another's pass returns
        without taking the lock. Leaving (cancelled, or busy past `limits.max_wait_s`) is possible
        until a pass takes the call."""
        with self._counting:
            self._batch.append(call)
            self.waiting += 1
        try:
            deadline = time.monotonic() + self.limits.max_wait_s
            while not call.done.is_set():
                if self.lock.acquire(timeout=self.limits.batch_poll_s):
                    try:
                        if not call.done.is_set():
                            self._answer_batch(call)
                    finally:
                        self.lock.release()
                    break
                if call.taken:
                    break  # another call's pass is answering it
                wanted = self.still_wanted()
                if not wanted or time.monotonic() > deadline:
                    self._busy() if wanted else self._abandon()
        finally:
            with self._counting:
                self.waiting -= 1
                if not call.taken:  # it leaves (cancelled, busy, or any error while waiting) before a pass took it
                    self._batch.remove(call)
                    call.taken = True
        call.done.wait()
        return call.answer()

    def _answer_batch(self, own: _Call | None) -> None:
        """Under the lock: answer `own` (None: no call of this thread's) and the calls waiting with it,
        from the cache or in shared passes."""
        from core.model import read_prompts

        calls = [] if own is None else [own]
        try:
            with self._counting:
                calls += [c for c in self._batch if c is not own][: self.limits.max_batch_calls - len(calls)]
                for c in calls:
                    self._batch.remove(c)
                    c.taken = True
            if own is not None and not self.still_wanted():
                own.outcome = self._abandoned()
            fresh: dict[str, list[_Call]] = {}  # the same call from several users is computed once
            for c in calls:
                if c.outcome is None:
                    c.outcome = self._recall(c.key, c.persist)
                if c.outcome is None:
                    fresh.setdefault(c.key, []).append(c)
            if fresh:
                release_freed_memory()
                for (key, same), outcome in zip(fresh.items(), read_prompts(self.model, [same[0].job for same in fresh.values()])):
                    for c in same:
                        c.outcome = outcome
                    if not isinstance(outcome, Exception):
                        self.computed += 1
                        self._remember(key, outcome, any(c.persist for c in same))
                self.passes += 1
        except BaseException as err:  # noqa: BLE001  (every caller in the batch hears of it)
            for c in calls:
                if c.outcome is None:
                    c.outcome = err
            raise
        finally:
            for c in calls:
                c.done.set()

    @staticmethod
    def _abandoned() -> Abandoned:
        return Abandoned("This request was cancelled (or its page closed), so its computation stopped.")

    def _abandon(self):
        raise self._abandoned()

    def _busy(self):
        raise ServerBusy(
            f"The server is busy: other requests kept the model occupied for {self.limits.max_wait_s:.0f} s. Try again in a minute."
        )

    def _acquire(self) -> None:
        """Take the lock, waiting at most `limits.max_wait_s`; a waiter nobody wants any more leaves at
        once (within `limits.lock_poll_s`) instead of queueing work on the model."""
        deadline = time.monotonic() + self.limits.max_wait_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._busy()
            if self.lock.acquire(timeout=min(self.limits.lock_poll_s, remaining)):
                if self.still_wanted():
                    return
                self.lock.release()
                self._abandon()
            if not self.still_wanted():
                self._abandon()

    def _serve_waiting(self) -> bool:
        """At a step boundary of the technique holding the lock (this thread's): answer the one-pass calls
        waiting for the model, so that light requests wait for one step of a long run, not for all of it.
        Only while a pass would be the model's own plain pass (`core.model.plain`: a step inside the
        model's hooks, or with a per-head fork switched on, answers none). An error of the batch's own
        reaches its callers, not the running technique. Returns whether it answered any."""
        if not self._batch or not plain(self.model):
            return False
        with contextlib.suppress(Exception), torch.no_grad():
            self._answer_batch(None)
        return True

    def _checking(self, report):
        """A progress callback for a technique's step boundaries: stops abandoned work there, answers the
        light calls waiting (`_serve_waiting`), then reports. The run and the light calls take turns:
        after a batch of them that took t seconds, the run computes for at least t before it answers
        the next, so that a stream of light requests still leaves it at least half of the model's time."""
        turn = {"next": 0.0}  # time.monotonic() from which this run answers waiting calls again

        def progress(fraction: float, desc: str) -> None:
            if not self.still_wanted():
                self._abandon()
            start = time.monotonic()
            if start >= turn["next"] and self._serve_waiting():
                end = time.monotonic()
                turn["next"] = end + (end - start)
            if report is not None:
                report(fraction, desc)

        progress.shown = report is not None  # only checking: the technique keeps its usual step size (same numbers)
        return progress

    def check(self, fn: Callable, *args):
        """fn(model, *args) for a quick check (input validation: tokenizing, no forward pass), uncached, at
        once even while the model is busy: `fn` gets the model with a copy of its tokenizer. None while
        the model is still loading (the run checks its input itself)."""
        if not self.loaded:
            return None
        with self._checks:
            return fn(self._tokenizing, *args)

    def _path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.json"

    def _load(self, key: str):
        path = self._path(key)
        if path is None:
            return None
        try:
            return loads(path.read_bytes())
        except (OSError, ValueError):
            return None  # missing, unreadable, or not a result we wrote: recompute

    def _store(self, key: str, result) -> None:
        path = self._path(key)
        if path is None or not storable(result):
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_whole(path, dumps(result))
        except OSError:  # a full or read-only disk only costs recomputation after a restart
            pass

    def _remove_stale_partials(self, older_than_s: float = 3600.0) -> None:
        """Partial files a crash or a full disk left behind (another process's recent ones are kept)."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return
        for partial in self.cache_dir.glob("*.tmp"):
            try:
                if time.time() - partial.stat().st_mtime > older_than_s:
                    partial.unlink()
            except OSError:
                pass
