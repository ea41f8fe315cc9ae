"""A single training run, no tuning: the same stages as pipelines/full.py (ingest, masks,
preprocess, pretrain, train, evaluate, aggregate into the seed's CSVs) for one configuration
(the seed's "independent trainings"), reproducible from its seed.

    python pipelines/single.py --config configs/trial.json --compile [PATH]
    python pipelines/single.py --config configs/trial.json --local --set dataset_uri=DATA ...
    python pipelines/single.py --config configs/recommended.json --local --workdir W \
        --set dataset_uri=DATA --set pretrain_uri=NIH          # the recommended model

The configuration file holds the trial's pixels, mask, model, frozen_layers, learning_rate, loss,
augmentation and class_weight, either alone (configs/trial.json) or as {"trial": {...},
"parameters": {...}} with the run's other settings (configs/recommended.json; --params and --set
override them); it is checked and baked into the YAML. With ensemble_size K > 1 the trial is
trained K times (seeds seed .. seed + K - 1) and the run's model is their ensemble. Every other
option is pipelines/full.py's.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import runner  # noqa: E402
from pipelines.full import create_pipeline  # noqa: E402


def main(argv=None) -> int:
    return runner.main(create_pipeline, name="neumo-single", doc=__doc__, argv=argv, single=True)


if __name__ == "__main__":
    sys.exit(main())
