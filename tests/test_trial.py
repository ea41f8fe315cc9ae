"""The trial vocabulary and its one parser (shared/neumo/trial.py): each rule's good and ill values."""

import math
from collections import UserList
from dataclasses import asdict, fields

import numpy as np
import pytest

from neumo import trial
from neumo.trial import KEYS, SearchSpace, TrialConfig, coerce, parse_bool, parse_choice, parse_float, parse_int

GOOD = {"pixels": 64, "mask": False, "model": 1, "frozen_layers": 0, "learning_rate": 1e-3, "loss": "bce",
        "augmentation": "none", "class_weight": False}


# ----------------------------------------------------------------------------- one rule per kind


@pytest.mark.parametrize("value,expected", [
    (64, 64), (64.0, 64), ("64", 64), ("64.0", 64), (" 64 ", 64), (np.int64(8), 8), (np.float32(8.0), 8),
    (0, 0), ("-3", -3), (str(2**70), 2**70),
])
def test_parse_int_accepts(value, expected):
    out = parse_int(value, "n")
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value", [
    True, False, np.True_, 64.5, "64.5", "sixty-four", "", math.inf, -math.inf, math.nan, "Infinity", "nan",
    None, [64], {"pixels": 64}, (64,),
])
def test_parse_int_rejects_naming_the_key(value):
    with pytest.raises(ValueError, match=r"^trial configuration: n must be an integer, got "):
        parse_int(value, "n")


def test_parse_int_strict_refuses_strings_and_checks_the_minimum():
    assert parse_int(64.0, "n", loose=False) == 64
    with pytest.raises(ValueError, match="n must be an integer, got '64'"):
        parse_int("64", "n", loose=False)
    with pytest.raises(ValueError, match=r"^search space: n must be >= 1, got 0$"):
        parse_int(0, "n", what="search space", minimum=1)


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (np.True_, True), (np.bool_(False), False), (1, True), (0, False),
    (np.int64(1), True), ("true", True), ("false", False), ("TRUE", True), ("False", False), ("1", True),
    ("0", False), ("yes", True), ("no", False), ("Yes", True), ("on", True), ("OFF", False), (" true ", True),
])
def test_parse_bool_accepts(value, expected):
    out = parse_bool(value, "mask")
    assert out is expected


@pytest.mark.parametrize("value", ["maybe", "", "t", "2", 2, -1, 0.5, 1.0, None, [True], {}, math.nan])
def test_parse_bool_rejects_naming_the_key_and_allowed_values(value):
    with pytest.raises(ValueError, match=r"^trial configuration: mask must be a boolean \(true/false\), got "):
        parse_bool(value, "mask")


def test_parse_bool_strict_takes_only_bools():
    assert parse_bool(np.True_, "mask", loose=False) is True
    for value in (1, 0, "true", "false"):
        with pytest.raises(ValueError, match="mask must be a boolean"):
            parse_bool(value, "mask", loose=False)


@pytest.mark.parametrize("value,expected", [
    (1e-3, 1e-3), (1, 1.0), ("1e-3", 1e-3), (" 0.01 ", 0.01), (np.float32(0.5), 0.5), (np.int64(2), 2.0), (-2.5, -2.5),
])
def test_parse_float_accepts(value, expected):
    out = parse_float(value, "x")
    assert out == pytest.approx(expected) and type(out) is float


@pytest.mark.parametrize("value,match", [
    (math.inf, "must be a finite number"), (-math.inf, "must be a finite number"), (math.nan, "must be a finite number"),
    ("Infinity", "must be a finite number"), ("nan", "must be a finite number"), (10**400, "must be a finite number"),
    (True, "must be a number"), (None, "must be a number"), ([1e-3], "must be a number"), ("fast", "must be a number"),
    ({}, "must be a number"),
])
def test_parse_float_rejects(value, match):
    with pytest.raises(ValueError, match=rf"^trial configuration: x {match}, got "):
        parse_float(value, "x")


@pytest.mark.parametrize("value", [0, -1e-3, 0.0, "0", math.nan, "NaN", -math.inf])
def test_parse_float_positive(value):
    with pytest.raises(ValueError, match=r"learning_rate must be > 0, got "):
        parse_float(value, "learning_rate", positive=True)


def test_parse_float_strict_refuses_strings():
    with pytest.raises(ValueError, match="must be a number, got '1e-3'"):
        parse_float("1e-3", "x", loose=False)


@pytest.mark.parametrize("value,allowed,expected", [
    ("bce", trial.LOSSES, "bce"), (128, trial.ALLOWED_PIXELS, 128), (128.0, trial.ALLOWED_PIXELS, 128),
    ("128", trial.ALLOWED_PIXELS, 128), (2, trial.MODELS, 2), (np.str_("light"), trial.AUGMENTATIONS, "light"),
])
def test_parse_choice_accepts(value, allowed, expected):
    out = parse_choice(value, "k", allowed)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value,allowed,match", [
    ("mse", trial.LOSSES, r"k must be one of \('bce', 'weighted_bce', 'focal'\), got 'mse'"),
    ("BCE", trial.LOSSES, r"k must be one of \('bce'"),  # strings are compared exactly
    (1, trial.LOSSES, r"k must be one of \('bce'"),
    (None, trial.LOSSES, r"k must be one of"),
    (["bce"], trial.LOSSES, r"k must be one of"),
    (100, trial.ALLOWED_PIXELS, r"k must be one of \(64, 128, 256, 512\), got 100"),
    (64.5, trial.ALLOWED_PIXELS, r"k must be an integer, one of \(64, 128, 256, 512\), got 64.5"),
    (3, trial.MODELS, r"k must be 1 or 2, got 3"),
    (True, trial.MODELS, r"k must be an integer, 1 or 2, got True"),  # True == 1, but is no model number
])
def test_parse_choice_rejects_naming_the_allowed_values(value, allowed, match):
    with pytest.raises(ValueError, match=match):
        parse_choice(value, "k", allowed)


# ----------------------------------------------------------------------------- coerce


def test_coerce_types_every_key_and_ignores_extra_keys():
    loose = {"pixels": "64", "mask": "false", "model": 2.0, "frozen_layers": "4.0", "learning_rate": "3e-3",
             "loss": "focal", "augmentation": "light", "class_weight": "TRUE", "round": 1, "trial": 0, "score": ""}
    out = coerce(loose)
    assert out == {"pixels": 64, "mask": False, "model": 2, "frozen_layers": 4, "learning_rate": 3e-3,
                   "loss": "focal", "augmentation": "light", "class_weight": True}
    assert list(out) == list(KEYS)
    assert [type(v) for v in out.values()] == [int, bool, int, int, float, str, str, bool]
    assert coerce(GOOD) == GOOD


@pytest.mark.parametrize("change,match", [
    ({"mask": "maybe"}, r"^trial configuration: mask must be a boolean \(true/false\), got 'maybe'$"),
    ({"class_weight": None}, r"class_weight must be a boolean"),
    ({"pixels": True}, r"pixels must be an integer"),
    ({"pixels": [64]}, r"pixels must be an integer"),
    ({"pixels": 100}, r"pixels must be one of \(64, 128, 256, 512\)"),
    ({"model": 3}, r"model must be 1 or 2"),
    ({"frozen_layers": -1}, r"frozen_layers must be >= 0"),
    ({"frozen_layers": "four"}, r"frozen_layers must be an integer"),
    ({"learning_rate": math.inf}, r"learning_rate must be a finite number"),
    ({"learning_rate": "Infinity"}, r"learning_rate must be a finite number"),
    ({"learning_rate": math.nan}, r"learning_rate must be > 0"),
    ({"learning_rate": 0}, r"learning_rate must be > 0, got 0"),
    ({"learning_rate": {"value": 1e-3}}, r"learning_rate must be a number"),
    ({"loss": "hinge"}, r"loss must be one of \('bce', 'weighted_bce', 'focal'\)"),
    ({"augmentation": None}, r"augmentation must be one of \('none', 'light', 'strong'\)"),
])
def test_coerce_rejects_with_a_value_error_naming_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        coerce({**GOOD, **change})


def test_coerce_names_missing_keys_and_refuses_non_mappings():
    partial = {k: v for k, v in GOOD.items() if k not in ("loss", "mask")}
    with pytest.raises(ValueError, match=r"^trial configuration lacks 'mask', 'loss'$"):
        coerce(partial)
    with pytest.raises(ValueError, match=r"^history row 3 lacks 'pixels'"):
        coerce({}, what="history row 3")
    for bad in (None, [GOOD], "pixels=64"):
        with pytest.raises(ValueError, match="expected a dict with keys"):
            coerce(bad)


# ----------------------------------------------------------------------------- TrialConfig and the module


def test_trial_config_from_dict_uses_coerce():
    cfg = TrialConfig.from_dict({**GOOD, "pixels": 64.0, "mask": "false", "class_weight": "1", "round": 2})
    assert asdict(cfg) == {**GOOD, "class_weight": True}
    assert cfg.mask is False  # bool("false") would have been True
    with pytest.raises(ValueError, match="trial configuration lacks 'loss'"):
        TrialConfig.from_dict({k: v for k, v in GOOD.items() if k != "loss"})


def test_search_space_takes_any_sequence_but_no_string():
    """A compiled pipeline's default comes back as protobuf lists: sequences, not lists."""
    d = SearchSpace.preset("smoke").to_dict()
    assert SearchSpace.from_dict({k: UserList(v) for k, v in d.items()}) == SearchSpace.preset("smoke")
    for bad in ({**d, "loss": "bce"}, {**d, "learning_rate": "ab"}, {**d, "mask": b"\x01"}):
        with pytest.raises(ValueError, match="search space"):
            SearchSpace.from_dict(bad)


def test_vocabulary_is_stated_once():
    assert tuple(f.name for f in fields(TrialConfig)) == KEYS == tuple(trial.FIELDS)
    from neumo import data, tuning

    assert data.AUGMENTATIONS is trial.AUGMENTATIONS and tuning.KEYS is KEYS
