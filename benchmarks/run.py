"""Run every benchmark in turn (``make bench``), each in its own process, and print a timing summary.

    python -m benchmarks.run [--only preprocess input step step512 scale cost]

Default sizes keep the whole run under about 30 minutes on a 2-core CPU. The step benchmark runs the full
float32/mixed x XLA grid at 256 px and float32 without XLA at 512 px (the full 512 grid takes
longer than the budget here: ``python -m benchmarks.step_bench --pixels 512``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks.common import REPO, machine

SUITE = {
    "preprocess": ["benchmarks.preprocess_bench", "--pixels", "512", "--seconds", "20", "--repeats", "2",
                   "--synthetic", "64"],
    "input": ["benchmarks.input_bench", "--pixels", "256", "512", "--images", "256"],
    "step": ["benchmarks.step_bench", "--pixels", "256", "--steps", "2"],
    "step512": ["benchmarks.step_bench", "--pixels", "512", "--steps", "2", "--policies", "float32", "--xla", "0"],
    "scale": ["benchmarks.scale_bench", "--base", "150"],
    "cost": ["benchmarks.cost_model", "--measure-pixels", "256", "512", "--steps", "3", "--json",
             os.path.join("work", "bench", "cost_model.json")],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SUITE), default=list(SUITE))
    args = parser.parse_args(argv)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.path.join(REPO, "shared"), env.get("PYTHONPATH")) if p)
    print(f"neumo benchmarks on {machine()}", flush=True)
    times, failed = {}, []
    start = time.perf_counter()
    for name in args.only:
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", *SUITE[name]], cwd=REPO, env=env, check=False).returncode
        times[name] = time.perf_counter() - t0
        if rc:
            failed.append(name)
        print(f"-- {name}: {times[name]:.0f} s{'' if not rc else f' (FAILED, exit {rc})'}", flush=True)
    total = time.perf_counter() - start
    print("== summary: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
