"""The `neumo` command: every pipeline stage as a subcommand, so any stage runs outside Kubeflow.

    neumo ingest --dataset-uri DATA --masks-uri MASKS --out work/manifest
    neumo train-mask-model --manifest work/manifest --out work/mask_model
    neumo mask --manifest work/manifest --mask-model work/mask_model --out work/masks
    neumo preprocess --manifest work/manifest --masks work/masks --pixels 256 --mask --out work/p256m
    neumo pretrain --data work/p256m --out work/bb256m
    neumo catalog --variant work/p256m work/bb256m --out work/catalog.json
    neumo suggest --search-space space.json --history work/history.jsonl --out work/configs.json
    neumo train --config trial.json --catalog work/catalog.json --out work/trial0
    neumo evaluate --model work/trial0 --catalog work/catalog.json --train-row work/trial0/row.json --out work/eval0
    neumo aggregate --history work/history.jsonl --results-uri work/results --out work/report
    neumo compare --a work/eval0 --b work/eval1 --split test   # McNemar + paired bootstrap AUC
    neumo synthetic --out work/synthetic     # synthetic chest X-rays in Kaggle + NIH layouts
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _json_arg(text: str):
    """A JSON value given inline or as @FILE."""
    if text.startswith("@"):
        with open(text[1:]) as fh:
            return json.load(fh)
    return json.loads(text)


def _ingest(a):
    from neumo import stages
    from neumo.ingest import IngestConfig

    summary = stages.ingest(IngestConfig(a.dataset_uri, a.masks_uri, a.pretrain_uri, a.valid_fraction,
                                         a.sample_per_class, a.seed), a.out)
    return {k: summary[k] for k in ("files", "accepted", "rejected", "duplicate", "skipped", "data_version")}


def _train_mask_model(a):
    from neumo import stages
    from neumo.masking import MaskModelConfig

    config = MaskModelConfig(pixels=a.pixels, epochs=a.epochs, filters=a.filters, max_images=a.max_images, seed=a.seed)
    return stages.mask_model(a.manifest, a.out, a.mask_model_uri, config)


def _mask(a):
    from neumo import stages

    return stages.mask(a.manifest, a.mask_model, a.out)


def _preprocess(a):
    from neumo import stages

    return stages.preprocess(a.manifest, {"pixels": a.pixels, "mask": a.mask}, a.out, a.masks, a.clahe_clip, a.workers,
                             a.acquisition_copies)


def _pretrain(a):
    from neumo import stages
    from neumo.training import PretrainConfig

    return stages.pretrain(a.data, a.out, PretrainConfig(depth=a.depth, filters=a.filters, epochs=a.epochs, seed=a.seed))


def _catalog(a):
    from neumo import data as nd
    from neumo import stages

    variants, backbones = [], []
    for data_dir, backbone_dir in a.variant:
        info = nd.read_variant(data_dir)
        variants.append({"uri": data_dir, "pixels": info["pixels"], "mask": info["mask"]})
        backbones.append({"uri": backbone_dir, "pixels": info["pixels"], "mask": info["mask"]})
    return stages.catalog(variants, backbones, a.out)


def _suggest(a):
    from neumo import stages
    from neumo.tuning import SearchSpace

    space = _json_arg(a.search_space) if a.search_space else SearchSpace.default().to_dict()
    configs = stages.suggest(space, a.history, [], a.batch_size, a.seed, a.history_out or a.history or "/dev/null",
                             a.results_uri, a.round)
    with open(a.out, "w") as fh:
        json.dump(configs, fh, indent=2)
    return configs


def _train(a):
    from neumo import stages
    from neumo.training import TrainSettings

    settings = TrainSettings(epochs=a.epochs, batch_size=a.batch_size, patience=a.patience, seed=a.seed)
    row = stages.train(_json_arg(a.config), a.catalog, a.out, settings=settings, clahe_clip=a.clahe_clip, seed=a.seed)
    with open(f"{a.out}/row.json", "w") as fh:
        json.dump(row, fh, indent=2)
    return row


def _evaluate(a):
    from neumo import stages

    record = stages.evaluate(a.model, a.catalog, _json_arg("@" + a.train_row), a.out, a.bootstrap)
    if a.history:
        with open(a.history, "a") as fh:
            fh.write(json.dumps({k: record[k] for k in ("train", "eval", "figures_uri")}) + "\n")
    return record["eval"]


def _aggregate(a):
    from neumo import stages

    return stages.aggregate(a.history, [], a.results_uri, a.out)


def _compare(a):
    import csv

    from neumo import evaluation

    def read(folder):
        with open(f"{folder}/predictions.csv") as fh:
            return {(r["split"], r["id"]): r for r in csv.DictReader(fh) if r["split"] == a.split}

    pa, pb = read(a.a), read(a.b)
    ids = sorted(set(pa) & set(pb))
    if not ids or len(ids) != len(pa) or len(ids) != len(pb):
        raise ValueError(f"the two evaluations must hold predictions for the same {a.split!r} images "
                         f"({len(pa)} and {len(pb)}, {len(ids)} shared)")
    t = [int(pa[i]["target"]) for i in ids]
    return {"split": a.split, "images": len(ids),
            "mcnemar": evaluation.mcnemar(t, [int(pa[i]["predicted"]) for i in ids], [int(pb[i]["predicted"]) for i in ids]),
            "auc": evaluation.paired_bootstrap_auc(t, [float(pa[i]["probability"]) for i in ids],
                                                   [float(pb[i]["probability"]) for i in ids], n=a.bootstrap, seed=a.seed)}


def _synthetic(a):
    from neumo import synthetic

    n = synthetic.write_kaggle(f"{a.out}/images", {"train": (a.per_class, a.per_class), "val": (8, 8),
                                                     "test": (a.per_class // 4, a.per_class // 4)},
                               size=a.size, seed=a.seed, masks_uri=f"{a.out}/masks")
    n += synthetic.write_nih(f"{a.out}/nih", a.per_class, size=a.size, seed=a.seed + 1)
    return {"images": n, "out": a.out}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neumo", description="Chest X-ray pneumonia pipeline stages, one per subcommand.",
                                epilog="Each stage is also a Kubeflow component; see pipelines/full.py.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="STAGE")

    def stage(name, func, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.set_defaults(func=func)
        s.add_argument("--seed", type=int, default=0)
        return s

    s = stage("ingest", _ingest, "validate a dataset: manifest, per-file report, patient-level split")
    s.add_argument("--dataset-uri", required=True, help="folder or gs:// in split/CLASS/file layout")
    s.add_argument("--masks-uri", default="")
    s.add_argument("--pretrain-uri", default="", help="unlabelled images (NIH flat layout)")
    s.add_argument("--valid-fraction", type=float, default=0.2)
    s.add_argument("--sample-per-class", type=int, default=0)
    s.add_argument("--out", required=True)

    s = stage("train-mask-model", _train_mask_model, "train (or import) the lung-mask U-Net; Dice and IoU")
    s.add_argument("--manifest", required=True)
    s.add_argument("--mask-model-uri", default="", help="import this .keras or legacy .h5 instead of training")
    s.add_argument("--pixels", type=int, default=256)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--filters", type=int, default=16)
    s.add_argument("--max-images", type=int, default=0)
    s.add_argument("--out", required=True)

    s = stage("mask", _mask, "lung masks for every image, QA and a contact sheet")
    s.add_argument("--manifest", required=True)
    s.add_argument("--mask-model", required=True, help="output folder of train-mask-model")
    s.add_argument("--out", required=True)

    s = stage("preprocess", _preprocess, "the seed's preprocessing for one (pixels, mask) variant")
    s.add_argument("--manifest", required=True)
    s.add_argument("--masks", default="")
    s.add_argument("--pixels", type=int, required=True)
    s.add_argument("--mask", action="store_true")
    s.add_argument("--clahe-clip", type=float, default=None)
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--acquisition-copies", type=int, default=1,
                   help="extra copies of each train image through a random other acquisition (0-4)")
    s.add_argument("--out", required=True)

    s = stage("pretrain", _pretrain, "pretrain the U-Net autoencoder (restoration task) on a variant")
    s.add_argument("--data", required=True)
    s.add_argument("--depth", type=int, default=4)
    s.add_argument("--filters", type=int, default=16)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--out", required=True)

    s = stage("catalog", _catalog, "pair prepared variants with their pretrained backbones")
    s.add_argument("--variant", nargs=2, action="append", required=True, metavar=("DATA", "BACKBONE"))
    s.add_argument("--out", required=True)

    s = stage("suggest", _suggest, "the next batch of trial configurations (mango)")
    s.add_argument("--search-space", default="", help="JSON or @FILE (default: the seed's space)")
    s.add_argument("--history", default="", help="JSON-lines trial records so far")
    s.add_argument("--history-out", default="")
    s.add_argument("--results-uri", default="")
    s.add_argument("--batch-size", type=int, default=2)
    s.add_argument("--round", type=int, default=0)
    s.add_argument("--out", required=True)

    s = stage("train", _train, "train one classifier trial")
    s.add_argument("--config", required=True, help="JSON or @FILE")
    s.add_argument("--catalog", required=True)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--patience", type=int, default=3)
    s.add_argument("--clahe-clip", type=float, default=None)
    s.add_argument("--out", required=True)

    s = stage("evaluate", _evaluate, "evaluate a trained trial on test, val, test+val and valid")
    s.add_argument("--model", required=True)
    s.add_argument("--catalog", required=True)
    s.add_argument("--train-row", required=True, help="the row.json written by train")
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--history", default="", help="append the trial record to this JSON-lines file")
    s.add_argument("--out", required=True)

    s = stage("aggregate", _aggregate, "the seed's two CSVs at the results URI and an HTML report")
    s.add_argument("--history", required=True)
    s.add_argument("--results-uri", default="")
    s.add_argument("--out", required=True)

    s = stage("compare", _compare, "paired comparison of two evaluated models: McNemar and paired bootstrap AUC")
    s.add_argument("--a", required=True, help="evaluate output folder of model A (predictions.csv)")
    s.add_argument("--b", required=True, help="evaluate output folder of model B")
    s.add_argument("--split", default="test", help="test, val or valid")
    s.add_argument("--bootstrap", type=int, default=2000)

    s = stage("synthetic", _synthetic, "write synthetic chest X-rays (Kaggle and NIH layouts) with lung masks")
    s.add_argument("--per-class", type=int, default=50)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--out", required=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        logging.getLogger("neumo").error("%s: %s", args.command, err)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
