"""Ask/tell batch suggestions over the search space (`neumo.trial.SearchSpace`), driven by mango
(ARM's Bayesian tuner).

mango has no public ask/tell API, so `suggest` drives its internals: `DomainSpace` samples and encodes
candidates (one-hot categoricals, ordered integers), `BayesianLearning` fits its Gaussian-process
surrogate (Matern 2.5) on the finished trials and picks the batch by UCB + k-means clustering, exactly
as `Tuner(batch_size=..., parallel_strategy="clustering")` would, but with our own dedupe against history.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import warnings
from collections.abc import Mapping
from functools import partial

import numpy as np

from neumo.trial import DISCRETE  # noqa: F401  re-export: tests/test_tuning.py reads tuning.DISCRETE
from neumo.trial import KEYS, SearchSpace, coerce, parse_int

log = logging.getLogger(__name__)

ORDERED = ("pixels", "frozen_layers")  # kept as ordered integer ranges for mango (pixels as log2)
CATEGORICAL = ("mask", "model", "loss", "augmentation", "class_weight")  # one-hot via string labels

LR_DIGITS = 3  # significant digits of a suggested learning rate (also what dedupe compares)
ALPHA = 2.0  # UCB exploration weight (mango's TunerConfig default)
EXPLORATION, EXPLORATION_DECAY, EXPLORATION_MIN = 0.15, 0.8, 0.05  # chance of a space-filling batch
DOMAIN_SIZE = 20_000  # random candidates drawn per call, scored by the surrogate
MIN_SCORED = 2  # fewer scored trials than this: the batch is space-filling
CLUSTERED_SHARE = 4  # mango k-means-clusters the best 1/4 of the candidates into batch_size clusters
# Two different one-hot rows are sqrt(2) apart: divided by it, a changed value weighs 1, the full
# range of a min-max-scaled column, so no ordered key outweighs the others in maximin distances.
ONEHOT_DISTANCE = math.sqrt(2)
TOP_UP = 2  # a top-up reads the best TOP_UP * batch_size by UCB: at most batch_size of them are picked


def _round_lr(lr: float) -> float:
    return float(f"{lr:.{LR_DIGITS}g}")


def _key(config: Mapping) -> tuple:
    """config_key of an already typed configuration."""
    return tuple(_round_lr(config[k]) if k == "learning_rate" else config[k] for k in KEYS)


def config_key(config: Mapping) -> tuple:
    """What makes two configurations the same trial: the discrete values and the rounded learning rate."""
    return _key(coerce(config))


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
    return np.eye(len(values))[idx] / ONEHOT_DISTANCE if len(configs) else np.zeros((0, len(values)))


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


def _import_mango() -> None:
    """Import mango and the scaler before the seeded block (only a first import runs module code),
    undoing the warnings.filterwarnings("ignore") that importing mango runs."""
    with warnings.catch_warnings():
        import mango.domain.domain_space  # noqa: F401
        import mango.domain.parameter_sampler  # noqa: F401
        import mango.optimizer.bayesian_learning  # noqa: F401
    import sklearn.preprocessing  # noqa: F401


def _group_history(space: SearchSpace, history: list[dict]) -> tuple[set, list[dict], np.ndarray, list, int]:
    """The finished trials as the surrogate sees them: (the keys of every readable configuration,
    never to be repeated; the distinct ones inside the space; their mean scores y; the finite
    scores; the number of failed runs)."""
    seen, groups = set(), {}  # groups: config key -> (config, scores of its runs)
    for i, item in enumerate(history):
        try:
            cfg = coerce(item)
        except ValueError as err:
            log.warning("history item %d ignored: %s", i, err)
            continue
        seen.add(key := _key(cfg))
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
    return seen, tried, y, finite, failed


def _candidates(space: SearchSpace, seen: set, seed: int):
    """mango's domain space and up to DOMAIN_SIZE distinct random configurations (typed, like
    config_key's coercion) that are not in `seen`, in the order drawn."""
    from mango.domain.domain_space import DomainSpace
    from mango.domain.parameter_sampler import parameter_sampler

    sampler = partial(parameter_sampler, random_state=np.random.RandomState(seed))
    ds = DomainSpace(_mango_space(space), param_sampler=sampler)
    cands, keys = [], set(seen)
    labels = {f"{k}={v}": v for k in CATEGORICAL for v in getattr(space, k)}
    for d in ds.get_random_sample(DOMAIN_SIZE):
        cfg = _from_mango(d, space, labels)
        if (k := _key(cfg)) not in keys:
            keys.add(k)
            cands.append(cfg)
    return ds, cands


def _encode(ds, cands: list[dict], tried: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Candidates X and tried configurations H in mango's GP space, min-max scaled together."""
    from sklearn.preprocessing import MinMaxScaler

    X_raw = ds.convert_GP_space([_to_mango(c) for c in cands])
    H_raw = ds.convert_GP_space([_to_mango(c) for c in tried]) if tried else X_raw[:0]
    scaler = MinMaxScaler().fit(np.vstack([X_raw, H_raw]))
    return scaler.transform(X_raw), scaler.transform(H_raw) if tried else X_raw[:0]


def _exploration(n_tried: int, batch_size: int) -> float:
    """The chance of a space-filling batch: decays with the rounds of this size the history makes."""
    rounds = math.ceil(n_tried / batch_size)
    return max(EXPLORATION_MIN, EXPLORATION * EXPLORATION_DECAY**rounds)


def _space_filling_batch(space: SearchSpace, X, H, cands: list[dict], tried: list[dict], batch_size: int) -> list[int]:
    """Indices of a maximin batch: far from each other and from the tried, one per learning-rate stratum."""
    low, high = space.learning_rate
    u = np.array([math.log(c["learning_rate"] / low) / math.log(high / low) for c in cands])
    strata = np.minimum((u * batch_size).astype(int), batch_size - 1)
    # ordered values also one-hot here, so maximin covers the middle values, not only the ends
    F = np.hstack([X] + [_onehot(space, k, cands) for k in ORDERED])
    G = np.hstack([H] + [_onehot(space, k, tried) for k in ORDERED])
    return _maximin(F, G, strata, batch_size)


def _bayesian_batch(X, H, y: np.ndarray, batch_size: int) -> list[int]:
    """Indices of mango's batch: its GP fitted on (H, y), UCB + k-means clustering as
    Tuner(parallel_strategy="clustering") does, topped up by UCB where clusters coincide."""
    from mango.optimizer.bayesian_learning import BayesianLearning

    opt = BayesianLearning(alpha=ALPHA, domain_size=len(X))
    picked = []
    if batch_size > 1 and len(X) // CLUSTERED_SHARE >= batch_size:
        rows = opt.get_next_batch_clustering(H, y.reshape(-1, 1), X, batch_size)
        picked = list(dict.fromkeys(int(np.abs(X - r).sum(axis=1).argmin()) for r in rows))
    else:
        opt.fit(H, y.reshape(-1, 1))
    ucb = opt.Get_Upper_Confidence_Bound(X).ravel()  # top up (or fill) by acquisition value
    for i in np.argsort(-ucb, kind="stable")[: TOP_UP * batch_size]:
        if len(picked) < batch_size and int(i) not in picked:
            picked.append(int(i))
    return picked


def suggest(space: SearchSpace, history: list[dict], batch_size: int, seed: int) -> list[dict]:
    """The next `batch_size` trial configurations, given the finished trials (config + "score").

    Deterministic given the arguments; never repeats a history configuration or itself."""
    from sklearn.exceptions import ConvergenceWarning

    batch_size = parse_int(batch_size, "batch_size", what="suggest", loose=False, minimum=1)
    seed = parse_int(seed, "seed", what="suggest", loose=False, minimum=0)
    _import_mango()
    seen, tried, y, finite, failed = _group_history(space, history)
    derived = int(np.random.SeedSequence([seed, len(history)]).generate_state(1)[0])  # afresh each round
    with _seeded(derived), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ds, cands = _candidates(space, seen, derived)
        if len(cands) < batch_size:
            log.warning("only %d new configurations left in the search space (asked %d)", len(cands), batch_size)
            batch_size = len(cands)
        if batch_size == 0:
            return []
        X, H = _encode(ds, cands, tried)
        exploration = _exploration(len(tried), batch_size)
        if len(finite) < MIN_SCORED or random.random() < exploration:
            mode, picked = "space-filling", _space_filling_batch(space, X, H, cands, tried, batch_size)
        else:
            mode, picked = "bayesian", _bayesian_batch(X, H, y, batch_size)
    log.info("suggest: %d in history (%d scored, %d failed), %s batch of %d (exploration %.2f)",
             len(history), len(finite), failed, mode, len(picked), exploration)
    return [dict(cands[i]) for i in picked]
