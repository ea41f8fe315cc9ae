"""The hyperparameter search space and ask/tell batch suggestions driven by mango (ARM's Bayesian tuner).

mango has no public ask/tell API, so `suggest` drives its internals: `DomainSpace` samples and encodes
candidates (one-hot categoricals, ordered integers), `BayesianLearning` fits its Gaussian-process
surrogate (Matern 2.5) on the finished trials and picks the batch by UCB + k-means clustering, exactly
as `Tuner(batch_size=..., parallel_strategy="clustering")` would, but with our own dedupe against history.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import numbers
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial

import numpy as np

from neumo.data import AUGMENTATIONS  # the augmentations the input pipeline implements

log = logging.getLogger(__name__)

ALLOWED_PIXELS = (64, 128, 256, 512)
MODELS = (1, 2)
LOSSES = ("bce", "weighted_bce", "focal")
KEYS = ("pixels", "mask", "model", "frozen_layers", "learning_rate", "loss", "augmentation", "class_weight")
DISCRETE = tuple(k for k in KEYS if k != "learning_rate")
ORDERED = ("pixels", "frozen_layers")  # kept as ordered integer ranges for mango (pixels as log2)
CATEGORICAL = ("mask", "model", "loss", "augmentation", "class_weight")  # one-hot via string labels

LR_DIGITS = 3  # significant digits of a suggested learning rate (also what dedupe compares)
ALPHA = 2.0  # UCB exploration weight (mango's TunerConfig default)
EXPLORATION, EXPLORATION_DECAY, EXPLORATION_MIN = 0.15, 0.8, 0.05  # chance of a space-filling batch
DOMAIN_SIZE = 20_000  # random candidates drawn per call, scored by the surrogate
MIN_SCORED = 2  # fewer scored trials than this: the batch is space-filling


def _int(x):
    if isinstance(x, (bool, np.bool_)):
        raise TypeError
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real) and float(x).is_integer():
        return int(x)  # KFP's local runner turns ints inside dicts into floats
    raise TypeError


def _bool(x):
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise TypeError


def _str(x):
    if isinstance(x, str):
        return x
    raise TypeError


_FIELDS = {  # name: (parser, allowed values or None, description of the allowed values)
    "pixels": (_int, ALLOWED_PIXELS, f"integers from {ALLOWED_PIXELS}"),
    "mask": (_bool, (False, True), "booleans"),
    "model": (_int, MODELS, f"integers from {MODELS}"),
    "frozen_layers": (_int, None, "integers >= 0"),
    "loss": (_str, LOSSES, f"strings from {LOSSES}"),
    "augmentation": (_str, AUGMENTATIONS, f"strings from {AUGMENTATIONS}"),
    "class_weight": (_bool, (False, True), "booleans"),
}


def _choices(name: str, value) -> tuple:
    parse, allowed, desc = _FIELDS[name]
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"search space {name!r}: expected a non-empty list of {desc}, got {value!r}")
    out = set()
    for x in value:
        try:
            v = parse(x)
        except TypeError:
            raise ValueError(f"search space {name!r}: {x!r} is not one of the allowed {desc}") from None
        if (allowed is not None and v not in allowed) or (allowed is None and v < 0):
            raise ValueError(f"search space {name!r}: {x!r} is not one of the allowed {desc}")
        out.add(v)
    return tuple(sorted(out, key=allowed.index if allowed and isinstance(allowed[0], str) else None))


def _lr_range(value) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    if not ok or not 0 < value[0] < value[1]:
        raise ValueError(f"search space 'learning_rate': expected [low, high] with 0 < low < high, got {value!r}")
    return float(value[0]), float(value[1])


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
    def default(cls) -> SearchSpace:
        return cls((256,), (False, True), (1, 2), (0, 4, 8, 12), (1e-5, 1e-2), LOSSES, AUGMENTATIONS, (False, True))

    @classmethod
    def smoke(cls) -> SearchSpace:
        return cls((64,), (False,), (1, 2), (0, 4), (1e-4, 1e-2), ("bce", "focal"), ("none", "light"), (False, True))


def _parse_loose(key: str, x):
    """History values may come back from CSVs (strings) or KFP (floats for ints)."""
    if key == "learning_rate":
        return float(x)
    if isinstance(x, str) and key in ("mask", "class_weight"):
        if x.strip().lower() not in ("true", "false"):
            raise TypeError
        return x.strip().lower() == "true"
    if isinstance(x, str) and key in ("pixels", "model", "frozen_layers"):
        x = float(x)
    return _FIELDS[key][0](x)


def _coerce_config(config: Mapping) -> dict:
    out = {}
    for k in KEYS:
        if k not in config:
            raise ValueError(f"configuration lacks {k!r}")
        try:
            out[k] = _parse_loose(k, config[k])
        except (TypeError, ValueError):
            raise ValueError(f"configuration has a bad {k!r}: {config[k]!r}") from None
    return out


def _round_lr(lr: float) -> float:
    return float(f"{lr:.{LR_DIGITS}g}")


def config_key(config: Mapping) -> tuple:
    """What makes two configurations the same trial: the discrete values and the rounded learning rate."""
    c = _coerce_config(config)
    c["learning_rate"] = _round_lr(c["learning_rate"])
    return tuple(c[k] for k in KEYS)


def _score(value) -> float | None:
    try:
        s = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return s if s is not None and math.isfinite(s) else None


def _mango_space(space: SearchSpace) -> dict:
    from scipy.stats import uniform

    low, high = (math.log10(v) for v in space.learning_rate)
    d = {k: [f"{k}={v}" for v in getattr(space, k)] for k in CATEGORICAL}
    d["pixels"] = [int(round(math.log2(p))) for p in space.pixels]  # ordered, evenly spaced
    d["frozen_layers"] = list(space.frozen_layers)  # ordered range
    d["learning_rate"] = uniform(low, high - low)  # log10(lr) uniform == lr log-uniform
    return d


def _to_mango(c: Mapping) -> dict:
    d = {k: f"{k}={c[k]}" for k in CATEGORICAL}
    d.update(pixels=int(round(math.log2(c["pixels"]))), frozen_layers=c["frozen_layers"])
    d["learning_rate"] = math.log10(c["learning_rate"])
    return d


def _from_mango(d: Mapping, space: SearchSpace, labels: dict) -> dict:
    out = {k: labels[d[k]] for k in CATEGORICAL}
    low, high = space.learning_rate
    lr = min(max(_round_lr(10 ** float(d["learning_rate"])), low), high)
    out.update(pixels=2 ** int(d["pixels"]), frozen_layers=int(d["frozen_layers"]), learning_rate=lr)
    return {k: out[k] for k in KEYS}


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed numpy's and Python's global generators (mango uses both) and restore them afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _onehot(space: SearchSpace, key: str, configs: list[dict]) -> np.ndarray:
    values = getattr(space, key)
    idx = np.array([values.index(c[key]) for c in configs], dtype=int)
    return np.eye(len(values))[idx] / math.sqrt(2) if len(configs) else np.zeros((0, len(values)))


def _maximin(X: np.ndarray, existing: np.ndarray, strata: np.ndarray, n: int) -> list[int]:
    """Greedy maximin: each pick is the candidate farthest from everything picked or tried, taken
    from a learning-rate stratum not used yet (Latin-hypercube-like coverage of the one continuous axis)."""
    d_min = np.full(len(X), np.inf)
    for row in existing:
        d_min = np.minimum(d_min, np.linalg.norm(X - row, axis=1))
    picked: list[int] = []
    for _ in range(n):
        free = np.isin(strata, strata[picked], invert=True) if picked else np.ones(len(X), bool)
        if not (free & (d_min >= 0)).any():
            free[:] = True  # every stratum used
        i = int(np.argmax(np.where(free, d_min, -np.inf)))
        picked.append(i)
        d_min = np.minimum(d_min, np.linalg.norm(X - X[i], axis=1))
        d_min[picked] = -1.0
    return picked


def suggest(space: SearchSpace, history: list[dict], batch_size: int, seed: int) -> list[dict]:
    """The next `batch_size` trial configurations, given the finished trials (config + "score").

    Deterministic given the arguments; never repeats a history configuration or itself."""
    import warnings

    with warnings.catch_warnings():  # importing mango runs warnings.filterwarnings("ignore"): undo that
        from mango.domain.domain_space import DomainSpace
        from mango.domain.parameter_sampler import parameter_sampler
        from mango.optimizer.bayesian_learning import BayesianLearning
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import MinMaxScaler

    batch_size, seed = _int(batch_size), _int(seed)
    if batch_size < 1 or seed < 0:
        raise ValueError(f"batch_size must be >= 1 and seed >= 0, got {batch_size} and {seed}")
    seen, groups = set(), {}  # groups: config key -> (config, scores of its runs)
    for i, item in enumerate(history):
        try:
            cfg = _coerce_config(item)
        except ValueError as err:
            log.warning("history item %d ignored: %s", i, err)
            continue
        seen.add(key := config_key(cfg))
        if not space.contains(cfg):
            log.warning("history item %d is outside the search space: used only to avoid repeats", i)
            continue
        groups.setdefault(key, (cfg, []))[1].append(_score(item.get("score")))
    tried = [cfg for cfg, _ in groups.values()]
    finite = [s for _, runs in groups.values() for s in runs if s is not None]
    failed = sum(s is None for _, runs in groups.values() for s in runs)
    # A failed trial (score None/NaN) still informs the surrogate: it counts as the worst score
    # observed, so the optimiser steers away from it without distorting the scale of the others.
    # Repeated runs of one configuration are averaged into one point.
    worst = min(finite, default=0.0)
    y = np.array([np.mean([worst if s is None else s for s in runs]) for _, runs in groups.values()])

    derived = int(np.random.SeedSequence([seed, len(history)]).generate_state(1)[0])
    with _seeded(derived), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sampler = partial(parameter_sampler, random_state=np.random.RandomState(derived))
        ds = DomainSpace(_mango_space(space), param_sampler=sampler)
        cands, keys = [], set(seen)
        labels = {f"{k}={v}": v for k in CATEGORICAL for v in getattr(space, k)}
        for d in ds.get_random_sample(DOMAIN_SIZE):
            cfg = _from_mango(d, space, labels)  # typed, like config_key's coercion
            k = tuple(_round_lr(v) if key == "learning_rate" else v for key, v in cfg.items())
            if k not in keys:
                keys.add(k)
                cands.append(cfg)
        if len(cands) < batch_size:
            log.warning("only %d new configurations left in the search space (asked %d)", len(cands), batch_size)
            batch_size = len(cands)
        if batch_size == 0:
            return []
        X_raw = ds.convert_GP_space([_to_mango(c) for c in cands])
        H_raw = ds.convert_GP_space([_to_mango(c) for c in tried]) if tried else X_raw[:0]
        scaler = MinMaxScaler().fit(np.vstack([X_raw, H_raw]))
        X, H = scaler.transform(X_raw), scaler.transform(H_raw) if tried else X_raw[:0]

        rounds = math.ceil(len(tried) / batch_size)
        exploration = max(EXPLORATION_MIN, EXPLORATION * EXPLORATION_DECAY**rounds)
        if len(finite) < MIN_SCORED or random.random() < exploration:
            low, high = space.learning_rate
            u = np.array([math.log(c["learning_rate"] / low) / math.log(high / low) for c in cands])
            strata = np.minimum((u * batch_size).astype(int), batch_size - 1)
            # ordered values also one-hot here, so maximin covers the middle values, not only the ends
            F = np.hstack([X] + [_onehot(space, k, cands) for k in ORDERED])
            G = np.hstack([H] + [_onehot(space, k, tried) for k in ORDERED])
            mode, picked = "space-filling", _maximin(F, G, strata, batch_size)
        else:
            mode, opt = "bayesian", BayesianLearning(alpha=ALPHA, domain_size=len(X))
            picked = []
            if batch_size > 1 and len(X) // 4 >= batch_size:
                rows = opt.get_next_batch_clustering(H, y.reshape(-1, 1), X, batch_size)
                picked = list(dict.fromkeys(int(np.abs(X - r).sum(axis=1).argmin()) for r in rows))
            else:
                opt.fit(H, y.reshape(-1, 1))
            ucb = opt.Get_Upper_Confidence_Bound(X).ravel()  # top up (or fill) by acquisition value
            for i in np.argsort(-ucb, kind="stable")[: 2 * batch_size]:
                if len(picked) < batch_size and int(i) not in picked:
                    picked.append(int(i))
    log.info("suggest: %d in history (%d scored, %d failed), %s batch of %d (exploration %.2f)",
             len(history), len(finite), failed, mode, len(picked), exploration)
    return [dict(cands[i]) for i in picked]
