"""Run techniques on one shared model safely and cheaply.

- One at a time: TransformerLens hooks live on the model object, so two calls running hooks
  at once could corrupt each other's results. Every call holds the runner's lock; a call that
  cannot get it within DEFAULTS.max_wait_s is turned away with "busy, try again" (ServerBusy,
  a ValueError, so the app shows it as a message).
- Memoised: results are immutable, so a repeated call (an example clicked again, a layer
  slider moved back) is answered from a bounded in-memory LRU.
- Persisted where asked (the app's examples): on disk, keyed by a fingerprint of the model's
  weights, of the code in `core/` and of the call, so a restart reuses them and a change to the
  model or the code can never serve stale numbers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pickle
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from core.config import DEFAULTS
from core.model import Model

CORE_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = Path(os.environ.get("CIRCUITBREAKER_CACHE_DIR", Path.home() / ".cache" / "circuitbreaker"))
UNCACHED_KWARGS = ("progress",)  # arguments that do not change the result


def model_fingerprint(model: Model) -> str:
    """Hash of the model's configuration and every weight (about a second for GPT-2 Small). Where the
    weights were loaded from (the name, a path, the device) is left out: the same weights and code hit
    the same cached results whether GPT-2 came from the Hub, its cache or a local directory."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(sorted((k, repr(v)) for k, v in vars(model.cfg).items() if k not in ("device", "model_name"))).encode())
    with torch.no_grad():
        for name, param in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the source that computes results, and of the libraries it relies on."""
    from importlib.metadata import version

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"torch {torch.__version__} transformer-lens {version('transformer-lens')}".encode())
    for path in sorted(CORE_DIR.glob("*.py")):
        digest.update(path.name.encode())
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


class ServerBusy(ValueError):
    """The model stayed busy with other requests for too long."""


class Runner:
    """A model plus a lock, an LRU of results and an on-disk store for persistent ones."""

    def __init__(self, model: Model, cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, max_entries: int = 64):
        self.model = model
        self.lock = threading.RLock()
        self.max_entries = max_entries
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self._prefix = f"{model_fingerprint(model)}-{code_fingerprint()}"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.computed = 0  # calls that really ran the model (not answered from memory or disk)

    def _key(self, fn: Callable, args: tuple, kwargs: dict) -> str:
        call = (fn.__module__, fn.__qualname__, args, sorted((k, v) for k, v in kwargs.items() if k not in UNCACHED_KWARGS))
        return hashlib.blake2b(f"{self._prefix}|{call!r}".encode(), digest_size=20).hexdigest()

    def run(self, fn: Callable, *args, persist: bool = False, **kwargs):
        """fn(model, *args, **kwargs), from the cache when this exact call was made before."""
        key = self._key(fn, args, kwargs)
        if not self.lock.acquire(timeout=DEFAULTS.max_wait_s):
            raise ServerBusy(
                f"The server is busy: other requests kept the model occupied for {DEFAULTS.max_wait_s:.0f} s. "
                "Try again in a minute."
            )
        try:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
            result = self._load(key) if persist else None
            if result is None:
                release_freed_memory()
                result = fn(self.model, *args, **kwargs)
                self.computed += 1
                if persist:
                    self._store(key, result)
            self._memory[key] = result
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)
            return result
        finally:
            self.lock.release()

    def check(self, fn: Callable, *args, wait_s: float = DEFAULTS.validation_wait_s):
        """fn(model, *args) for a quick check (input validation: tokenizing, no forward pass), under
        the lock (the tokenizer is shared), uncached; None if the model stays busy for `wait_s`."""
        if not self.lock.acquire(timeout=wait_s):
            return None
        try:
            return fn(self.model, *args)
        finally:
            self.lock.release()

    def _path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.pkl"

    def _load(self, key: str):
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            return pickle.loads(path.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            return None  # unreadable or from an older layout: recompute

    def _store(self, key: str, result) -> None:
        path = self._path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_bytes(pickle.dumps(result))
            partial.replace(path)
        except OSError:
            pass  # a read-only disk only costs recomputation after a restart
