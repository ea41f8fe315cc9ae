"""`neumo predict` images/s against the evaluate stage on the same images, as a ratio.

    python -m benchmarks.predict_bench [--per-class 250] [--pixels 128] [--bootstrap 200] [--repeat 2]

A small model is trained once on real images (../shared/data/kermany_224, read in place): ingest
with sample_per_class, preprocess, 1 epoch of pretraining, one trial of 1 epoch. Then, on the
images the evaluate stage scores (its valid fold and the val split), best of `repeat` interleaved
runs of:
- evaluate: stages.evaluate on the prepared variant, whose images are already decoded, resized and
  CLAHE'd into shards (metrics with `bootstrap` resamples, figures, and now the bundle: OOD fit,
  model card);
- predict: stages.predict on the same images' raw files with the bundle alone (bundle load, read
  and decode, the chain, classifier, OOD score, one Grad-CAM overlay per image, CSV, page);
- predict, no Grad-CAM: the same without the overlays (what the explanation costs).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil

from benchmarks.common import SHARED_DATA, WORKDIR, interleaved, report, setup


def train_once(work: str, per_class: int, pixels: int) -> tuple[str, str, dict]:
    """(model dir, catalog path, train row) of a 1-epoch trial on kermany_224 (cached in `work`)."""
    from neumo import stages

    w = {k: os.path.join(work, k) for k in ("m", "p", "b", "t", "catalog.json")}
    row_path = os.path.join(w["t"], "row.json")
    if os.path.exists(row_path):
        with open(row_path) as fh:
            return w["t"], w["catalog.json"], json.load(fh)
    stages.ingest(dataset_uri=os.path.join(SHARED_DATA, "kermany_224"), out_dir=w["m"], sample_per_class=per_class)
    stages.preprocess(manifest_dir=w["m"], variant={"pixels": pixels, "mask": False}, out_dir=w["p"],
                      acquisition_copies=0)
    stages.pretrain(variant_dir=w["p"], out_dir=w["b"], pretrain_epochs=1, filters=8, depth=3)
    v = {"pixels": pixels, "mask": False}
    stages.catalog(variants=[{**v, "uri": w["p"]}], backbones=[{**v, "uri": w["b"]}], out_path=w["catalog.json"])
    trial = {"pixels": pixels, "mask": False, "model": 2, "frozen_layers": 0, "learning_rate": 1e-3, "loss": "bce",
             "augmentation": "none", "class_weight": False, "round": 0, "trial": 0}
    row = stages.train(trial=trial, catalog_path=w["catalog.json"], out_dir=w["t"], epochs=1, run_id="bench")
    if row["status"] != "ok":
        raise SystemExit(f"training failed: {row['error']}")
    with open(row_path, "w") as fh:
        json.dump(row, fh)
    return w["t"], w["catalog.json"], row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=250, help="images per class of kermany_224/train sampled")
    parser.add_argument("--pixels", type=int, default=128)
    parser.add_argument("--bootstrap", type=int, default=200, help="evaluate's bootstrap resamples")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    setup("predict vs evaluate")
    from neumo import bundle, predict, stages

    work = os.path.join(WORKDIR, f"predict-{args.per_class}-{args.pixels}")
    model_dir, catalog, row = train_once(work, args.per_class, args.pixels)
    out = os.path.join(work, "runs")
    evaluated = os.path.join(out, "evaluate")
    stages.evaluate(model_dir=model_dir, catalog_path=catalog, train_row=row, out_dir=evaluated, bootstrap=args.bootstrap)
    manifest = {r["id"]: r["uri"] for r in stages.load_manifest(os.path.join(work, "m"))}
    with open(os.path.join(evaluated, "predictions.csv")) as fh:
        scored = list(csv.DictReader(io.StringIO(fh.read())))
    files = [manifest[r["id"]] for r in scored]
    bundle_dir = os.path.join(evaluated, bundle.FOLDER)

    def run_evaluate():
        stages.evaluate(model_dir=model_dir, catalog_path=catalog, train_row=row, out_dir=os.path.join(out, "e"),
                        bootstrap=args.bootstrap)

    def run_predict():
        stages.predict(bundle_uri=bundle_dir, inputs=files, out_dir=os.path.join(out, "p"))

    def run_predict_plain():
        loaded = bundle.load(bundle_dir)
        predict.write(loaded, predict.score(loaded, predict.list_inputs(files), os.path.join(out, "q"), gradcam=False),
                      os.path.join(out, "q"))

    best = interleaved({"evaluate": run_evaluate, "predict": run_predict, "predict, no Grad-CAM": run_predict_plain},
                       args.repeat)
    got = {r["file"]: r["probability"] for r in predict.read_csv(os.path.join(out, "p", predict.CSV))}
    gap = max(abs(got[manifest[r["id"]]] - float(r["probability"])) for r in scored)
    n = len(files)
    rates = {name: n / wall for name, (wall, _) in best.items()}
    print(f"{n} images ({args.per_class} per class sampled, {args.pixels} px; valid fold + val), best of {args.repeat}:")
    for name, (wall, cpu) in best.items():
        print(f"  {name:24s} {rates[name]:7.1f} images/s  ({wall:.2f} s wall, {1000 * cpu / n:.1f} CPU ms/image)")
    ratio = rates["predict"] / rates["evaluate"]
    print(f"  predict / evaluate: {ratio:.2f}x; largest probability difference {gap:.1e}")
    report(bench="predict", images=n, pixels=args.pixels, rates=rates, ratio=ratio, max_difference=gap)
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
