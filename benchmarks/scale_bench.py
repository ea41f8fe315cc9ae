"""Scale: wall time and peak memory of the preprocess stage, of one pretraining epoch and of one
training epoch at 1x, 4x and 16x the images (synthetic 256 px PNGs -> 128 px; a small classifier 2,
U-Net f8 d3, batch 32), each in a fresh child process (peak RSS = its ru_maxrss).

    python -m benchmarks.scale_bench [--base 150] [--factors 1 4 16] [--tasks preprocess pretrain stream memory]
        [--library /tmp/head/shared]   # neumo from another copy of shared/, to compare versions

Cost should grow linearly (s/image flat) and memory stay flat: preprocess streams shard by shard,
and training reads shards through data.stream_dataset (cache off and a 4 MB shuffle buffer here,
to show the streaming path at a size where the defaults would hold the whole fold; the in-memory path, load_fold + make_dataset, is measured beside it for contrast).
Pretraining = the stage itself, `neumo.stages.pretrain(pretrain_epochs=1, filters=8, depth=3)` on the
same variant (its train fold's images, the default pretrain_data), timed around the call: model
build, one epoch, the held-out tenth's validation loss, saving. Its fixed costs (tracing, saving)
weigh most at 1x, so read ms/image at 4x and 16x; peak RSS should stay flat if it streams its shards
(also run with cache off and a 4 MB shuffle buffer; a library from before streaming ignores them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from benchmarks.common import REPO, WORKDIR, report, setup

SOURCE_PX, PIXELS = 256, 128
#: The tasks, in order, and their labels in the printout.
LABELS = {"preprocess": "preprocess (1 worker)", "pretrain": "pretrain epoch (stage)", "stream": "train epoch, streamed",
          "memory": "train epoch, in memory"}

CHILD = r"""
import json, resource, sys, time
task, arg = sys.argv[1], json.load(open(sys.argv[2]))
import numpy as np
from neumo import data as nd
if task == "preprocess":
    from neumo import preprocess
    start = time.perf_counter()
    preprocess.prepare_variant(arg["rows"], preprocess.PreprocessConfig(acquisition_copies=0, pixels=arg["pixels"], workers=1,
                   shard_bytes=arg["shard_bytes"]), arg["out"])
elif task == "pretrain":
    # the streaming path at a size where the defaults would cache the whole set (as "stream" below):
    # no cache, a 4 MB shuffle buffer; set before neumo.training binds them as its defaults
    nd.CACHE_BYTES, nd.SHUFFLE_BYTES = 0, 2**22
    from neumo import stages
    start = time.perf_counter()
    stages.pretrain(variant_dir=arg["variant"], out_dir=arg["out"], pretrain_epochs=1, filters=8, depth=3)
else:
    import keras
    from neumo import models
    keras.utils.set_random_seed(0)
    clf = models.build_classifier(models.build_backbone(models.build_unet(arg["pixels"], 3, 8)), 2)
    clf.compile(optimizer="adam", loss="binary_crossentropy")
    if task == "stream":
        ds = nd.stream_dataset(arg["variant"], "train", 32, "light", True, 0, cache_bytes=0, shuffle_bytes=2**22)
    else:
        ds = nd.make_dataset(nd.load_fold(arg["variant"], "train"), 32, "light", True, 0)
    clf.fit(ds.take(2), epochs=1, verbose=0)  # warm-up: traces the train step once
    start = time.perf_counter()
    clf.fit(ds, epochs=1, verbose=0)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(task: str, arg: dict, library: str) -> dict:
    """Run one task of CHILD in a fresh process importing neumo from `library`; its JSON line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=library)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=WORKDIR, delete=False) as fh:
        json.dump(arg, fh)  # a manifest can be longer than a command line may be
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, task, fh.name], capture_output=True, text=True,
                             env=env, check=False)
    finally:
        os.unlink(fh.name)
    if out.returncode:
        raise RuntimeError(f"{task} child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=150, help="images at 1x")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tasks", nargs="+", choices=list(LABELS), default=list(LABELS),
                        help="what to measure (preprocess always runs: the others read its variant)")
    parser.add_argument("--library", default=os.path.join(REPO, "shared"),
                        help="the folder neumo is imported from in the measured processes: another version "
                             "(e.g. `git archive HEAD shared | tar -x -C /tmp/head`) to compare before and after")
    args = parser.parse_args(argv)
    setup("scale")
    print(f"neumo from {args.library}", flush=True)
    from neumo import synthetic

    os.makedirs(WORKDIR, exist_ok=True)
    root = tempfile.mkdtemp(prefix="scale-", dir=WORKDIR)
    try:
        src = os.path.join(root, "nih")
        synthetic.write_nih(src, args.base, size=SOURCE_PX)
        files = sorted(os.listdir(src))
        shard_bytes = 32 * PIXELS * PIXELS  # 32-image shards: many shards even at 1x
        first = {}
        for k in args.factors:
            n = args.base * k
            rows = [{"id": f"c{i // len(files):03d}_{files[i % len(files)]}", "uri": os.path.join(src, files[i % len(files)]),
                     "fold": "train", "target": i % 2} for i in range(n)]
            variant = os.path.join(root, f"v{k}")
            row = {"preprocess": child("preprocess", {"rows": rows, "pixels": PIXELS, "shard_bytes": shard_bytes,
                                                      "out": variant}, args.library)}
            for task in (t for t in LABELS if t != "preprocess" and t in args.tasks):
                row[task] = child(task, {"variant": variant, "pixels": PIXELS, "out": os.path.join(root, f"pre{k}")},
                                  args.library)
            data_mb = n * PIXELS * PIXELS / 2**20
            first = first or {key: dict(v, n=n) for key, v in row.items()}
            print(f"{k:3d}x = {n:5d} images ({data_mb:6.1f} MB stored at {PIXELS}px):")
            for key in row:
                v, f, label = row[key], first[key], LABELS[key]
                per = v["seconds"] / n * 1000
                print(f"  {label:24s} {v['seconds']:7.2f} s = {per:6.2f} ms/image ({per / (f['seconds'] / f['n'] * 1000):.2f}x "
                      f"the 1x figure); peak RSS {v['maxrss_mb']:7.1f} MB ({v['maxrss_mb'] - f['maxrss_mb']:+6.1f} MB vs 1x)")
                report(bench="scale", factor=k, images=n, stage=key, seconds=round(v["seconds"], 2),
                       ms_per_image=round(per, 3), maxrss_mb=round(v["maxrss_mb"], 1),
                       rss_growth_mb=round(v["maxrss_mb"] - f["maxrss_mb"], 1), data_mb=round(data_mb, 1))
            shutil.rmtree(variant, ignore_errors=True)
            shutil.rmtree(os.path.join(root, f"pre{k}"), ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
