"""neumo.storage against real backends: local paths, file:// URIs and a GCS emulator (no mocks)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from google.api_core import exceptions as gexc

from neumo import storage

BACKENDS = ["path", "file", "gs"]


@pytest.fixture(params=BACKENDS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A base "folder" URI on each backend."""
    if request.param == "path":
        return str(tmp_path / "root")
    if request.param == "file":
        return (tmp_path / "root").as_uri()
    return f"gs://{request.getfixturevalue('gcs_bucket')}/root"


def test_write_read_exists_round_trip(root: str) -> None:
    uri = storage.join(root, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01payload")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    storage.write_bytes(uri, b"")  # overwrite, and empty objects are fine
    assert storage.read_bytes(uri) == b""
    text_uri = storage.join(root, "notes.txt")
    storage.write_text(text_uri, "pneumonía ✓\n")
    assert storage.read_text(text_uri) == "pneumonía ✓\n"
    assert not storage.exists(storage.join(root, "a"))  # a folder is not a file


def test_list_files_nested_sorted_and_filtered(root: str) -> None:
    names = ["train/PNEUMONIA/p1.jpeg", "train/NORMAL/n1.JPEG", "train/NORMAL/n0.jpeg", "test/x.png", "meta.json"]
    for name in names:
        storage.write_bytes(storage.join(root, name), name.encode())
    storage.write_bytes(storage.join(root + "2", "outside.jpeg"), b"sibling prefix must not leak in")

    listed = storage.list_files(root)
    assert listed == sorted(storage.join(root, n) for n in names)
    assert storage.list_files(root, (".jpeg",)) == sorted(storage.join(root, n) for n in names if "jpeg" in n.lower())
    assert storage.list_files(storage.join(root, "train", "NORMAL") + "/") == [
        storage.join(root, "train/NORMAL/n0.jpeg"),
        storage.join(root, "train/NORMAL/n1.JPEG"),
    ]
    assert storage.list_files(storage.join(root, "nothing-here")) == []
    assert [storage.relative(u, root) for u in listed] == sorted(names)


def test_relative(root: str) -> None:
    assert storage.relative(storage.join(root, "train", "NORMAL", "x.jpeg"), root) == "train/NORMAL/x.jpeg"
    assert storage.relative(storage.join(root, "x.jpeg"), root + "/") == "x.jpeg"
    for bad in [root, root + "2/x.jpeg", root + "/../x.jpeg", root + "/a/../../x.jpeg"]:
        with pytest.raises(ValueError):
            storage.relative(bad, root)
    other = "/elsewhere/x" if storage.is_gcs(root) else "gs://some-bucket/root/x"
    with pytest.raises(ValueError):
        storage.relative(other, root)


def test_missing_raises_file_not_found(root: str, tmp_path: Path) -> None:
    missing = storage.join(root, "missing.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(missing)
    dest = tmp_path / "dl" / "missing.bin"
    with pytest.raises(FileNotFoundError):
        storage.download(missing, str(dest))
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_upload_then_download_file(root: str, tmp_path: Path) -> None:
    src = tmp_path / "model.keras"
    src.write_bytes(os.urandom(100_000))
    uri = storage.join(root, "models", "model.keras")
    storage.upload(str(src), uri)
    assert storage.read_bytes(uri) == src.read_bytes()
    dest = tmp_path / "out" / "deep" / "model.keras"
    storage.download(uri, str(dest))
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        storage.upload(str(tmp_path / "nope.keras"), uri)


def test_copy_within_and_across_backends(root: str, tmp_path: Path) -> None:
    """copy keeps the bytes on every backend (server-side within GCS) and across local and gs://."""
    data = os.urandom(50_000)
    src = storage.join(root, "part-0", "train", "shard-00000.npz")
    storage.write_bytes(src, data)
    dst = storage.join(root, "variant", "train", "shard-00000.npz")
    storage.copy(src, dst)
    assert storage.read_bytes(dst) == data
    local = str(tmp_path / "here" / "shard.npz")
    storage.copy(dst, local)
    back = storage.join(root, "again.npz")
    storage.copy(local, back)
    assert storage.read_bytes(back) == data
    with pytest.raises(FileNotFoundError):
        storage.copy(storage.join(root, "absent.npz"), dst)


def test_open_read_seeks_on_every_backend(root: str) -> None:
    """open_read is a seekable file over a local file or an object (ranged reads), so a shard's ids
    are read without its images."""
    import numpy as np

    from neumo import data as nd

    images = np.random.default_rng(0).integers(0, 255, (300, 64, 64), dtype=np.uint8)
    uri = storage.join(root, "v", "train", "shard-00000.npz")
    nd.write_shard(uri, images, [1] * 300, [f"id{i}" for i in range(300)])
    with storage.open_read(uri) as f:
        f.seek(-4, os.SEEK_END)
        assert len(f.read()) == 4
    assert list(nd.shard_ids(uri)) == [f"id{i}" for i in range(300)]
    with pytest.raises(FileNotFoundError):
        nd.shard_ids(storage.join(root, "v", "absent.npz"))


def test_large_resumable_round_trip(gcs_bucket: str, tmp_path: Path) -> None:
    data = os.urandom(20 * 1000 * 1000)
    digest = hashlib.sha256(data).hexdigest()
    uri = f"gs://{gcs_bucket}/big/blob.bin"
    storage.write_bytes(uri, data)
    assert hashlib.sha256(storage.read_bytes(uri)).hexdigest() == digest

    src = tmp_path / "big.bin"
    src.write_bytes(data)
    storage.upload(str(src), f"gs://{gcs_bucket}/big/file.bin")
    dest = tmp_path / "back.bin"
    storage.download(f"gs://{gcs_bucket}/big/file.bin", str(dest))
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest


def test_local_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "file.bin"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(target.as_uri(), b"second")
    assert target.read_bytes() == b"second"
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # type: ignore[arg-type]  # fails mid-write
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.bin"]


def test_local_listing_skips_hidden_and_temp_files(tmp_path: Path) -> None:
    (tmp_path / ".hidden").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.jpeg").write_bytes(b"")
    (tmp_path / "half.jpeg.neumo-tmp").write_bytes(b"")
    (tmp_path / "ok.jpeg").write_bytes(b"")
    assert storage.list_files(str(tmp_path)) == [str(tmp_path / "ok.jpeg")]


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("gs://b-1/x/", ("/y/", "z.txt"), "gs://b-1/x/y/z.txt"),
        ("gs://b-1", ("y",), "gs://b-1/y"),
        ("gs://b-1/x", (), "gs://b-1/x"),
        ("/data", ("a//b", "", "c"), "/data/a/b/c"),
        ("/", ("a",), "/a"),
        ("file:///data/", ("a",), "file:///data/a"),
        ("rel/dir", ("a",), "rel/dir/a"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


def test_local_path_and_is_gcs(tmp_path: Path) -> None:
    assert storage.local_path(str(tmp_path)) == str(tmp_path)
    assert storage.local_path((tmp_path / "a b").as_uri()) == str(tmp_path / "a b")
    assert storage.local_path("gs://bucket/k") is None
    assert storage.is_gcs("gs://bucket/k") and not storage.is_gcs("/gs/bucket")


@pytest.mark.parametrize("uri", ["gs://", "gs:///key", "gs://Bad_Bucket/k", "file://host/x", "", "gs://bucket"])
def test_malformed_uris_raise_value_error(uri: str) -> None:
    with pytest.raises(ValueError):
        storage.read_bytes(uri)


def test_unsupported_scheme_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="gs://"):
        storage.write_bytes("s3://bucket/key", b"")


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (gexc.ServiceUnavailable("x"), True),
        (gexc.TooManyRequests("x"), True),
        (gexc.InternalServerError("x"), True),
        (gexc.GatewayTimeout("x"), True),
        (ConnectionError("reset"), True),
        (requests.exceptions.ConnectionError("reset"), True),
        (requests.exceptions.ReadTimeout("slow"), True),
        (gexc.NotFound("x"), False),
        (gexc.Forbidden("x"), False),
        (gexc.BadRequest("x"), False),
        (ValueError("x"), False),
    ],
)
def test_retry_predicate(exc: BaseException, transient: bool) -> None:
    assert storage.is_transient(exc) is transient


# --- transient errors from a real server: a proxy in front of the emulator that fails on cue ---


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hanging up on the proxy are expected here, not worth a traceback."""


class FlakyProxy:
    """HTTP proxy to the emulator; each queued fault ("503" or "drop") spoils one request."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.faults: list[str | None] = []
        self.always_fail = False
        self.log: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _next_fault(self) -> str | None:
        with self._lock:
            if self.always_fail:
                return "503"
            return self.faults.pop(0) if self.faults else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._next_fault()
                if fault == "drop":
                    proxy.log.append((self.command, 0))
                    self.close_connection = True
                    return
                if fault == "503":
                    self._reply(503, {}, json.dumps({"error": {"code": 503, "message": "flaky"}}).encode())
                    return
                conn = http.client.HTTPConnection(*proxy.target, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    resp = conn.getresponse()
                    skip = {"content-length", "transfer-encoding", "connection"}
                    headers = {k: v for k, v in resp.getheaders() if k.lower() not in skip}
                    self._reply(resp.status, headers, resp.read())
                finally:
                    conn.close()

            def _reply(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                proxy.log.append((self.command, status))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(gcs_bucket: str, gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FlakyProxy, str]]:
    """(proxy, bucket): the storage client talks to the emulator through a FlakyProxy; retries are fast."""
    yield from through_proxy(FlakyProxy(gcs_emulator), gcs_bucket, monkeypatch)


def through_proxy(proxy, bucket: str, monkeypatch: pytest.MonkeyPatch):
    """Point the storage client at `proxy` (in front of the emulator) with fast retries; yield (proxy, bucket)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    # google-cloud-storage 3.17 otherwise GETs bucket metadata from a background thread,
    # which would consume a fault meant for the call under test.
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
    monkeypatch.setattr(storage, "RETRY", storage.RETRY.with_delay(initial=0.01, maximum=0.05).with_timeout(10))
    storage.reset_client()
    yield proxy, bucket
    proxy.close()
    storage.reset_client()


def test_transient_errors_are_retried_against_real_server(flaky: tuple[FlakyProxy, str]) -> None:
    proxy, bucket = flaky
    uri = f"gs://{bucket}/retry/small.txt"
    proxy.faults = ["503", "drop"]
    storage.write_bytes(uri, b"survived")  # 503, dropped connection, then success
    proxy.faults = ["drop", "503"]
    assert storage.read_bytes(uri) == b"survived"
    proxy.faults = ["503"]
    assert storage.list_files(f"gs://{bucket}/retry") == [uri]
    assert [status for _, status in proxy.log].count(200) == 3
    assert len(proxy.log) == 8


def test_resumable_upload_survives_a_failed_chunk(flaky: tuple[FlakyProxy, str]) -> None:
    proxy, bucket = flaky
    data = os.urandom(storage.CHUNK_SIZE + 1_000_000)  # two chunks
    uri = f"gs://{bucket}/retry/big.bin"
    proxy.faults = [None, "503", "drop"]  # start the session, then spoil the first chunk twice
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    assert ("PUT", 308) in proxy.log and ("PUT", 503) in proxy.log


def test_not_found_is_not_retried_and_retries_are_bounded(
    flaky: tuple[FlakyProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, bucket = flaky
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"gs://{bucket}/retry/absent.bin")
    assert len(proxy.log) == 1
    proxy.always_fail = True
    monkeypatch.setattr(storage, "RETRY", storage.RETRY.with_timeout(0.5))
    started = time.monotonic()
    with pytest.raises((gexc.RetryError, gexc.ServiceUnavailable)):
        storage.read_bytes(f"gs://{bucket}/retry/absent.bin")
    assert time.monotonic() - started < 5
    assert len(proxy.log) > 2
