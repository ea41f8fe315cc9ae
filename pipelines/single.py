"""A single training run, no tuning: the same stages as pipelines/full.py (ingest, masks,
preprocess, pretrain, train, evaluate, aggregate into the seed's CSVs) for one configuration
(the seed's "independent trainings"), reproducible from its seed.

    python pipelines/single.py --config trial.json --compile [PATH]
    python pipelines/single.py --config trial.json --local --set dataset_uri=DATA ...

trial.json holds pixels, mask, model, frozen_layers, learning_rate, loss, augmentation and
class_weight; every other option is pipelines/full.py's.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import full  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False)
    p.add_argument("--config", required=True, metavar="FILE", help="the trial configuration (JSON)")
    p.add_argument("--compile", nargs="?", const="neumo-single.yaml", metavar="PATH")
    args, rest = p.parse_known_args(argv)
    try:
        config = json.loads(Path(args.config).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"--config {args.config}: cannot read a JSON trial configuration ({err})") from err
    if not isinstance(config, dict):
        raise SystemExit(f"{args.config} must hold a JSON object of the trial's hyperparameters")
    base = ["--rounds", "1", "--trials", "1", "--parallelism", "1", "--name", "neumo-single",
            "--set", f"config={json.dumps(config)}"]
    return full.main(base + (["--compile", args.compile] if args.compile else []) + rest)


if __name__ == "__main__":
    sys.exit(main())
