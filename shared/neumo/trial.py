"""The trial vocabulary: the eight hyperparameters of one classifier trial, their allowed values,
the one strict parser every module reads a trial configuration with, and the search space.

Configurations arrive from KFP (whose local runner turns ints into floats), CSV tables (strings
everywhere, Excel's TRUE) and people; :func:`coerce` turns any of these into typed values or
raises a ValueError naming the key and what it allows. The `parse_*` functions are its rules, one
per kind of value, for other modules' parameters too. Standard library only: compiling and
submitting a pipeline validate with this module.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

from neumo import parameters

ALLOWED_PIXELS = (64, 128, 256, 512)
MODELS = (1, 2)  # the classifier heads models.build_classifier builds
LOSSES = ("bce", "weighted_bce", "focal")
AUGMENTATIONS = ("none", "light", "strong")  # the augmentations neumo.data implements

WHAT = "trial configuration"  # what an error message says was being read
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class Field(NamedTuple):
    """One hyperparameter: its type and allowed values, stated once."""

    kind: type  # int, bool, float or str
    allowed: tuple | None  # the allowed values; None: a range (ints >= 0, floats > 0)
    words: str  # the allowed values in words, plural (messages about lists of them)


FIELDS = {
    "pixels": Field(int, ALLOWED_PIXELS, f"integers from {ALLOWED_PIXELS}"),
    "mask": Field(bool, (False, True), "booleans"),
    "model": Field(int, MODELS, f"integers from {MODELS}"),
    "frozen_layers": Field(int, None, "integers >= 0"),
    "learning_rate": Field(float, None, "finite numbers > 0"),
    "loss": Field(str, LOSSES, f"strings from {LOSSES}"),
    "augmentation": Field(str, AUGMENTATIONS, f"strings from {AUGMENTATIONS}"),
    "class_weight": Field(bool, (False, True), "booleans"),
}
KEYS = tuple(FIELDS)
DISCRETE = tuple(k for k in KEYS if k != "learning_rate")


def _is_bool(value) -> bool:
    """A Python or numpy bool (numpy is not imported here: it is recognised by its type's name)."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def _one_of(allowed: tuple) -> str:
    return f"{allowed[0]!r} or {allowed[1]!r}" if len(allowed) == 2 else f"one of {allowed}"


def _number(text: str) -> int | float | None:
    """The number a string spells (int when it is one, so big ints stay exact), else None."""
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    return None


def parse_int(value, name: str, *, what: str = WHAT, loose: bool = True, minimum: int | None = None) -> int:
    """An int (not a bool), an integer-valued finite float (KFP's local runner sends ints as
    floats) or, when loose, a string of one ("64", "64.0"); at least `minimum` if given."""
    number = _number(value) if loose and isinstance(value, str) else value
    if _is_bool(number) or not isinstance(number, numbers.Real):
        number = None
    elif not isinstance(number, numbers.Integral):
        number = int(number) if math.isfinite(number) and float(number).is_integer() else None
    if number is None:
        raise ValueError(f"{what}: {name} must be an integer, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{what}: {name} must be >= {minimum}, got {value!r}")
    return int(number)


def parse_bool(value, name: str, *, what: str = WHAT, loose: bool = True) -> bool:
    """A bool (Python or numpy) or, when loose, 0/1 or a string true/false, yes/no, on/off, 1/0
    in any case (`bool("false")` is True: never used)."""
    if _is_bool(value):
        return bool(value)
    if loose and isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if loose and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{what}: {name} must be a boolean (true/false), got {value!r}")


def parse_float(value, name: str, *, what: str = WHAT, loose: bool = True, positive: bool = False) -> float:
    """A finite int or float (not a bool) or, when loose, a string of one; > 0 if `positive`."""
    number = _number(value) if loose and isinstance(value, str) else value
    if _is_bool(number) or not isinstance(number, numbers.Real):
        raise ValueError(f"{what}: {name} must be a number, got {value!r}")
    if positive and not number > 0:  # NaN fails this too
        raise ValueError(f"{what}: {name} must be > 0, got {value!r}")
    try:
        number = float(number)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{what}: {name} must be a finite number, got {value!r}")
    return number


def parse_choice(value, name: str, allowed: tuple, *, what: str = WHAT, loose: bool = True):
    """One of `allowed` (all ints or all strings): ints parsed as by :func:`parse_int`, strings
    compared exactly (case and spaces count)."""
    if all(isinstance(a, int) for a in allowed):
        try:
            parsed = parse_int(value, name, what=what, loose=loose)
        except ValueError:
            raise ValueError(f"{what}: {name} must be an integer, {_one_of(allowed)}, got {value!r}") from None
    else:
        parsed = value if isinstance(value, str) else None
    if parsed is None or parsed not in allowed:
        raise ValueError(f"{what}: {name} must be {_one_of(allowed)}, got {value!r}")
    return allowed[allowed.index(parsed)]  # the allowed value itself: a str, not a numpy.str_


def parse_field(key: str, value, *, what: str = WHAT, loose: bool = True):
    """One hyperparameter's value, typed and checked against :data:`FIELDS`."""
    field = FIELDS[key]
    if field.kind is bool:
        return parse_bool(value, key, what=what, loose=loose)
    if field.kind is float:
        return parse_float(value, key, what=what, loose=loose, positive=True)
    if field.allowed is None:
        return parse_int(value, key, what=what, loose=loose, minimum=0)
    return parse_choice(value, key, field.allowed, what=what, loose=loose)


def coerce(mapping: Mapping, *, what: str = WHAT) -> dict:
    """The typed values of the eight :data:`KEYS` of a configuration; other keys ("round",
    "trial", "score") are ignored. A missing or ill value is a ValueError naming the key."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{what}: expected a dict with keys {KEYS}, got {type(mapping).__name__}")
    missing = [k for k in KEYS if k not in mapping]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(map(repr, missing))}")
    return {k: parse_field(k, mapping[k], what=what) for k in KEYS}


@dataclass(frozen=True)
class TrialConfig:
    """One trial: the tuned hyperparameters of the seed plus class weighting."""

    pixels: int
    mask: bool
    model: int
    frozen_layers: int
    learning_rate: float
    loss: str
    augmentation: str
    class_weight: bool

    @classmethod
    def from_dict(cls, d: Mapping) -> TrialConfig:
        """Validated at the edge by :func:`coerce` (extra keys are ignored)."""
        return cls(**coerce(d))

    def to_dict(self) -> dict:
        return asdict(self)


# --- the search space ---------------------------------------------------------------------------

def _choices(name: str, value) -> tuple:
    field = FIELDS[name]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:  # a list, tuple, protobuf list
        raise ValueError(f"search space {name!r}: expected a non-empty list of {field.words}, got {value!r}")
    out = set()
    for x in value:
        try:  # strict: a search space is written by hand or by code, not read back from a CSV
            out.add(parse_field(name, x, what="search space", loose=False))
        except ValueError:
            raise ValueError(f"search space {name!r}: {x!r} is not one of the allowed {field.words}") from None
    return tuple(sorted(out, key=field.allowed.index if field.kind is str else None))


def _lr_range(value) -> tuple[float, float]:
    bad = ValueError(f"search space 'learning_rate': expected [low, high] with 0 < low < high, got {value!r}")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise bad
    try:
        low, high = (parse_float(x, "learning_rate", what="search space", loose=False, positive=True) for x in value)
    except ValueError:
        raise bad from None
    if not low < high:
        raise bad
    return low, high


@dataclass(frozen=True)
class SearchSpace:
    """Allowed choices per hyperparameter; the learning rate is a (low, high) range sampled log-uniformly."""

    pixels: tuple[int, ...]
    mask: tuple[bool, ...]
    model: tuple[int, ...]
    frozen_layers: tuple[int, ...]
    learning_rate: tuple[float, float]
    loss: tuple[str, ...]
    augmentation: tuple[str, ...]
    class_weight: tuple[bool, ...]

    def __post_init__(self):  # validate and canonicalise (sorted, deduplicated tuples) however built
        for name in DISCRETE:
            object.__setattr__(self, name, _choices(name, getattr(self, name)))
        object.__setattr__(self, "learning_rate", _lr_range(self.learning_rate))

    @classmethod
    def from_dict(cls, d: Mapping) -> SearchSpace:
        if not isinstance(d, Mapping):
            raise ValueError(f"search space: expected a dict with keys {KEYS}, got {type(d).__name__}")
        unknown = sorted(set(d) - set(KEYS), key=str)
        if unknown:
            raise ValueError(f"search space: unknown parameter(s) {unknown}; allowed: {KEYS}")
        missing = [k for k in KEYS if k not in d]
        if missing:
            raise ValueError(f"search space: missing parameter(s) {missing}; all of {KEYS} are required")
        return cls(**{k: d[k] for k in KEYS})

    def to_dict(self) -> dict:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    def variants(self) -> list[dict]:
        """The (pixels, mask) preprocessing variants the trials need, sorted."""
        return [{"pixels": p, "mask": m} for p, m in itertools.product(self.pixels, self.mask)]

    def size(self) -> int:
        """Number of discrete combinations (the learning rate not counted)."""
        return math.prod(len(getattr(self, k)) for k in DISCRETE)

    def contains(self, config: Mapping) -> bool:
        low, high = self.learning_rate
        in_lr = low * (1 - 1e-9) <= config["learning_rate"] <= high * (1 + 1e-9)
        return in_lr and all(config[k] in getattr(self, k) for k in DISCRETE)

    @classmethod
    def preset(cls, name: str = "default") -> SearchSpace:
        """The search space of a preset (neumo.parameters.PRESETS; "default": the declared one)."""
        return cls.from_dict(parameters.preset(name)["search_space"])
