"""Local runs a person can follow: `pipelines/full.py --local` shows the project's lines and "task k
of n", writes everything to a log file it names, ends a failure with the failed task and its
reason, and starts no task after a failure."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kfp import dsl

from tests.conftest import REPO_ROOT

FULL = str(REPO_ROOT / "pipelines" / "full.py")


def _run(tmp_path, *args, timeout=900):
    """`pipelines/full.py --local` as a person runs it: (exit status, the lines it printed)."""
    done = subprocess.run([sys.executable, FULL, "--local", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, cwd=tmp_path)
    return done.returncode, done.stdout.splitlines()


def _started(lines):
    """The tasks whose start the run reported, in order."""
    return [m[1] for m in (re.search(r"task \d+ of \d+\+?: (\S+) started$", line) for line in lines) if m]


def test_a_bad_dataset_uri_ends_with_the_failed_task_and_its_reason(tmp_path):
    """fingerprint only lists the dataset (a missing folder lists as empty); ingest is the first task
    to read it, fails, and is the last word: its reason, then the log file; no task starts after it."""
    from neumo import synthetic

    data = tmp_path / "data"
    synthetic.write_kaggle(str(data / "images"), {"train": (4, 4), "test": (2, 2)}, size=64, seed=0,
                           masks_uri=str(data / "masks"))
    workdir = tmp_path / "run"
    code, lines = _run(tmp_path, "--preset", "smoke", "--rounds", "1", "--trials", "1", "--workdir", str(workdir),
                       "--set", f"dataset_uri={tmp_path / 'nope'}", "--set", f"masks_uri={data / 'masks'}",
                       timeout=300)
    text = "\n".join(lines)
    assert code != 0, text
    assert re.search(r"FAILED: task ingest \(\d+ of \d+\+?\): ValueError: no files under .*nope", lines[-2]), text
    log = re.search(r"full log: (\S+)$", lines[-1])
    assert log and Path(log[1]).parent == workdir / "logs", text
    assert f"full log: {log[1]}" in lines[0]  # named at the start too
    full = open(log[1]).read()
    assert "Traceback" in full and "ValueError: no files under" in full and "Executing task" in full
    assert "Traceback" not in text and "Executing task" not in text and "no effect" not in text
    # nothing starts once ingest failed (suggest needs no data: kfp.local may start it first)
    failed_at = next(i for i, line in enumerate(lines) if "ingest FAILED" in line)
    assert not any("started" in line for line in lines[failed_at:]), text
    assert set(_started(lines)) <= {"fingerprint", "ingest", "suggest-round-0"}, text
    (run_root,) = (workdir / "pipeline_root").iterdir()
    assert {p.name for p in run_root.iterdir()} <= {"fingerprint", "ingest", "suggest"}


# A successful run's output (few lines, "task k of n", the log path last) is checked on the whole
# pipeline's run in tests/test_pipeline.py (test_whole_pipeline_runs_locally_and_a_second_run_continues).


# --- the parts, on their own -----------------------------------------------------------------------

@dsl.component(base_image="python:3.11", install_kfp_package=False)
def numbers() -> list:
    return [0, 1, 2, 3]


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def check(i: int) -> int:
    if i == 1:
        raise ValueError(f"item {i} is bad")
    return i


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def total(values: list) -> int:
    return sum(values)


@dsl.pipeline
def loop_over_numbers():
    items = numbers()
    with dsl.ParallelFor(items.output, parallelism=1) as i:
        checked = check(i=i)
    total(values=dsl.Collected(checked.output))


def test_kfp_local_starts_nothing_after_a_failed_task(tmp_path, caplog):
    """kfp.local would still run a loop's queued iterations after one failed; LocalTasks stops it,
    and counts the loop's tasks once the list it loops over is known."""
    from kfp import local

    from pipelines.runner import LocalTasks, TaskFailed

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    tasks = LocalTasks(loop_over_numbers.pipeline_spec)
    with caplog.at_level(logging.INFO, logger="neumo.pipeline"), pytest.raises((TaskFailed, RuntimeError)):
        with tasks.watching():
            loop_over_numbers()
    started = [r.getMessage() for r in caplog.records if r.getMessage().endswith(" started")]
    assert started == ["task 1 of 2+: numbers started", "task 2 of 6: check[0] started",
                       "task 3 of 6: check[1] started"]
    assert tasks.failed == "check[1] (3 of 6)"
    assert not list(tmp_path.glob("*/for-loop-*-iteration-[23]")), "the queued iterations did not start"


def test_the_view_keeps_the_project_lines_and_the_reason():
    from pipelines.runner import RunView

    view = RunView()
    output = [
        "\x1b[96m10:34:22.425 - INFO - Executing task 'ingest'\x1b[0m\n",
        "2026-12-01 10:34:22,425 neumo.pipeline INFO task 2 of 8+: ingest started\n",
        "    [KFP Executor 2026-12-01 10:34:22,499 INFO]: Looking for component `ingest` in ...\n",
        "    [KFP Executor 2026-12-01 10:34:22,501 INFO]: Got executor_input:\n",
        '    {"inputs": {}}\n',
        "    [KFP Executor 2026-12-01 10:34:22,600 INFO]: ingest: 42 files under /data\n",
        "    [KFP Executor 2026-12-01 10:34:22,601 WARNING]: ingest: 2 unreadable files skipped\n",
        "I0000 00:00:1796121303.389503   30307 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n",
        "task_executor.py:100: UserWarning: Task 'ingest': settings [...] have no effect in the current local runner\n",
        "    Traceback (most recent call last):\n",
        '      File "/src/shared/neumo/ingest.py", line 148, in scan\n',
        "    ValueError: no files under '/nope': check the dataset URI\n",
        "10:34:23.494 - ERROR - Task 'ingest' finished with status FAILURE\n",
        "2026-12-01 10:34:23,494 root INFO Skipping task plan: upstream task(s) ['ingest'] failed.\n",
        "2026-12-01 10:34:23,495 neumo.pipeline ERROR task 2 of 8+: ingest FAILED after 1.1 s\n",
    ]
    shown = [s for s in map(view.feed, output) if s]
    assert [text for _, text in shown] == ["task 2 of 8+: ingest started", "  ingest: 42 files under /data",
                                           "  WARNING ingest: 2 unreadable files skipped",
                                           "task 2 of 8+: ingest FAILED after 1.1 s"]
    assert shown[-1][0] == logging.ERROR
    assert view.failed == "ingest (2 of 8+)"
    assert view.reason() == "ValueError: no files under '/nope': check the dataset URI"


def test_a_failed_run_stops_the_tasks_still_running_and_ends_with_the_reason(tmp_path, caplog):
    """The child reports a failed task while another still runs: that one is stopped (its process
    group), and the failed task, its reason and the log file are the last lines."""
    from pipelines.runner import run_logged

    child = (
        "import logging, sys, time\n"
        "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s %(message)s')\n"
        "log = logging.getLogger('neumo.pipeline')\n"
        "log.info('task 1 of 3: train[0] started'); log.info('task 2 of 3: train[1] started')\n"
        "print('    RuntimeError: the loss became NaN', flush=True)\n"
        "log.error('task 2 of 3: train[1] FAILED after 1.0 s')\n"
        "time.sleep(120)\n"
    )
    with caplog.at_level(logging.INFO, logger="neumo.pipeline"):
        code = run_logged([sys.executable, "-c", child], tmp_path, grace=0.5)
    assert code == 1
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-3:-1] == ["stopped the tasks still running: train[0]",
                            "FAILED: task train[1] (2 of 3): RuntimeError: the loss became NaN"]
    (log,) = (tmp_path / "logs").iterdir()
    assert lines[-1] == f"full log: {log}" and lines[0] == f"full log: {log}"
    assert "RuntimeError: the loss became NaN" in log.read_text()


def test_training_logs_progress_within_a_long_epoch(caplog):
    """EpochLog: a line at most every `every` seconds within an epoch (step of steps, ETA; the steps
    estimated from the last epoch when Keras cannot count them), and one per epoch with its time."""
    import numpy as np
    import tensorflow as tf
    from keras import Input, Sequential, layers

    from neumo.fitting import EpochLog

    model = Sequential([Input((2,)), layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.zeros((32, 2), "float32"), np.zeros((32, 1), "float32")
    uncounted = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(8)  # no cardinality
    with caplog.at_level(logging.INFO, logger="neumo.fitting"):
        model.fit(uncounted, epochs=2, verbose=0, shuffle=False, callbacks=[EpochLog("trial", every=0)])
    text = caplog.text
    assert re.search(r"trial epoch 1: step 2, [\d.]+ steps/s", text)
    assert re.search(r"trial epoch 2: step 2/~4 \(50%\), [\d.]+ steps/s, epoch ETA", text)
    assert re.search(r"trial epoch 1: loss=\S+ \(1 of 2, [\d.]+ s; at most 1 more", text)
    assert re.search(r"trial epoch 2: loss=\S+ \(2 of 2, [\d.]+ s\)", text)
