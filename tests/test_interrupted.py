"""Stages killed mid-way (SIGKILL, no clean-up) leave nothing that passes as complete, and a rerun
finishes with exactly what an uninterrupted run gives: `neumo ingest` over gs:// (stalled by a
proxy), `neumo preprocess` (stalled on a FIFO), and a process appending to the results CSV."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from neumo import data as nd
from neumo import ingest, results, stages, storage, synthetic
from tests.test_storage import FlakyProxy

NEUMO = [sys.executable, "-m", "neumo.cli"]  # the `neumo` command, run by this interpreter


class StallProxy(FlakyProxy):
    """Passes requests through, but holds request number `stall_at` until released."""

    def __init__(self, target: str, stall_at: int) -> None:
        super().__init__(target)
        self.count, self.stall_at = 0, stall_at
        self.stalled, self.release = threading.Event(), threading.Event()

    def _next_fault(self):
        with self._lock:
            self.count += 1
            n = self.count
        if n == self.stall_at:
            self.stalled.set()
            self.release.wait(60)
        return None


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL  # really killed mid-way, not finished


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(NEUMO + args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_ingest_killed_mid_way_then_rerun(gcs_bucket, gcs_emulator, tmp_path):
    base = f"gs://{gcs_bucket}/kermany"
    synthetic.write_kaggle(base, {"train": (6, 6), "test": (2, 2)}, size=64, seed=9)
    proxy = StallProxy(gcs_emulator, stall_at=8)  # the listing, then a few images, then it hangs
    env = {**os.environ, "STORAGE_EMULATOR_HOST": proxy.url, "GOOGLE_CLOUD_PROJECT": "neumo-local",
           "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA": "true"}
    out = tmp_path / "manifest"
    try:
        proc = subprocess.Popen(NEUMO + ["ingest", "--dataset-uri", base, "--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert proxy.stalled.wait(60), "the ingest never reached its 8th request"
        _kill(proc)
    finally:
        proxy.release.set()
    # nothing of a half-finished ingest is there to be taken for a manifest
    assert storage.list_files(str(out)) == []
    with pytest.raises(FileNotFoundError):
        stages.load_manifest(str(out))

    proxy.stall_at = 0
    _run(["ingest", "--dataset-uri", base, "--out", str(out)], env)
    reference = tmp_path / "uninterrupted"
    _run(["ingest", "--dataset-uri", base, "--out", str(reference)], env)
    proxy.close()
    for name in ("manifest.csv", "report.csv", "summary.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((out / "summary.json").read_text())["accepted"] == 16


@pytest.fixture
def prepared_manifest(tmp_path) -> Path:
    data = tmp_path / "data"
    synthetic.write_kaggle(str(data), {"train": (6, 6), "val": (2, 2), "test": (2, 2)}, size=64, seed=4)
    stages.ingest(dataset_uri=str(data), out_dir=str(tmp_path / "manifest"))
    return tmp_path / "manifest"


def _open_writer_when_read(fifo: Path, timeout: float = 60) -> int:
    """Open the FIFO's write end once a reader has it open (the child is then blocked reading)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            time.sleep(0.02)
    pytest.fail("the preprocess never reached the stalled image")


def test_preprocess_killed_mid_way_then_rerun(prepared_manifest, tmp_path):
    rows = stages.load_manifest(str(prepared_manifest))
    # The first image of the last fold (test) is a FIFO: reading it blocks, after the shards of
    # train, valid and val are written.
    blocked = tmp_path / "blocked-manifest"
    shutil.copytree(prepared_manifest, blocked)
    stalled_row = sorted((r for r in rows if r["fold"] == "test"), key=lambda r: r["id"])[0]
    fifo = tmp_path / "stall" / "image.jpeg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    edited = [dict(r, uri=str(fifo)) if r["id"] == stalled_row["id"] else r for r in rows]
    storage.write_text(str(blocked / "manifest.csv"), ingest.to_csv(edited, ingest.MANIFEST_COLUMNS))

    out = tmp_path / "p64"
    args = ["preprocess", "--manifest", str(blocked), "--pixels", "64", "--workers", "1", "--out", str(out)]
    proc = subprocess.Popen(NEUMO + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fd = _open_writer_when_read(fifo)
    try:
        _kill(proc)
    finally:
        os.close(fd)
    # some complete shards, but no variant.json: the variant does not pass as prepared
    assert sorted({p.parent.name for p in out.rglob("shard-*.npz")}) == ["train", "val", "valid"]
    assert not (out / "variant.json").exists()
    for fold in ("train", "test"):
        with pytest.raises(FileNotFoundError):
            nd.load_fold(str(out), fold)
    # what a write killed half-way leaves behind: a temp file, which no reader takes for a shard
    (out / "test").mkdir()
    (out / "test" / ".shard-00000.npz.0123456789abcdef.neumo-tmp").write_bytes(b"PK\x03\x04 half a shard")

    fifo.unlink()
    shutil.copy(stalled_row["uri"], fifo)  # the image is readable again
    _run(args, dict(os.environ))
    reference = tmp_path / "uninterrupted"
    stages.preprocess(manifest_dir=str(prepared_manifest), variant={"pixels": 64, "mask": False}, out_dir=str(reference), workers=1,
                      acquisition_copies=1)  # the command's default
    info, ref_info = nd.read_variant(str(out)), nd.read_variant(str(reference))
    assert info["counts"] == ref_info["counts"] == {"train": info["counts"]["train"], "valid": 12 - info["counts"]["train"],
                                                    "val": 4, "test": 4, "unlabelled": 0}
    for fold in ("train", "valid", "val", "test"):
        got, want = nd.load_fold(str(out), fold), nd.load_fold(str(reference), fold)
        assert np.array_equal(got.images, want.images) and np.array_equal(got.ids, want.ids)
        assert np.array_equal(got.targets, want.targets)
    assert storage.list_files(str(out / "test")) == [str(out / "test" / "shard-00000.npz")]


APPENDER = """
import sys
from neumo import results
for n in range(100000):
    results.append_rows(sys.argv[1], [{"n": n, "text": "x" * 200, "end": "end"}], ["n", "text", "end"])
"""


def test_results_csv_append_killed_mid_way(tmp_path):
    uri = str(tmp_path / "results" / results.TRAIN_CSV)
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, uri])
    deadline = time.monotonic() + 60
    while len(results.read_rows(uri)) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    _kill(proc)
    rows = results.read_rows(uri)
    assert len(rows) >= 30
    assert [int(r["n"]) for r in rows] == list(range(len(rows)))  # no row lost, half-written or doubled
    assert all(r["text"] == "x" * 200 and r["end"] == "end" for r in rows)
    started = time.monotonic()
    results.append_rows(uri, [{"n": len(rows), "text": "after", "end": "end"}], ["n", "text", "end"])
    assert time.monotonic() - started < 5  # the dead writer's lock went with it
    assert results.read_rows(uri)[-1]["text"] == "after"
