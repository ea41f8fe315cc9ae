"""Replay the recorded trial table: our mango batch setup against random search at equal budgets.

Each strategy proposes batches of K configurations for R rounds; a proposal is scored by looking
its configuration up in the table (the learning rate snapped to the table's grid on a log scale),
so nothing is trained. Over many seeds it reports the median best-so-far curve and the number of
trials each strategy needs to come within 0.005 AUC of the table's best.

    python -m benchmarks.tuning.replay [--table benchmarks/tuning/trials.csv] [--seeds 30] [--budget 40]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from pathlib import Path

import numpy as np

from neumo import tuning
from neumo.trial import KEYS, SearchSpace, coerce

ROOT = Path(__file__).resolve().parents[2]


def load_table(path: str) -> tuple[dict[tuple, float | None], list[float]]:
    """{config key: score or None (diverged)} over the recorded grid, and its learning rates."""
    from benchmarks.tuning.record import GRID

    table, rates = {}, set()
    with open(path) as fh:
        for r in csv.DictReader(fh):
            if float(r["learning_rate"]) not in GRID["learning_rate"]:
                continue  # rows of an earlier, larger grid
            config = coerce(r, what=f"{path} row")
            rates.add(config["learning_rate"])
            table[tuple(config[k] for k in KEYS)] = float(r["score"]) if r["score"] else None
    return table, sorted(rates)


def space_of(table: dict) -> SearchSpace:
    values = {k: sorted({key[i] for key in table}) for i, k in enumerate(KEYS)}
    lr = values.pop("learning_rate")
    return SearchSpace.from_dict({**values, "learning_rate": [lr[0], lr[-1]]})


def snap(config: dict, rates: list[float]) -> tuple:
    lr = min(rates, key=lambda r: abs(math.log(r) - math.log(config["learning_rate"])))
    return tuple({**config, "learning_rate": lr}[k] for k in KEYS)


def run(strategy: str, table: dict, rates: list[float], space, seed: int, budget: int, batch: int) -> list[float]:
    """Best score so far after each trial (failed trials score as nothing found)."""
    rng = np.random.default_rng(seed)
    history, best, curve = [], -math.inf, []
    untried = sorted(table)
    for round_index in range(math.ceil(budget / batch)):
        if strategy == "mango":
            proposals = [snap(c, rates) for c in tuning.suggest(space, history, batch, seed * 1000 + round_index)]
        else:
            picks = rng.choice(len(untried), min(batch, len(untried)), replace=False)
            proposals = [untried[i] for i in sorted(picks, reverse=True)]
        for key in proposals:
            if key in untried:
                untried.remove(key)
            score = table[key]
            history.append({**dict(zip(KEYS, key)), "score": score})
            best = max(best, score if score is not None else -math.inf)
            curve.append(best)
    return curve[:budget]


def trials_to_reach(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= target), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default=str(ROOT / "benchmarks" / "tuning" / "trials.csv"))
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--plot", default="", help="write the median best-so-far curves to this PNG")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    table, rates = load_table(args.table)
    from benchmarks.tuning.record import grid

    if len(table) != len(grid()):
        raise SystemExit(f"the table holds {len(table)} of the grid's {len(grid())} configurations: "
                         "finish it with python -m benchmarks.tuning.record")
    space = space_of(table)
    scores = [s for s in table.values() if s is not None]
    best = max(scores)
    target = best - args.tolerance
    within = sum(s >= target for s in scores)
    print(f"table: {len(table)} configurations, best AUC {best:.4f}, {within} within {args.tolerance} of it, "
          f"{len(table) - len(scores)} diverged; budget {args.budget} trials in batches of {args.batch}, "
          f"{args.seeds} seeds")
    curves, needed = {}, {}
    for strategy in ("mango", "random"):
        runs = [run(strategy, table, rates, space, seed, args.budget, args.batch) for seed in range(args.seeds)]
        curves[strategy] = np.median(np.array(runs), axis=0)
        reach = [trials_to_reach(c, target) for c in runs]
        needed[strategy] = [r if r is not None else math.inf for r in reach]
        found = sum(r is not None for r in reach)
        print(f"{strategy:>6}: median trials to within {args.tolerance} AUC of the best: "
              f"{np.median(needed[strategy]):.0f} (mean of reached {np.mean([r for r in reach if r]):.1f}; "
              f"reached in {found}/{args.seeds} seeds within {args.budget} trials)")
    print("median best-so-far AUC after n trials:")
    print("   n  " + "  ".join(f"{n:>6d}" for n in range(args.batch, args.budget + 1, args.batch)))
    for strategy, curve in curves.items():
        print(f"{strategy:>6}  " + "  ".join(f"{curve[n - 1]:.4f}" for n in range(args.batch, args.budget + 1, args.batch)))
    ratio = np.median(needed["mango"]) / np.median(needed["random"])
    print(f"ratio of median trials needed, mango / random: {ratio:.2f} (target <= 0.5)")
    if args.plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for strategy, curve in curves.items():
            ax.plot(range(1, len(curve) + 1), curve, label=strategy)
        ax.axhline(target, color="grey", linestyle=":", label=f"best - {args.tolerance}")
        ax.set(xlabel="trials", ylabel="median best validation AUC so far", title="tuning replay")
        ax.legend()
        FigureCanvasAgg(fig).print_png(args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
