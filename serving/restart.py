"""A restart serves its page before the model loads, and so does a first start on files already here.

The page needs little of the model: its name and shape (layers, heads, context) and the fingerprint of
its weights, which keys the example cache the page's first examples come from. Each start that loads a
model records these beside the example cache, with the files it loaded from (path, size, modification
time) and the code that computed with it. A restart that finds the same files and code unchanged builds
its page from the record, serves it, and only then imports TransformerLens and loads the model, from
those files (about half of a GPT-2 restart). The loaded model must have the recorded fingerprint before
it answers anything (`Runner(loader=..., fingerprint=...)`).

A first start has no record, but where the model's files are already here (a local model directory, or a
download in the Hub cache) their config.json names the model's shape: `first_sketch` draws the page's
sketch from it, the page serves, and the model loads behind it (`Runner(loader=...)`, its fingerprint
learnt when it loads; app.main checks that the loaded model has the sketched shape). A first download
from the Hub is an ordinary start: the page waits for it, which can fall back to the demo model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from core.model import cached_source, loaded_from, model_key
from serving.runner import code_fingerprint, write_whole

RECORDS = "starts"  # the records' folder inside the example cache


@dataclass(frozen=True)
class Record:
    """What a start learnt of its model: where it loaded from, the weights' fingerprint, its configuration."""

    source: str  # the directory the weights were loaded from (a local model directory, a Hub cache snapshot)
    files: list  # [path, size, modification time in ns] of every file in it
    fingerprint: str  # serving.runner.model_fingerprint of the loaded model
    code: str  # serving.runner.code_fingerprint then: new code or libraries may process the weights differently
    cfg: dict  # the model's configuration: its plain values (names, sizes, flags)

    def sketch(self) -> SimpleNamespace:
        """A stand-in for the model where the page only reads `model.cfg` (the name, layers, heads, context)."""
        return SimpleNamespace(cfg=SimpleNamespace(**self.cfg))


def first_sketch(request: str) -> SimpleNamespace | None:
    """A stand-in for the model `request` names (as `Record.sketch`: its name, layers, heads and context) from
    the config.json of the files load_model would read, where they are already here; else None (a download, or a
    configuration that does not give the three numbers)."""
    found = cached_source(request)
    if found is None:
        return None
    name, source = found
    try:
        config = json.loads((Path(source) / "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    cfg = {"model_name": name}
    for field, keys in (("n_layers", ("n_layer", "num_hidden_layers")), ("n_heads", ("n_head", "num_attention_heads")),
                        ("n_ctx", ("n_positions", "n_ctx", "max_position_embeddings"))):
        value = next((config[key] for key in keys if isinstance(config, dict) and key in config), None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return None
        cfg[field] = value
    return SimpleNamespace(cfg=SimpleNamespace(**cfg))


def sketched(model, sketch: SimpleNamespace) -> bool:
    """Whether a loaded model is what `sketch` said: its name, layers, heads and context (a page built on the
    sketch shows these)."""
    return all(getattr(model.cfg, field) == value for field, value in vars(sketch.cfg).items())


def _path(cache_dir: str | os.PathLike, request: str, device: str) -> Path:
    key = hashlib.blake2b(f"{model_key(request)}|{device}".encode(), digest_size=16).hexdigest()
    return Path(cache_dir) / RECORDS / f"{key}.json"


def _files(directory: str) -> list[list]:
    """[real path, size, mtime in ns] of each file in `directory` (links followed: a Hub snapshot's files
    link to its blobs, so a new download shows as new paths)."""
    entries = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file():
            stat = entry.stat()
            entries.append([os.path.realpath(entry.path), stat.st_size, stat.st_mtime_ns])
    return entries


def remember(cache_dir, request: str, device: str, model, fingerprint: str) -> None:
    """Record the start of `model` (asked for as `request`), unless it says nothing new. Never raises on
    a full or read-only disk: the next start is then an ordinary one."""
    source = loaded_from(model)
    if cache_dir is None or source is None:
        return
    try:
        cfg = {k: v for k, v in vars(model.cfg).items() if isinstance(v, (bool, int, float, str))}
        data = json.dumps({
            "request": model_key(request), "source": source, "files": _files(source), "fingerprint": fingerprint,
            "code": code_fingerprint(), "cfg": cfg,
        })
        path = _path(cache_dir, request, device)
        if path.is_file() and path.read_text() == data:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, data.encode())
    except OSError:
        pass


def recall(cache_dir, request: str, device: str) -> Record | None:
    """The record of the last start of `request`, if its files are all still there, unchanged; else None."""
    if cache_dir is None:
        return None
    try:
        data = json.loads(_path(cache_dir, request, device).read_bytes())
        record = Record(source=data["source"], files=data["files"], fingerprint=data["fingerprint"], code=data["code"], cfg=dict(data["cfg"]))
        if data["request"] != model_key(request) or record.code != code_fingerprint() or not record.files or _files(record.source) != record.files:
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable, or not ours: an ordinary start
        return None


def forget(cache_dir, request: str, device: str) -> None:
    if cache_dir is not None:
        _path(cache_dir, request, device).unlink(missing_ok=True)
