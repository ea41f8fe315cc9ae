"""Small helpers shared by the benchmarks: timing, a header line and a result line format."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
KERMANY_FULL = os.path.join(SHARED_DATA, "kermany_full_res", "images")
WORKDIR = os.path.join(REPO, "work", "bench")


def machine() -> str:
    """One line: CPU model, cores, memory."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB"


def setup(name: str) -> None:
    """Quiet logging and TF, and a header line for one benchmark."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load = os.getloadavg()[0]
    print(f"== {name} on {machine()} (load average {load:.1f} at start)", flush=True)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_rate(n: int, fn: Callable[[], object], repeats: int = 2) -> float:
    """n / (fastest of `repeats` calls), items per second: the shared machine only adds noise upwards."""
    return n / min(timed(fn) for _ in range(repeats))


def cpu_parts() -> tuple[float, float]:
    """(this process, its reaped children) user + system CPU seconds so far: a pool's workers count
    once they have been joined."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children so far."""
    return sum(cpu_parts())


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, tuple[float, float]]:
    """{name: (best wall seconds, CPU seconds of that run)}: contenders run in turn, `repeats` rounds.

    Interleaving and taking the best run make the comparison fair on a machine other people load
    at the same time; CPU seconds per item do not depend on that load at all.
    """
    best: dict[str, tuple[float, float]] = {}
    for _ in range(repeats):
        for name, fn in contenders.items():
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    return best


def report(**fields) -> None:
    """One machine-readable result line (the run script collects them) after the human lines."""
    print("RESULT " + json.dumps(fields, default=str), flush=True)
