"""A restart serves its page before the model loads.

The page needs little of the model: its name and shape (layers, heads, context) and the fingerprint of
its weights, which keys the example cache the page's first examples come from. Each start that loads a
model records these beside the example cache, with the files it loaded from (path, size, modification
time) and the code that computed with it. A restart that finds the same files and code unchanged builds
its page from the record, serves it, and only then imports TransformerLens and loads the model, from
those files (about half of a GPT-2 restart). The loaded model must have the recorded fingerprint before
it answers anything (`Runner(loader=..., fingerprint=...)`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from core.model import loaded_from, model_key
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
