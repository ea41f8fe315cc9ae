"""Storage faults against a real GCS emulator: a server restart mid-run, uploads cut mid-way, and
parallel trials appending to the results CSVs (local flock, gs:// generation preconditions)."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from neumo import results, storage
from tests.conftest import _emulator_executable, _free_port, stop_process
from tests.test_storage import FlakyProxy, flaky, through_proxy  # noqa: F401 - flaky is a fixture used here

COLUMNS = ["writer", "n", "note"]
WRITERS, ROWS_EACH = 8, 5


# --- a server restart mid-run ----------------------------------------------------------------


def _start_emulator(port: int, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "STORAGE_BASE": str(data_dir)}  # on disk, so a restart keeps the bucket
    proc = subprocess.Popen([_emulator_executable(), "start", "--host", "127.0.0.1", "--port", str(port), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("the emulator did not start")


def test_server_restart_mid_run_is_retried(tmp_path, monkeypatch):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    port = _free_port()
    proc = _start_emulator(port, tmp_path)
    procs = [proc]
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
        monkeypatch.setattr(storage, "RETRY", storage.RETRY.with_delay(initial=0.05, maximum=0.2).with_timeout(30))
        storage.reset_client()
        gcs.Client(project="neumo-local", credentials=AnonymousCredentials()).create_bucket("restart-bucket")
        storage.write_bytes("gs://restart-bucket/run/a.txt", b"before the restart")

        stop_process(proc)  # the server goes away mid-run ...
        restarter = threading.Thread(target=lambda: (time.sleep(1.0), procs.append(_start_emulator(port, tmp_path))))
        restarter.start()
        started = time.monotonic()
        assert storage.read_bytes("gs://restart-bucket/run/a.txt") == b"before the restart"  # ... and comes back
        waited = time.monotonic() - started
        restarter.join()
        storage.write_bytes("gs://restart-bucket/run/b.txt", b"after")
        assert storage.list_files("gs://restart-bucket/run") == ["gs://restart-bucket/run/a.txt",
                                                                 "gs://restart-bucket/run/b.txt"]
        assert waited >= 0.9  # the read really spanned the outage
    finally:
        for p in procs:
            stop_process(p)
        storage.reset_client()


# --- uploads cut mid-way never become (or replace) an object ---------------------------------


def test_resumable_upload_cut_mid_way_leaves_no_object(flaky, monkeypatch):  # noqa: F811
    proxy, bucket = flaky
    monkeypatch.setattr(storage, "RETRY", storage.RETRY.with_timeout(0.5))
    data = os.urandom(storage.CHUNK_SIZE + 1_000_000)  # over 8 MiB: a resumable upload of two chunks
    new, old = f"gs://{bucket}/cut/new.bin", f"gs://{bucket}/cut/old.bin"
    storage.write_bytes(old, b"complete earlier version")
    for uri in (new, old):
        proxy.faults = [None, None] + ["503"] * 10_000  # start the session, send one chunk, then the network dies
        with pytest.raises(Exception):  # noqa: B017 - RetryError or the last 503, either way the upload failed
            storage.write_bytes(uri, data)
        assert ("PUT", 308) in proxy.log  # one chunk did arrive
    proxy.faults = []
    assert not storage.exists(new)  # half an upload is no object at all
    assert storage.read_bytes(old) == b"complete earlier version"  # nor does it replace a complete one
    assert storage.list_files(f"gs://{bucket}/cut") == [old]


def test_single_shot_upload_cut_leaves_no_object(flaky, monkeypatch):  # noqa: F811
    proxy, bucket = flaky
    monkeypatch.setattr(storage, "RETRY", storage.RETRY.with_timeout(0.3))
    proxy.faults = ["drop"] * 10_000
    with pytest.raises(Exception):  # noqa: B017
        storage.write_bytes(f"gs://{bucket}/cut/small.csv", b"a,b\n1,2\n")
    proxy.faults = []
    assert not storage.exists(f"gs://{bucket}/cut/small.csv")


# --- parallel trials appending to the results CSV ---------------------------------------------


def _rows(writer: int, n: int) -> list[dict]:
    return [{"writer": writer, "n": n, "note": f"w{writer} row {n}, with a comma"}]


def _append_all(uri: str, writer: int) -> None:
    for n in range(ROWS_EACH):
        results.append_rows(uri, _rows(writer, n), COLUMNS)


def _check_all_rows(before: bytes, after: bytes, uri: str) -> None:
    assert after.startswith(before)  # earlier bytes intact
    got = sorted((int(r["writer"]), int(r["n"])) for r in results.read_rows(uri)[2:])
    assert got == [(w, n) for w in range(WRITERS) for n in range(ROWS_EACH)]  # all 40, none twice
    assert after.count(b"writer,n,note") == 1


def _seed_csv(uri: str) -> bytes:
    results.append_rows(uri, [{"writer": -1, "n": 0, "note": "earlier run"}, {"writer": -1, "n": 1, "note": "x"}],
                        COLUMNS)
    return storage.read_bytes(uri)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_concurrent_local_appends_lose_no_row(tmp_path, mode):
    uri = str(tmp_path / "results" / results.TRAIN_CSV)
    before = _seed_csv(uri)
    if mode == "threads":
        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(lambda w: _append_all(uri, w), range(WRITERS)))
    else:
        ctx = multiprocessing.get_context("fork")  # nothing heavy is imported yet; fork is instant
        procs = [ctx.Process(target=_append_all, args=(uri, w)) for w in range(WRITERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * WRITERS
    _check_all_rows(before, storage.read_bytes(uri), uri)
    assert sorted(os.listdir(tmp_path / "results")) == [f".{results.TRAIN_CSV}.lock", results.TRAIN_CSV]
    assert storage.list_files(str(tmp_path / "results")) == [uri]  # the lock file is never listed


class GenerationProxy(FlakyProxy):
    """A FlakyProxy that also enforces `ifGenerationMatch` on uploads, as GCS does (the emulator
    accepts any generation), and can forward a write but lose its reply (`lose_replies`)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.write_lock = threading.Lock()
        self.conflicts = 0
        self.lose_replies = 0

    def _generation(self, bucket: str, name: str) -> int:
        url = f"http://{self.target[0]}:{self.target[1]}/storage/v1/b/{bucket}/o/{quote(name, safe='')}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return int(json.loads(resp.read())["generation"])
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return 0
            raise

    def _handler(self):
        base = super()._handler()
        proxy = self

        class Handler(base):
            def _handle(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                if self.command != "POST" or "ifGenerationMatch" not in query:
                    return base._handle(self)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                bucket = re.search(r"/b/([^/]+)/o", self.path).group(1)
                name = json.loads(re.search(rb"\{.*?\}", body, re.S).group(0))["name"]
                with proxy.write_lock:  # check and write as one step, like GCS
                    if proxy._generation(bucket, name) != int(query["ifGenerationMatch"][0]):
                        proxy.conflicts += 1
                        return self._reply(412, {}, b'{"error": {"code": 412, "message": "conditionNotMet"}}')
                    original, self.rfile = self.rfile, io.BytesIO(body)
                    try:
                        if proxy.lose_replies:
                            proxy.lose_replies -= 1
                            return self._forward_then_fail()
                        return base._handle(self)
                    finally:
                        self.rfile = original

            def _forward_then_fail(self) -> None:
                import http.client

                conn = http.client.HTTPConnection(*proxy.target, timeout=30)
                try:
                    conn.request(self.command, self.path, body=self.rfile.read(), headers=dict(self.headers))
                    conn.getresponse().read()  # the write happened ...
                finally:
                    conn.close()
                self._reply(503, {}, b'{"error": {"code": 503, "message": "reply lost"}}')  # ... the client never knows

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler


@pytest.fixture
def generations(gcs_bucket: str, gcs_emulator: str, monkeypatch) -> Iterator[tuple[GenerationProxy, str]]:
    yield from through_proxy(GenerationProxy(gcs_emulator), gcs_bucket, monkeypatch)


def test_preconditions_are_enforced_by_the_test_proxy(generations):
    proxy, bucket = generations
    uri = f"gs://{bucket}/gen/x.csv"
    assert storage.read_with_generation(uri) == (None, 0)
    assert storage.write_if_generation(uri, b"one\n", 0)
    assert not storage.write_if_generation(uri, b"two\n", 0)  # someone wrote it first
    data, gen = storage.read_with_generation(uri)
    assert data == b"one\n" and gen > 0
    assert not storage.write_if_generation(uri, b"stale\n", gen + 1)
    assert storage.write_if_generation(uri, b"one\ntwo\n", gen)
    assert storage.read_with_generation(uri)[0] == b"one\ntwo\n" and proxy.conflicts == 2


def test_concurrent_gcs_appends_lose_no_row(generations):
    proxy, bucket = generations
    uri = f"gs://{bucket}/results/{results.TRAIN_CSV}"
    before = _seed_csv(uri)
    with ThreadPoolExecutor(WRITERS) as pool:
        list(pool.map(lambda w: _append_all(uri, w), range(WRITERS)))
    _check_all_rows(before, storage.read_bytes(uri), uri)
    assert proxy.conflicts > 0  # the writers did collide, and the preconditions sorted it out


def test_a_write_whose_reply_was_lost_is_not_appended_twice(generations):
    proxy, bucket = generations
    uri = f"gs://{bucket}/results/{results.EVAL_CSV}"
    results.append_rows(uri, _rows(0, 0), COLUMNS)
    proxy.lose_replies = 1  # the next append lands, the client sees 503, retries, gets 412
    results.append_rows(uri, _rows(0, 1), COLUMNS)
    assert [r["n"] for r in results.read_rows(uri)] == ["0", "1"]
    assert proxy.conflicts == 1
