"""The `neumo` command: every pipeline stage as a subcommand, so any stage runs outside Kubeflow.

    neumo ingest --dataset-uri DATA --masks-uri MASKS --out work/manifest
    neumo train-mask-model --manifest work/manifest --out work/mask_model
    neumo mask --manifest work/manifest --mask-model work/mask_model --out work/masks
    neumo preprocess --manifest work/manifest --masks work/masks --pixels 256 --mask --out work/p256m
    neumo preprocess ... --part 1 --parts 3 --out work/p256m-1   # one of 3 parts (mask too), joined by:
    neumo preprocess-gather --out work/p256m work/p256m-0 work/p256m-1 work/p256m-2   # (mask-gather)
    neumo pretrain --data work/p256m --out work/bb256m
    neumo catalog --variant work/p256m work/bb256m --out work/catalog.json
    neumo suggest --search-space space.json --history work/history.jsonl --out work/configs.json
    neumo train --config trial.json --catalog work/catalog.json --out work/trial0
    neumo evaluate --model work/trial0 --catalog work/catalog.json --train-row work/trial0/row.json --out work/eval0
    neumo aggregate --history work/history.jsonl --results-uri work/results --out work/report
    neumo compare --a work/eval0 --b work/eval1 --split test   # McNemar + paired bootstrap AUC
    neumo ensemble --out work/ensemble work/eval0/bundle work/eval1/bundle   # average K bundles into one
    neumo predict --bundle work/results/models/best --out work/scored new_images/ gs://BUCKET/incoming x.dcm
    neumo synthetic --out work/synthetic     # synthetic chest X-rays in Kaggle + NIH layouts
    neumo demo-data --out work/demo/data.json   # the data `make demo` runs on (real if found, else synthetic)
    neumo preset demo                        # a preset's parameter values, as JSON

Options named like a pipeline parameter (`--epochs`, `--seed`, ...) are that parameter, with its
declared default (`neumo.parameters`); `neumo --preset NAME STAGE ...` takes a preset's values as
the defaults instead.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import logging
import os
import sys

from neumo import parameters

logger = logging.getLogger("neumo")

#: Where `neumo demo-data` looks for the real images when --shared-data is not given.
SHARED_DATA_ENV = "NEUMO_SHARED_DATA"


def _json_arg(text: str):
    """A JSON value given inline or as @FILE."""
    if text.startswith("@"):
        with open(text[1:]) as fh:
            return json.load(fh)
    return json.loads(text)


def _declared(a, func) -> dict:
    """The values of `func`'s keyword arguments that are pipeline parameters, from the options."""
    return {name: getattr(a, name) for name in inspect.signature(func).parameters if name in parameters.BY_NAME
            and hasattr(a, name)}


def _stages():
    from neumo import stages

    return stages


def _ingest(a):
    s = _stages()
    summary = s.ingest(out_dir=a.out, valid_fraction=a.valid_fraction, **_declared(a, s.ingest))
    return {k: summary[k] for k in ("files", "accepted", "rejected", "duplicate", "skipped", "data_version")}


def _train_mask_model(a):
    s = _stages()
    return s.mask_model(manifest_dir=a.manifest, out_dir=a.out, **_declared(a, s.mask_model))


def _mask(a):
    return _stages().mask(manifest_dir=a.manifest, model_dir=a.mask_model, out_dir=a.out, part=a.part, parts=a.parts)


def _mask_gather(a):
    return _stages().mask_gather(parts=a.parts, manifest_dir=a.manifest, out_dir=a.out)


def _preprocess(a):
    s = _stages()
    return s.preprocess(manifest_dir=a.manifest, variant={"pixels": a.pixels, "mask": a.mask}, out_dir=a.out,
                        masks_dir=a.masks, workers=a.workers, part=a.part, parts=a.parts, **_declared(a, s.preprocess))


def _preprocess_gather(a):
    return _stages().preprocess_gather(parts=a.parts, out_dir=a.out)


def _pretrain(a):
    s = _stages()
    return s.pretrain(variant_dir=a.data, out_dir=a.out, **_declared(a, s.pretrain))


def _catalog(a):
    from neumo import data

    variants, backbones = [], []
    for data_dir, backbone_dir in a.variant:
        info = data.read_variant(data_dir)
        variants.append({"uri": data_dir, "pixels": info["pixels"], "mask": info["mask"]})
        backbones.append({"uri": backbone_dir, "pixels": info["pixels"], "mask": info["mask"]})
    return _stages().catalog(variants=variants, backbones=backbones, out_path=a.out)


def _suggest(a):
    s = _stages()
    configs = s.suggest(history_in=a.history, finished=[], history_out=a.history_out or a.history or os.devnull,
                        round_index=a.round, **_declared(a, s.suggest))
    with open(a.out, "w") as fh:
        json.dump(configs, fh, indent=2)
    return configs


def _train(a):
    s = _stages()
    row = s.train(trial=_json_arg(a.trial), catalog_path=a.catalog, out_dir=a.out, **_declared(a, s.train))
    with open(os.path.join(a.out, "row.json"), "w") as fh:
        json.dump(row, fh, indent=2)
    return row


def _evaluate(a):
    s = _stages()
    record = s.evaluate(model_dir=a.model, catalog_path=a.catalog, train_row=_json_arg("@" + a.train_row),
                        out_dir=a.out, **_declared(a, s.evaluate))
    if a.history:
        with open(a.history, "a") as fh:
            fh.write(s.trial_record(record) + "\n")
    return record["eval"]


def _aggregate(a):
    return _stages().aggregate(history_in=a.history, finished=[], results_uri=a.results_uri, out_dir=a.out)


def _predict(a):
    return _stages().predict(bundle_uri=a.bundle, inputs=a.inputs, out_dir=a.out)


def _ensemble(a):
    from neumo import ensemble

    made = ensemble.combine(a.members, a.out, policy=a.policy, selection=a.selection, resamples=a.bootstrap,
                            base={"run_id": a.run_id})
    valid = next((r for r in made["eval_rows"] if r["split"] == "valid"), {})
    return {"bundle": a.out, "members": len(a.members), "valid_auc": valid.get("auc"),
            "shift_score": made["shift_score"], "score": made["score"], "threshold": made["threshold"]}


def _compare(a):
    import csv

    from neumo import evaluation

    from neumo import cells, ingest

    def read(folder):
        text = ingest.read_csv_text(os.path.join(folder, "predictions.csv"))
        rows = (cells.unescape_row(r) for r in csv.DictReader(io.StringIO(text)))
        return {(r["split"], r["id"]): r for r in rows if r["split"] == a.split}

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

    return synthetic.write_demo(a.out, per_class=a.per_class, size=a.size, seed=a.seed)


def _demo_data(a):
    """The data of `make demo`: the real Kermany + NIH images when the shared data folder is there,
    else synthetic chest X-rays made once under the output's folder; writes the parameter values
    (dataset_uri, masks_uri, pretrain_uri) as JSON for `--params`."""
    from neumo import synthetic

    shared = a.shared_data or os.environ.get(SHARED_DATA_ENV, "")
    if shared and os.path.isdir(os.path.join(shared, "kermany_224", "train")):
        found = {"dataset_uri": os.path.join(shared, "kermany_224"),
                 "masks_uri": os.path.join(shared, "kermany_224_lung_masks"),
                 "pretrain_uri": os.path.join(shared, "nih_sample")}
        logger.info("demo data: the real images in %s", shared)
    else:
        folder = os.path.join(os.path.dirname(os.path.abspath(a.out)), "synthetic")
        if not os.path.isdir(os.path.join(folder, "images")):
            synthetic.write_demo(folder, per_class=60, size=256, seed=0)
        found = {"dataset_uri": os.path.join(folder, "images"), "masks_uri": os.path.join(folder, "masks"),
                 "pretrain_uri": os.path.join(folder, "nih")}
        logger.info("demo data: no real images at %r; synthetic ones in %s", shared, folder)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(found, fh, indent=2)
    return found


def _reason(err: BaseException) -> str:
    """One line for an error: OSErrors name their file; a KeyError its key."""
    if isinstance(err, KeyError):
        return f"missing key {err.args[0]!r}"
    if isinstance(err, OSError) and err.filename and str(err.filename) not in str(err):
        return f"{err.strerror or err}: {err.filename}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _preset(a):
    return parameters.preset(a.name)


def _add_declared(s: argparse.ArgumentParser, func, values: dict) -> None:
    """An option for each keyword argument of `func` that is a pipeline parameter: its declared
    name, type, meaning, and the (preset's) value as default."""
    for name, arg in inspect.signature(func).parameters.items():
        p = parameters.BY_NAME.get(name)
        if p is None:
            continue
        kind = _json_arg if p.type is dict else p.type
        choices = {"choices": p.choices} if p.choices else {}
        if arg.default is inspect.Parameter.empty and p.type is not dict:  # the stage cannot run without it
            s.add_argument(p.flag, type=kind, required=True, help=p.help, **choices)
        else:
            s.add_argument(p.flag, type=kind, default=values[name], help=f"{p.help} (default: {json.dumps(values[name])})",
                           **choices)


def _add_part(s: argparse.ArgumentParser, gather: str) -> None:
    """--part K --parts N: run one part of a stage split across pods (`neumo GATHER` joins them)."""
    s.add_argument("--part", type=int, default=0, help="this part's number, 0..N-1 (with --parts)")
    s.add_argument("--parts", type=int, default=1, help=f"split the stage into this many parts; `neumo {gather}` "
                   "joins them (default: 1, the whole stage)")


def build_parser(values: dict | None = None) -> argparse.ArgumentParser:
    """The command line; `values`: the parameter values its options default to (the declared ones)."""
    from neumo import stages

    values = values or parameters.defaults()
    p = argparse.ArgumentParser(prog="neumo", description="Chest X-ray pneumonia pipeline stages, one per subcommand.",
                                epilog="Each stage is also a Kubeflow component; see pipelines/full.py.")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--preset", choices=sorted(parameters.PRESETS), default="default",
                   help="take a preset's parameter values as the options' defaults")
    sub = p.add_subparsers(dest="command", required=True, metavar="STAGE")

    def stage(name, func, help_, over=None):
        s = sub.add_parser(name, help=help_, description=help_)
        s.set_defaults(func=func)
        if over is not None:
            _add_declared(s, over, values)
        return s

    s = stage("ingest", _ingest, "validate a dataset: manifest, per-file report, patient-level split", stages.ingest)
    s.add_argument("--valid-fraction", type=float, default=inspect.signature(stages.ingest).parameters[
        "valid_fraction"].default, help="share of the train split's patients held out as the valid fold")
    s.add_argument("--out", required=True)

    s = stage("train-mask-model", _train_mask_model, "train (or import) the lung-mask U-Net; Dice and IoU",
              stages.mask_model)
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)

    s = stage("mask", _mask, "lung masks for every image, QA and a contact sheet")
    s.add_argument("--manifest", required=True)
    s.add_argument("--mask-model", required=True, help="output folder of train-mask-model")
    _add_part(s, "mask-gather")
    s.add_argument("--out", required=True)

    s = stage("mask-gather", _mask_gather, "the mask stage's output from its parts (mask --part K --parts N)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("parts", nargs="+", metavar="PART", help="the parts' output folders, in order 0..N-1")

    s = stage("preprocess", _preprocess, "the seed's preprocessing for one (pixels, mask) variant", stages.preprocess)
    s.add_argument("--manifest", required=True)
    s.add_argument("--masks", default="")
    s.add_argument("--pixels", type=int, required=True)
    s.add_argument("--mask", action="store_true")
    s.add_argument("--workers", type=int, default=0, help="decoding processes (0: one per core)")
    _add_part(s, "preprocess-gather")
    s.add_argument("--out", required=True)

    s = stage("preprocess-gather", _preprocess_gather, "a variant's folder from its parts (preprocess --part K --parts N)")
    s.add_argument("--out", required=True)
    s.add_argument("parts", nargs="+", metavar="PART", help="the parts' output folders, in order 0..N-1")

    s = stage("pretrain", _pretrain, "pretrain the U-Net autoencoder (restoration task) on a variant", stages.pretrain)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)

    s = stage("catalog", _catalog, "pair prepared variants with their pretrained backbones")
    s.add_argument("--variant", nargs=2, action="append", required=True, metavar=("DATA", "BACKBONE"))
    s.add_argument("--out", required=True)

    s = stage("suggest", _suggest, "the next batch of trial configurations (mango)", stages.suggest)
    s.add_argument("--history", default="", help="JSON-lines trial records so far")
    s.add_argument("--history-out", default="")
    s.add_argument("--round", type=int, default=0)
    s.add_argument("--out", required=True)

    s = stage("train", _train, "train one classifier trial", stages.train)
    s.add_argument("--trial", required=True, help="the trial configuration: JSON or @FILE")
    s.add_argument("--catalog", required=True)
    s.add_argument("--out", required=True)

    s = stage("evaluate", _evaluate, "evaluate a trained trial on test, val, test+val and valid", stages.evaluate)
    s.add_argument("--model", required=True)
    s.add_argument("--catalog", required=True)
    s.add_argument("--train-row", required=True, help="the row.json written by train")
    s.add_argument("--history", default="", help="append the trial record to this JSON-lines file")
    s.add_argument("--out", required=True)

    s = stage("aggregate", _aggregate, "the seed's two CSVs at the results URI and an HTML report")
    s.add_argument("--history", required=True)
    s.add_argument("--results-uri", default="")
    s.add_argument("--out", required=True)

    s = stage("predict", _predict, "score image files with a model bundle: predictions.csv (probability, decision "
              "at the bundle's threshold, warnings, reasons), a Grad-CAM overlay per image, index.html")
    s.add_argument("--bundle", required=True, help="the model bundle: RESULTS_URI/models/best, models/RUN_ID or an "
                   "evaluate output's bundle/ (folder or gs://)")
    s.add_argument("--out", required=True, help="the folder to write predictions.csv, gradcam/ and index.html to")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="folders, gs:// prefixes or image files (PNG, JPEG, DICOM)")

    s = stage("ensemble", _ensemble, "average evaluated model bundles into one ensemble bundle: the threshold, "
              "shift score, evaluation and model card of the averaged probabilities; usable by predict and publishing")
    s.add_argument("--out", required=True, help="the folder or gs:// prefix to write the ensemble bundle to")
    s.add_argument("--policy", choices=parameters.BY_NAME["threshold_policy"].choices, default=values["threshold_policy"],
                   help=f"{parameters.BY_NAME['threshold_policy'].help} (default: {values['threshold_policy']})")
    s.add_argument("--selection", choices=parameters.BY_NAME["selection"].choices, default=values["selection"],
                   help=f"the score the ensemble records: shift or auc (default: {values['selection']})")
    s.add_argument("--bootstrap", type=int, default=values["bootstrap"], help=parameters.BY_NAME["bootstrap"].help)
    s.add_argument("--run-id", default="", help="the run id its evaluation rows and score carry")
    s.add_argument("members", nargs="+", metavar="MEMBER", help="member bundles (evaluate outputs' bundle/, "
                   "RESULTS_URI/models/RUN_ID; folders or gs://), evaluated on the same valid fold")

    s = stage("compare", _compare, "paired comparison of two evaluated models: McNemar and paired bootstrap AUC")
    s.add_argument("--a", required=True, help="evaluate output folder of model A (predictions.csv)")
    s.add_argument("--b", required=True, help="evaluate output folder of model B")
    s.add_argument("--split", default="test", help="test, val or valid")
    s.add_argument("--bootstrap", type=int, default=values["bootstrap"], help=parameters.BY_NAME["bootstrap"].help)
    s.add_argument("--seed", type=int, default=values["seed"])

    s = stage("synthetic", _synthetic, "write synthetic chest X-rays (Kaggle and NIH layouts) with lung masks")
    s.add_argument("--per-class", type=int, default=50)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=values["seed"])
    s.add_argument("--out", required=True)

    s = stage("demo-data", _demo_data, "find (or make) the demo's images; write their URIs as pipeline parameters")
    s.add_argument("--shared-data", default="", help=f"the shared data folder (default: ${SHARED_DATA_ENV})")
    s.add_argument("--out", required=True, help="the JSON file of parameters to write (for --params)")

    s = stage("preset", _preset, "print a preset's parameter values as JSON")
    s.add_argument("name", choices=sorted(parameters.PRESETS))
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(parameters.PRESETS), default="default")
    known, _ = first.parse_known_args(argv)
    args = build_parser(parameters.preset(known.preset)).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result = args.func(args)
    except (ValueError, OSError, KeyError) as err:  # a user's mistake: one line naming it (-v: the traceback)
        logger.error("%s: %s", args.command, _reason(err), exc_info=args.verbose)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
