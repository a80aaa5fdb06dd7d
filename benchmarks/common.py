"""What the timing scripts share: their two options and how they measure memory."""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch


def arguments(description: str | None = None, **more: int) -> argparse.Namespace:
    """--threads (set for torch here: 2, like this project's machines), --repeats (median of; 3 unless
    `more` names another default), and a whole-number option for each of `more` (name=default; `tl_pairs` is --tl-pairs)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=more.pop("repeats", 3))
    for name, default in more.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, base: int | None = None):
    """(fn(), seconds, peak resident memory during the call above `base`, default the memory just
    before it; sampled every 2 ms)."""
    base, peak, done = rss_bytes() if base is None else base, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return result, seconds, max(0, max(peak[0], rss_bytes()) - base)
