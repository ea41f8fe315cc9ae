"""The science benchmark's bookkeeping: cross-fitted thresholds and the summary over seeds."""

import json

import numpy as np

from benchmarks import science


def test_crossfit_judges_each_half_at_the_other_halfs_threshold():
    targets = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    halves = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # half 0 separates at 0.5, half 1 at 0.8: each half is judged at the other's threshold
    clean = np.array([0.1, 0.4, 0.6, 0.9, 0.6, 0.7, 0.9, 0.95])
    out = science._crossfit(targets, clean, clean, halves)
    # half 1 judged at half 0's threshold (0.6): both of its normals (0.6, 0.7) are called pneumonia
    # half 0 judged at half 1's (0.9): its 0.6 pneumonia is missed
    assert out == {"sensitivity": 0.75, "specificity": 0.5}
    shifted = clean + 0.6  # a shift that lifts every score: specificity falls further
    assert science._crossfit(targets, clean, shifted, halves)["specificity"] == 0.25


def _best(copies, seed, auc, spec, drops):
    shifts = {name: {"specificity_drop": d, "auc_drop": d / 10, "crossfit": {"specificity": spec - d}}
              for name, d in drops.items()}
    return {"best": {"acquisition_copies": copies, "seed": seed, "valid": {"auc": auc, "specificity": spec,
                                                                           "sensitivity": 0.9}, "shifts": shifts}}


def test_summary_groups_by_copies_with_mean_and_range(tmp_path):
    paths = []
    for i, (copies, seed, drop) in enumerate([(0, 0, 0.2), (0, 1, 0.1), (1, 0, 0.02)]):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(_best(copies, seed, 0.99, 0.97, {"noise": drop, "zoom 0.85": drop / 2, "blur": 0.0})))
        paths.append(str(path))
    table = science.summarise(paths).splitlines()
    assert len(table) == 4
    assert table[2].startswith("| 0 | 2 (0, 1) | 0.990 (0.990-0.990)") and "| 0.150 (0.100-0.200) |" in table[2]
    assert table[3].startswith("| 1 | 1 (0) |") and "0.020 (0.020-0.020)" in table[3]
