"""Every pipeline parameter and every preset, declared once.

The pipeline's signature (`pipelines/full.py`), the `--set`/`--params` parser of every pipeline
command line (`pipelines/runner.py`), the options of the `neumo` command (`neumo.cli`), the
library's settings classes and the tests all read this module; a test checks that no component,
stage function or command-line option restates a default differently.

Standard library only: a pipeline compiles with nothing but `kfp` installed.

Two kinds of parameter:
- run-time: a parameter of the compiled pipeline (a field in the Kubeflow UI's run form);
- compile-time ("graph"): the shape of the graph, which KFP v2 cannot loop over at run time
  (tuning rounds, trials per round, how many tasks run at once).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

# The research group's search space (their notes: ../shared/docs/ARCHITECTURE.md: pixels, mask,
# model, frozen layers, learning rate, loss, augmentation) plus class weighting, our departure (the
# `seed` preset turns it off). "model" is the classifier head: 1 = squeeze-and-excitation on three
# encoder levels, 2 = global max-pooling. The loss "weighted_bce" is the same as "bce" with
# class_weight true, so it is not in the space (still read from older CSVs).
DEFAULT_SEARCH_SPACE = {
    "pixels": [256, 512], "mask": [False, True], "model": [1, 2], "frozen_layers": [0, 4, 8, 12],
    "learning_rate": [1e-5, 1e-2], "loss": ["bce", "focal"],
    "augmentation": ["none", "light", "strong"], "class_weight": [False, True],
}
#: The seed's own search space: the same dimensions without our class weighting.
SEED_SEARCH_SPACE = {**DEFAULT_SEARCH_SPACE, "class_weight": [False]}


@dataclass(frozen=True)
class Parameter:
    """One parameter: its name everywhere (pipeline, component, stage function, `--set NAME=`,
    `neumo STAGE --NAME`), its type, default and meaning."""

    name: str
    type: type
    default: Any
    help: str
    required: bool = False  # a run must give it (no default in the compiled pipeline)
    graph: bool = False  # compile-time: shapes the graph, not a parameter of the compiled pipeline
    choices: tuple = ()  # the allowed values of a str parameter (empty: any)
    pipelines: tuple = ("train",)  # the pipelines that take it: "train" (full.py, single.py), "predict" (predict.py)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


PARAMETERS: tuple[Parameter, ...] = (
    # data
    Parameter("dataset_uri", str, "", "the labelled images: a folder or gs:// prefix in Kaggle layout "
              "(SPLIT/CLASS/FILE, SPLIT one of train, val, test)", required=True),
    Parameter("results_uri", str, "", "where the two results CSVs accumulate across runs, and trials back up "
              "their training state (folder or gs://)", required=True),
    Parameter("masks_uri", str, "", "lung masks for the dataset's images (masks/SPLIT/CLASS/STEM.png); empty: none"),
    Parameter("pretrain_uri", str, "", "unlabelled chest X-rays for pretraining (NIH flat layout); empty: none"),
    Parameter("mask_model_uri", str, "", "a lung-mask model to import (.keras, or the group's legacy .h5) "
              "instead of training one"),
    Parameter("sample_per_class", int, 0, "use at most this many images per class and split (0: all)"),
    Parameter("seed", int, 0, "seeds the split, every training and the tuner: a run is repeatable"),
    # preprocessing
    Parameter("clahe_clip", float, 0.0, "CLAHE clip limit; 0 = OpenCV's default (40), the group's setting"),
    Parameter("acquisition_copies", int, 1, "extra copies of each train image through a random other "
              "acquisition (tighter field of view, sensor noise), 0-4; our departure, the seed: 0; README: Science"),
    Parameter("acquisition", str, "varied", "what an acquisition copy draws: tight (a tighter field of view at a "
              "random place, sensor noise on half), varied (also a wider view and another aspect ratio, gamma, "
              "contrast and blur; ours, README: Levers for a new site)", choices=("tight", "varied")),
    # lung-mask model
    Parameter("mask_pixels", int, 256, "input size of the lung-mask U-Net"),
    Parameter("mask_epochs", int, 10, "epochs of lung-mask training"),
    Parameter("mask_max_images", int, 0, "train the lung-mask model on at most this many image/mask pairs (0: all)"),
    # backbone
    Parameter("filters", int, 16, "filters of the U-Nets' first level (doubled at each level down)"),
    Parameter("depth", int, 4, "levels of the pretraining U-Net; pixels must halve this many times"),
    Parameter("pretrain_epochs", int, 10, "epochs of autoencoder pretraining"),
    Parameter("pretrain_task", str, "restore", "what the autoencoder learns: restore (corrupted input, clean "
              "target, top skip dropped; ours), identity (input = output, every skip; the seed's), none (random "
              "initialisation, no pretraining)", choices=("restore", "identity", "none")),
    Parameter("pretrain_data", str, "unlabelled+train", "what it learns from: the unlabelled set plus the train "
              "fold's images (labels unused; ours) or the unlabelled set only (the seed's)",
              choices=("unlabelled+train", "unlabelled")),
    # trials
    Parameter("search_space", dict, DEFAULT_SEARCH_SPACE, "values each hyperparameter may take; an override "
              "names only the dimensions it changes"),
    Parameter("config", dict, {}, "one trial configuration to train instead of tuning (pipelines/single.py)"),
    Parameter("epochs", int, 10, "maximum epochs per trial (early stopping on the selection score)"),
    Parameter("batch_size", int, 8, "training batch size (the group's: 8)"),
    Parameter("patience", int, 3, "epochs without a better selection score before a trial stops"),
    Parameter("selection", str, "shift", "the score that picks a trial's best epoch, steers the tuner and chooses "
              "the published model: shift (the worst balanced accuracy at the trial's threshold over the valid fold "
              "as acquired and under each acquisition shift; ours) or auc (the valid AUC; the seed's); README: "
              "Selection", choices=("shift", "auc")),
    Parameter("frozen_layers_count", str, "weighted", "what a trial's frozen_layers counts: the backbone's "
              "weighted layers, convolutions and batch norms apart (ours), or its Keras layers by index, input and "
              "activations included (the seed's model.layers[:n]); README: The backbone", choices=("weighted", "keras")),
    Parameter("threshold_policy", str, "youden", "how a trial's decision threshold is chosen on the valid fold: "
              "youden (max sensitivity + specificity; ours), 0.5 (model.evaluate's; the seed's), sensitivity_0.95 "
              "(the highest threshold keeping sensitivity >= 0.95: a screening aid), pooled_shifts (Youden's J on "
              "the valid images pooled with their acquisition-shifted copies)",
              choices=("youden", "0.5", "sensitivity_0.95", "pooled_shifts")),
    Parameter("ensemble_size", int, 1, "the published model averages this many trials: the run's best K by the "
              "selection score (single.py: K seeds of its configuration); 1: the best trial alone"),
    Parameter("tta_copies", int, 0, "test-time augmentation: average each image's probability over this many "
              "shifted copies besides itself (0-8), in evaluation and prediction"),
    Parameter("bootstrap", int, 1000, "bootstrap resamples for the 95% intervals of every metric"),
    # prediction (pipelines/predict.py; not parameters of the training pipelines)
    Parameter("bundle_uri", str, "", "the model bundle to predict with: RESULTS_URI/models/best (folder or gs://)",
              required=True, pipelines=("predict",)),
    Parameter("images_uri", str, "", "the images to score: a folder or gs:// prefix (PNG, JPEG, DICOM)", required=True,
              pipelines=("predict",)),
    Parameter("predictions_uri", str, "", "where each run's predictions.csv and page go, under RUN_ID/ (folder or "
              "gs://); empty: the run's artifacts only", pipelines=("predict",)),
    Parameter("shards", int, 4, "split the images into at most this many prediction tasks", pipelines=("predict",)),
    # graph shape (compile time)
    Parameter("rounds", int, 5, "tuning rounds: suggest, then that round's trials", graph=True),
    Parameter("trials_per_round", int, 4, "trials suggested per round (mango's batch)", graph=True),
    Parameter("parallelism", int, 4, "tasks of one loop running at once", graph=True, pipelines=("train", "predict")),
    Parameter("preprocess_shards", int, 1, "split preprocessing and lung masking into this many pods per variant "
              "(a ParallelFor over manifest shards, then a gather step); 1: one pod", graph=True),
    Parameter("pretrain_nodes", int, 1, "pretrain each backbone on this many nodes (a Kubeflow Trainer TrainJob "
              "with MultiWorkerMirroredStrategy, manifests/README.md); 1: in the pipeline's own GPU pod", graph=True),
)

BY_NAME = {p.name: p for p in PARAMETERS}


def of(pipeline: str) -> tuple[Parameter, ...]:
    """The parameters `pipeline` takes ("train": full.py and single.py; "predict": predict.py)."""
    return tuple(p for p in PARAMETERS if pipeline in p.pipelines)


#: The training pipelines' parameters: run-time (the compiled pipeline's) and compile-time.
RUN_TIME = tuple(p for p in of("train") if not p.graph)
GRAPH = tuple(p for p in of("train") if p.graph)


def default(name: str) -> Any:
    """The declared default (a copy, so a caller can never change the declaration)."""
    return copy.deepcopy(BY_NAME[name].default)


def defaults(graph: bool | None = None) -> dict:
    """{name: default}; graph=False: run-time only, graph=True: compile-time only."""
    return {p.name: copy.deepcopy(p.default) for p in PARAMETERS if graph is None or p.graph == graph}


# --- presets: named sets of overrides over the declared defaults --------------------------------

PRESETS: dict[str, dict] = {
    # the declared defaults
    "default": {},
    # the research group's experiment as they ran it (README: The group's experiment): identity
    # autoencoder on the unlabelled set only, every skip, their search space without class weights,
    # no acquisition copies, the 0.5 threshold of model.evaluate, frozen layers counted by Keras index
    "seed": {
        "pretrain_task": "identity", "pretrain_data": "unlabelled", "acquisition_copies": 0,
        "threshold_policy": "0.5", "frozen_layers_count": "keras", "search_space": SEED_SEARCH_SPACE,
        "selection": "auc",
    },
    # `make demo`: the whole pipeline in a few minutes on 2 cores (data URIs from `neumo demo-data`)
    "demo": {
        "rounds": 2, "trials_per_round": 2, "parallelism": 2,
        "sample_per_class": 150, "mask_pixels": 128, "mask_epochs": 3, "mask_max_images": 160,
        "pretrain_epochs": 2, "filters": 8, "depth": 3, "epochs": 2, "patience": 2, "bootstrap": 200,
        "search_space": {"pixels": [128], "frozen_layers": [0, 6], "learning_rate": [1e-4, 1e-2]},
    },
    # tests: the smallest settings that still exercise every stage
    "smoke": {
        "rounds": 2, "trials_per_round": 2, "parallelism": 2,
        "mask_pixels": 64, "mask_epochs": 1, "pretrain_epochs": 1, "filters": 4, "depth": 3, "epochs": 1,
        "bootstrap": 20,
        "search_space": {"pixels": [64], "mask": [False], "model": [1, 2], "frozen_layers": [0, 4],
                         "learning_rate": [1e-4, 1e-2], "loss": ["bce", "focal"], "augmentation": ["none", "light"],
                         "class_weight": [False, True]},
    },
}


def preset(name: str) -> dict:
    """The full parameter set of a preset: the declared defaults with its overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return apply(defaults(), PRESETS[name])


# --- parsing: one strict parser for values from a command line, a file or KFP -------------------

def search_space(value: Any, base: dict | None = None) -> dict:
    """A search-space override: dimensions it names replace those of `base` (default: the declared
    space); an unknown dimension is an error naming the allowed ones."""
    if not isinstance(value, dict):
        raise ValueError(f"search_space must be a JSON object of dimensions, got {type(value).__name__}")
    unknown = sorted(set(value) - set(DEFAULT_SEARCH_SPACE))
    if unknown:
        raise ValueError(f"search_space: unknown dimension(s) {unknown}; dimensions: {', '.join(DEFAULT_SEARCH_SPACE)}")
    merged = copy.deepcopy(base if base is not None else DEFAULT_SEARCH_SPACE)
    merged.update(copy.deepcopy(value))
    return {k: merged[k] for k in DEFAULT_SEARCH_SPACE}  # one key order: reproducible YAML


def parse(name: str, value: Any) -> Any:
    """A value for parameter `name`, typed by its declaration: text from `--set` (JSON for dicts),
    or a value from a JSON file or KFP (ints may arrive as integer-valued floats)."""
    if name not in BY_NAME:
        raise ValueError(f"unknown pipeline parameter {name!r}; parameters: {', '.join(sorted(BY_NAME))}")
    kind = BY_NAME[name].type
    try:
        if kind is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
        if kind is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            choices = BY_NAME[name].choices
            if choices and value not in choices:
                raise ValueError(f"expected one of {', '.join(map(repr, choices))}")
            return value
        if isinstance(value, bool):
            raise ValueError("expected a number, not a boolean")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        if kind is int:
            if not number.is_integer():
                raise ValueError("expected an integer")
            return int(number)
        return number
    except (TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"bad value for {name}: {value!r} ({err})") from None


def apply(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` parsed and applied (a search space merged dimension by dimension)."""
    out = copy.deepcopy(base)
    for name, value in overrides.items():
        value = parse(name, value)
        if name == "search_space":
            value = search_space(value, out.get("search_space"))
        out[name] = value
    return out
