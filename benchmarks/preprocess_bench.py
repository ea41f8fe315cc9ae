"""Preprocess stage images/s against a bare loop of the same decode + OpenCV calls, 1 and N workers.

    python -m benchmarks.preprocess_bench [--pixels 512] [--repeat 2] [--synthetic 96]

Inputs: the real full-size Kermany images in ../shared/data/kermany_full_res (read in place) and
synthetic 1024x1024 NIH-layout PNGs. The bare loop reads each file, then cv2.imdecode, cvtColor
(colour files), resize and CLAHE, nothing else: the floor the stage is measured against.
Targets: stage with 1 worker >= 0.9x the bare loop; with N workers >= 0.9 x N x the 1-worker rate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from benchmarks.common import KERMANY_FULL, WORKDIR, cpu_seconds, interleaved, report, setup


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
    import time

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


def bench(label: str, paths: list[str], pixels: int, repeat: int, workers: int, out_root: str, repeats: int = 3) -> None:
    from neumo import preprocess

    rows = manifest(paths, repeat)
    n = len(rows)
    for p in paths:  # warm the page cache so every contender reads from memory
        with open(p, "rb") as fh:
            fh.read()
    def stage(w):
        out = os.path.join(out_root, f"{label}-{w}")
        shutil.rmtree(out, ignore_errors=True)
        preprocess.prepare_variant(rows, preprocess.PreprocessConfig(acquisition_copies=0, pixels=pixels, workers=w), out)

    contenders = {"bare": lambda: [bare_loop(paths, pixels) for _ in range(repeat)], 1: lambda: stage(1)}
    if workers > 1:
        contenders[workers] = lambda: stage(workers)
    best = interleaved(contenders, repeats)
    bare, one, many = (n / best[k][0] for k in ("bare", 1, workers))
    cpu = {k: 1000 * v[1] / n for k, v in best.items()}  # CPU ms per image
    start, start_cpu = pool_start(workers) if workers > 1 else (0.0, 0.0)
    steady = n / max(1e-9, n / many - start)
    print(f"{label}: {n} images -> {pixels}px, best of {repeats} interleaved runs")
    print(f"  bare loop (imdecode+cvtColor+resize+CLAHE, 1 process): {bare:7.1f} images/s  {cpu['bare']:5.2f} CPU ms/image")
    print(f"  preprocess stage, 1 worker:                             {one:7.1f} images/s  {cpu[1]:5.2f} CPU ms/image"
          f"  = {one / bare:.2f}x bare by wall (target >= 0.9), {cpu['bare'] / cpu[1]:.2f}x by CPU")
    if workers > 1:
        print(f"  preprocess stage, {workers} workers (spawn pool incl. start): {many:7.1f} images/s  {cpu[workers]:5.2f} CPU ms/image"
              f"  = {many / one:.2f}x 1 worker = {many / (workers * one):.2f} x N x 1-worker (target >= 0.9)")
        print(f"    starting the pool (spawn + imports) takes {start:.2f} s; without it {steady:7.1f} images/s "
              f"= {steady / (workers * one):.2f} x N x 1-worker")
        steady_cpu = cpu[workers] - 1000 * start_cpu / n
        print(f"    CPU per image: {cpu[workers]:.2f} ms, of which {1000 * start_cpu / n:.2f} ms is the pool start "
              f"({start_cpu:.1f} CPU s); the rest {steady_cpu:.2f} ms = {steady_cpu / cpu[1]:.2f}x the 1-worker's")
    report(bench="preprocess", data=label, images=n, pixels=pixels, bare=round(bare, 1), one_worker=round(one, 1),
           workers=workers, n_workers=round(many, 1), ratio_one_vs_bare=round(one / bare, 3),
           ratio_n_vs_n_times_one=round(many / (workers * one), 3), pool_start_s=round(start, 2),
           ratio_n_steady=round(steady / (workers * one), 3),
           pool_start_cpu_s=round(start_cpu, 2), cpu_ms_per_image={str(k): round(v, 3) for k, v in cpu.items()}, load_average=round(os.getloadavg()[0], 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2, help="list each real image this many times")
    parser.add_argument("--synthetic", type=int, default=96, help="synthetic 1024x1024 NIH PNGs (0 = skip)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    setup("preprocess")
    os.makedirs(WORKDIR, exist_ok=True)
    out_root = tempfile.mkdtemp(prefix="preprocess-", dir=WORKDIR)
    try:
        if os.path.isdir(KERMANY_FULL):
            real = sorted(os.path.join(d, f) for d, _, fs in os.walk(KERMANY_FULL) for f in fs)
            bench("kermany_full_res (real, ~400-2900 px JPEG)", real, args.pixels, args.repeat, args.workers, out_root)
        else:
            print(f"kermany_full_res absent at {KERMANY_FULL}: real-image benchmark skipped")
        if args.synthetic:
            from neumo import synthetic

            nih = os.path.join(out_root, "nih")
            synthetic.write_nih(nih, args.synthetic, size=1024)
            paths = sorted(os.path.join(nih, f) for f in os.listdir(nih))
            bench("synthetic NIH 1024x1024 PNG", paths, args.pixels, args.repeat, args.workers, out_root)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
