"""The tuning replay benchmark on a small made-up table: both strategies stay on the grid."""

import csv
import itertools

from benchmarks.tuning import record, replay


def _table(tmp_path):
    path = tmp_path / "trials.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, record.COLUMNS)
        writer.writeheader()
        for config in record.grid():
            # best: model 2, lr 1e-3, no augmentation; one diverged corner
            score = 0.9 + 0.03 * (config["model"] == 2) + 0.02 * (config["learning_rate"] == 1e-3) \
                - 0.01 * (config["augmentation"] != "none") - 0.001 * config["frozen_layers"] / 8
            diverged = config["learning_rate"] == 1e-2 and config["loss"] == "focal"
            writer.writerow({**config, "score": "" if diverged else score, "epochs": 3, "seconds": 1})
    return str(path)


def test_replay_finds_the_best_on_a_known_table(tmp_path):
    table, rates = replay.load_table(_table(tmp_path))
    assert len(table) == len(record.grid()) and rates == list(record.LEARNING_RATES)
    space = replay.space_of(table)
    best = max(s for s in table.values() if s is not None)
    for strategy in ("mango", "random"):
        curve = replay.run(strategy, table, rates, space, seed=0, budget=24, batch=4)
        assert len(curve) == 24 and all(b >= a for a, b in itertools.pairwise(curve))
    curve = replay.run("random", table, rates, space, seed=0, budget=len(table), batch=4)
    assert curve[-1] == best  # random without repeats covers the whole grid
    assert replay.trials_to_reach([0.1, 0.5, 0.9], 0.5) == 2 and replay.trials_to_reach([0.1], 0.5) is None


def test_snap_picks_the_nearest_rate_on_a_log_scale():
    key = replay.snap({**record.grid()[0], "learning_rate": 2.5e-3}, [1e-4, 1e-3, 1e-2])
    assert key[replay.KEYS.index("learning_rate")] == 1e-3
