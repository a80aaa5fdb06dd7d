"""What the timing scripts share: their two options, how they time a call and how they measure memory."""

from __future__ import annotations

import argparse
import os
import statistics
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


def median_seconds(fn, repeats: int):
    """(fn()'s last answer, the median seconds of `repeats` calls after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        answer = fn()
        times.append(time.perf_counter() - start)
    return answer, statistics.median(times)


def rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, base: int | None = None):
    """(fn(), seconds, peak resident memory during the call above `base`, default the memory just
    before it). The peak is the kernel's own (Linux: VmHWM, reset just before the call): exact, and
    nothing runs beside fn. Elsewhere it is sampled every 2 ms by a thread, which competes with torch's
    threads for the cores (on a 2-core machine it made a 2-thread induction run 16% slower)."""
    base = rss_bytes() if base is None else base
    if reset_peak("self"):
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        return result, seconds, max(0, memory_status("self")["VmHWM"] - base)
    peak, done = [0], threading.Event()

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


def reset_peak(pid: int | str) -> bool:
    """Start process `pid`'s peak resident memory (VmHWM) afresh from what it holds now (Linux's
    clear_refs); False where that is not possible or did not take (the peak is not back near the
    resident memory: a kernel or sandbox that ignores the request)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        status = memory_status(pid)
    except OSError:
        return False
    return status["VmHWM"] <= status["VmRSS"] + 16 * 2**20  # the process may grow a little between the two reads


def cpu_seconds(pid: int | str) -> float:
    """CPU time process `pid` ("self": this process) has used so far, user + system, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_status(pid: int | str) -> dict[str, int]:
    """Process `pid`'s resident memory now (VmRSS) and at its peak so far (VmHWM), in bytes ("self": this process)."""
    with open(f"/proc/{pid}/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmRSS:", "VmHWM:"))}


def torch_products(call):
    """`call()` with core.products.linear falling back to torch's own product (as where oneDNN disagrees):
    how the previous version, and TransformerLens as it ships, compute."""
    from core import products

    checked = products.onednn_agrees
    products.onednn_agrees = lambda activation="none": False
    try:
        return call()
    finally:
        products.onednn_agrees = checked
