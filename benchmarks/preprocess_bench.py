"""Preprocess stage images/s and CPU per image, 1 and N workers, against a bare loop of the same
decode + OpenCV calls, on a workload sized to take at least `--seconds` per configuration.

    python -m benchmarks.preprocess_bench [--pixels 512] [--seconds 20] [--repeats 2] [--synthetic 64]

Inputs: the real full-size Kermany images in ../shared/data/kermany_full_res (read in place, never
copied; skipped with a message when absent) and synthetic 1024x1024 NIH-layout PNGs. Each image list
is repeated (under distinct ids) until one worker needs about `--seconds` (calibrated on one pass),
so a pool's start (spawn + imports, about a second) weighs a few percent, not most of the run.
The bare loop reads each file, then cv2.imdecode, cvtColor (colour files), resize and CLAHE,
nothing else: the floor the stage is measured against.

Targets: the stage with 1 worker >= 0.9x the bare loop; with N workers >= 0.9 x N x the 1-worker
rate (speedup / N = efficiency), with CPU seconds per image within 10% of one worker's. CPU is
counted for the main process (RUSAGE_SELF) and the pool's workers (RUSAGE_CHILDREN, once joined);
the main process's share (collecting results, stacking, encoding and writing shards) is what N
workers on exactly N cores cannot use, so it is printed with the ceiling it implies.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from benchmarks.common import KERMANY_FULL, WORKDIR, cpu_parts, cpu_seconds, report, setup


def bare_loop(paths: list[str], pixels: int) -> None:
    import cv2
    import numpy as np

    clahe = cv2.createCLAHE(clipLimit=40.0, tileGridSize=(8, 8))
    for path in paths:
        with open(path, "rb") as fh:
            image = cv2.imdecode(np.frombuffer(fh.read(), np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        clahe.apply(cv2.resize(image, (pixels, pixels), interpolation=cv2.INTER_LINEAR))


def pool_start(workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds to start the stage's spawn pool until every worker has answered (best of 2)."""
    import multiprocessing

    from neumo import preprocess

    best = (float("inf"), 0.0)
    for _ in range(2):
        cpu0, start = cpu_seconds(), time.perf_counter()
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=preprocess._init_worker)
        pool.map(abs, range(workers), chunksize=1)
        wall = time.perf_counter() - start
        pool.terminate()
        pool.join()
        best = min(best, (wall, cpu_seconds() - cpu0))
    return best


def manifest(paths: list[str], repeat: int) -> list[dict]:
    """Manifest rows (fold train) for the files, each listed `repeat` times under distinct ids."""
    return [{"id": f"r{k}_{os.path.basename(p)}", "uri": p, "fold": "train", "target": 0}
            for k in range(repeat) for p in paths]


def measured(fn: Callable[[], object]) -> dict:
    """Wall seconds and CPU seconds of the main process and of its children for one call of fn."""
    own0, kids0 = cpu_parts()
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    own, kids = cpu_parts()
    return {"wall": wall, "main_cpu": own - own0, "child_cpu": kids - kids0}


def best_of(contenders: dict, rounds: int) -> dict:
    """{name: the fastest run's measured()}: contenders in turn, `rounds` times (fair on a shared machine)."""
    best: dict = {}
    for _ in range(rounds):
        for name, fn in contenders.items():
            m = measured(fn)
            if name not in best or m["wall"] < best[name]["wall"]:
                best[name] = m
    return best


def stage_runner(paths: list[str], repeat: int, pixels: int, out: str) -> Callable[[int], None]:
    """A function running the preprocess stage on `paths` x `repeat` with w workers into `out` (removed after:
    at 512 px a 20 s run writes about a gigabyte)."""
    from neumo import preprocess

    rows = manifest(paths, repeat)

    def run(workers: int) -> None:
        shutil.rmtree(out, ignore_errors=True)
        config = preprocess.PreprocessConfig(acquisition_copies=0, pixels=pixels, workers=workers)
        try:
            preprocess.prepare_variant(rows, config, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return run


def calibrate(paths: list[str], pixels: int, seconds: float, out_root: str) -> int:
    """How many times to list the images so one worker takes at least `seconds` on a quiet machine: from
    the smaller CPU time of two passes (the first also pays the stage's lazy imports), which other
    processes' load does not inflate as it does the wall time, plus 10%."""
    run = stage_runner(paths, 1, pixels, os.path.join(out_root, "calibrate"))
    one_pass = min(sum(v for k, v in measured(lambda: run(1)).items() if k != "wall") for _ in range(2))
    return max(1, math.ceil(1.1 * seconds / one_pass))


def summary(label: str, n: int, pixels: int, workers: int, best: dict, start: tuple[float, float]) -> dict:
    """Print the figures of one data set and return them (the RESULT line's fields)."""
    rate = {k: n / v["wall"] for k, v in best.items()}
    cpu = {k: 1000 * (v["main_cpu"] + v["child_cpu"]) / n for k, v in best.items()}  # CPU ms per image
    main_share = {k: v["main_cpu"] / max(1e-9, v["main_cpu"] + v["child_cpu"]) for k, v in best.items()}
    one = rate[1]
    print(f"{label}: {n} images -> {pixels} px, best of the interleaved runs ({best[1]['wall']:.1f} s for 1 worker)")
    print(f"  bare loop (imdecode+cvtColor+resize+CLAHE, 1 process): {rate['bare']:7.1f} images/s  "
          f"{cpu['bare']:5.2f} CPU ms/image")
    print(f"  preprocess stage, 1 worker:  {one:7.1f} images/s  {cpu[1]:5.2f} CPU ms/image = {one / rate['bare']:.2f}x "
          f"bare by wall (target >= 0.9), {cpu['bare'] / cpu[1]:.2f}x by CPU")
    fields = {"bare": round(rate["bare"], 1), "one_worker": round(one, 1), "ratio_one_vs_bare": round(one / rate["bare"], 3),
              "cpu_ms_per_image": {str(k): round(v, 3) for k, v in cpu.items()},
              "main_cpu_share": {str(k): round(v, 3) for k, v in main_share.items()},
              "seconds": {str(k): round(v["wall"], 2) for k, v in best.items()}}
    if workers > 1:
        many = rate[workers]
        busy = (best[workers]["main_cpu"] + best[workers]["child_cpu"]) / best[workers]["wall"]
        ceiling = workers * 1000 / cpu[workers]  # images/s if all N cores did nothing but this run's CPU work
        steady = n / max(1e-9, best[workers]["wall"] - start[0])
        print(f"  preprocess stage, {workers} workers: {many:7.1f} images/s  {cpu[workers]:5.2f} CPU ms/image: "
              f"speedup {many / one:.2f}x, efficiency {many / (workers * one):.2f} (target >= 0.9); CPU per image "
              f"{cpu[workers] / cpu[1]:.2f}x one worker's (target <= 1.10)")
        print(f"    main process: {main_share[workers]:.0%} of the CPU ({1000 * best[workers]['main_cpu'] / n:.2f} ms/image: "
              f"results, stacking, shard encode and write); cores busy {busy:.2f} of {workers}; load average now "
              f"{os.getloadavg()[0]:.1f}")
        steady_cpu = cpu[workers] - 1000 * start[1] / n
        print(f"    CPU-bound ceiling on {workers} idle cores: {ceiling:7.1f} images/s = {ceiling / (workers * one):.2f} x N x "
              f"1-worker; pool start {start[0]:.2f} s ({start[1]:.1f} CPU s); without it: efficiency "
              f"{steady / (workers * one):.2f}, CPU per image {steady_cpu / cpu[1]:.2f}x one worker's")
        fields.update(n_workers=round(many, 1), speedup=round(many / one, 3), efficiency=round(many / (workers * one), 3),
                      cpu_ratio=round(cpu[workers] / cpu[1], 3), cores_busy=round(busy, 2),
                      ceiling_efficiency=round(ceiling / (workers * one), 3), pool_start_s=round(start[0], 2),
                      pool_start_cpu_s=round(start[1], 2), efficiency_without_start=round(steady / (workers * one), 3),
                      cpu_ratio_without_start=round(steady_cpu / cpu[1], 3))
    return fields


def bench(label: str, paths: list[str], pixels: int, seconds: float, workers: int, out_root: str, rounds: int) -> None:
    """Calibrate the workload, then run the bare loop, 1 worker and N workers in turn, `rounds` times."""
    for p in paths:  # warm the page cache so every contender reads from memory
        with open(p, "rb") as fh:
            fh.read()
    load0 = os.getloadavg()[0]
    repeat = calibrate(paths, pixels, seconds, out_root)
    run = stage_runner(paths, repeat, pixels, os.path.join(out_root, "out"))
    contenders = {"bare": lambda: [bare_loop(paths, pixels) for _ in range(repeat)], 1: lambda: run(1)}
    if workers > 1:
        contenders[workers] = lambda: run(workers)
    best = best_of(contenders, rounds)
    start = pool_start(workers) if workers > 1 else (0.0, 0.0)
    fields = summary(label, len(paths) * repeat, pixels, workers, best, start)
    report(bench="preprocess", data=label, images=len(paths) * repeat, pixels=pixels, workers=workers, rounds=rounds,
           **fields, load_average_start=round(load0, 1), load_average=round(os.getloadavg()[0], 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=20.0, help="size each configuration's run to at least this")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest run counts")
    parser.add_argument("--synthetic", type=int, default=64, help="synthetic 1024x1024 NIH PNGs (0 = skip)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    setup("preprocess")
    os.makedirs(WORKDIR, exist_ok=True)
    out_root = tempfile.mkdtemp(prefix="preprocess-", dir=WORKDIR)
    try:
        if os.path.isdir(KERMANY_FULL):
            real = sorted(os.path.join(d, f) for d, _, fs in os.walk(KERMANY_FULL) for f in fs)
            bench("kermany_full_res (real, ~400-2900 px JPEG)", real, args.pixels, args.seconds, args.workers, out_root,
                  args.repeats)
        else:
            print(f"kermany_full_res absent at {KERMANY_FULL} (see ../shared/data/README.md): real-image benchmark "
                  "skipped")
        if args.synthetic:
            from neumo import synthetic

            nih = os.path.join(out_root, "nih")
            synthetic.write_nih(nih, args.synthetic, size=1024)
            paths = sorted(os.path.join(nih, f) for f in os.listdir(nih))
            bench("synthetic NIH 1024x1024 PNG", paths, args.pixels, args.seconds, args.workers, out_root, args.repeats)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
