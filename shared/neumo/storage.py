"""One storage layer for neumo: local paths, ``file://`` URIs and ``gs://bucket/key``.

Every other module passes URIs here and never touches the filesystem or GCS itself.
Local writes are atomic (temp file in the same folder + ``os.replace``); GCS calls are
retried on transient errors within a bounded time; a missing file or object is always
``FileNotFoundError`` and a malformed URI is always ``ValueError``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mimetypes
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote, unquote, urlsplit

import requests
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.exceptions import InvalidResponse

logger = logging.getLogger(__name__)

CHUNK_SIZE = 8 * 1024 * 1024  # above this an upload is resumable, in chunks of this size
_TMP_SUFFIX = ".neumo-tmp"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_TYPES = (
    ConnectionError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


def is_transient(exc: BaseException) -> bool:
    """True when a GCS call that raised ``exc`` is worth retrying (429/5xx, dropped connection)."""
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    if isinstance(exc, gexc.GoogleAPICallError):
        return exc.code in _TRANSIENT_CODES
    if isinstance(exc, InvalidResponse):  # raised by the resumable-upload machinery
        return getattr(exc.response, "status_code", None) in _TRANSIENT_CODES
    if isinstance(exc, auth_exc.TransportError):
        return bool(exc.args) and isinstance(exc.args[0], BaseException) and is_transient(exc.args[0])
    return False


# Read at call time, so tests (or callers) may swap in a faster policy.
RETRY = Retry(predicate=is_transient, initial=0.5, maximum=10.0, multiplier=2.0, timeout=120.0)


def _client() -> storage.Client:
    """The process's GCS client (a forked child builds its own)."""
    return _client_for_pid(os.getpid())


@functools.lru_cache(maxsize=1)
def _client_for_pid(pid: int) -> storage.Client:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "neumo-local")
        logger.debug("GCS client for emulator %s (pid %d)", os.environ["STORAGE_EMULATOR_HOST"], pid)
        return storage.Client(project=project, credentials=AnonymousCredentials())
    return storage.Client()


def reset_client() -> None:
    """Drop the cached GCS client; the next call builds one from the current environment."""
    _client_for_pid.cache_clear()


def _scheme(uri: str) -> str:
    match = _SCHEME_RE.match(uri)
    return match.group(1).lower() if match else ""


def _parse(uri: str) -> tuple[str, str, str]:
    """Split ``uri`` into ("local", "", path) or ("gs", bucket, key); ValueError if malformed."""
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("empty storage URI")
    scheme = _scheme(uri)
    if scheme == "":
        return "local", "", uri
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"file URIs must be absolute, like file:///path: {uri!r}")
        return "local", "", unquote(parts.path)
    if scheme == "gs":
        bucket, _, key = uri[len("gs://"):].partition("/")
        if not _BUCKET_RE.match(bucket):
            raise ValueError(f"gs URI needs a valid bucket name, like gs://bucket/key: {uri!r}")
        return "gs", bucket, key
    raise ValueError(f"unsupported storage scheme {scheme!r} in {uri!r}: use a local path, file:// or gs://")


def _gs(uri: str) -> tuple[str, str, str]:
    """Parse a gs:// URI naming an object (non-empty key)."""
    kind, bucket, key = _parse(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"gs URI must name an object, like gs://bucket/key: {uri!r}")
    return kind, bucket, key


@contextlib.contextmanager
def _gcs_errors(uri: str) -> Iterator[None]:
    """Turn google's NotFound into FileNotFoundError(uri)."""
    try:
        yield
    except gexc.NotFound as err:
        raise FileNotFoundError(errno.ENOENT, "No such object or bucket", uri) from err


def _blob(bucket: str, key: str, size: int = 0) -> storage.Blob:
    chunk_size = CHUNK_SIZE if size > CHUNK_SIZE else None
    return _client().bucket(bucket).blob(key, chunk_size=chunk_size)


def _atomic_local(path: str, write: Callable[[str], object]) -> None:
    """Run ``write(tmp)`` on a temp file beside ``path``, then move it into place."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def is_gcs(uri: str) -> bool:
    """True when ``uri`` is a ``gs://`` URI."""
    return _scheme(os.fspath(uri)) == "gs"


def local_path(uri: str) -> str | None:
    """The filesystem path of a local path or file:// URI; None for gs://."""
    kind, _, path = _parse(uri)
    return path if kind == "local" else None


def join(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended, '/'-separated, without doubled slashes."""
    base = os.fspath(base)
    _parse(base)
    tail = "/".join(p.strip("/") for p in (os.fspath(p) for p in parts) if p.strip("/"))
    if not tail:
        return base
    return f"{base}{'' if base.endswith('/') else '/'}{re.sub('/+', '/', tail)}"


def exists(uri: str) -> bool:
    """True when a file (not a folder) or object exists at ``uri``."""
    kind, bucket, key = _parse(uri)
    if kind == "local":
        return os.path.isfile(key)
    return bool(key) and _blob(bucket, key).exists(retry=RETRY)


def read_bytes(uri: str) -> bytes:
    """The whole content of ``uri``; FileNotFoundError if missing."""
    if not is_gcs(uri):
        with open(local_path(uri), "rb") as f:
            return f.read()
    _, bucket, key = _gs(uri)
    with _gcs_errors(uri):
        return _blob(bucket, key).download_as_bytes(retry=RETRY)


def write_bytes(uri: str, data: bytes) -> None:
    """Replace ``uri`` with ``data`` atomically (local: temp + rename; gs: one upload)."""
    if not is_gcs(uri):
        _atomic_local(local_path(uri), lambda tmp: _write_file(tmp, data))
        return
    _, bucket, key = _gs(uri)
    content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    logger.debug("uploading %d bytes to %s", len(data), uri)
    with _gcs_errors(uri):
        _blob(bucket, key, len(data)).upload_from_string(data, content_type=content_type, retry=RETRY)


def read_text(uri: str) -> str:
    """The content of ``uri`` decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to ``uri`` as UTF-8, atomically."""
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Sorted full URIs of all files under the folder ``uri``, recursively.

    ``suffixes`` filters by name ending, case-insensitively. Locally, hidden entries and
    our temp files are skipped and a missing folder lists as []; on gs the listing is of
    the prefix ``key/`` and a missing bucket raises FileNotFoundError.
    """
    return [u for u, _, _ in list_versions(uri, suffixes)]


def list_versions(uri: str, suffixes: tuple[str, ...] | None = None) -> list[tuple[str, int, int]]:
    """Like list_files, with each file's size and version: (uri, bytes, generation on gs or
    modification time in ns locally). A cheap fingerprint of a folder: nothing is read."""
    kind, bucket, key = _parse(uri)
    ends = tuple(s.lower() for s in suffixes) if suffixes else None
    out: list[tuple[str, int, int]] = []
    if kind == "local":
        as_uri = _scheme(os.fspath(uri)) == "file"
        for root, dirs, files in os.walk(key):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith(".") or name.endswith(_TMP_SUFFIX):
                    continue
                if ends is None or name.lower().endswith(ends):
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, key).replace(os.sep, "/")
                    try:
                        st = os.stat(path)
                    except OSError:  # a dangling link still lists (ingest reports it)
                        st = os.lstat(path)
                    out.append((join(uri, quote(rel) if as_uri else rel), st.st_size, st.st_mtime_ns))
        return sorted(out)
    prefix = key if not key or key.endswith("/") else key + "/"
    with _gcs_errors(uri):
        for blob in _client().list_blobs(bucket, prefix=prefix, retry=RETRY):
            if not blob.name.endswith("/") and (ends is None or blob.name.lower().endswith(ends)):
                out.append((f"gs://{bucket}/{blob.name}", int(blob.size or 0), int(blob.generation or 0)))
    return sorted(out)


def relative(uri: str, base: str) -> str:
    """The '/'-separated path of ``uri`` under ``base``; ValueError if not strictly under it.

    A name that could escape a folder it is joined to (a '..' or '.' segment, an empty segment
    as in 'a//b' or a leading '/', a NUL byte) is refused too: object names come from a bucket
    listing, and the relative path may become a local path later."""
    kind, bucket, key = _parse(uri)
    base_kind, base_bucket, base_key = _parse(base)
    if kind != base_kind or bucket != base_bucket:
        raise ValueError(f"{uri!r} is not under {base!r}")
    if kind == "local":
        rel = os.path.relpath(os.path.abspath(key), os.path.abspath(base_key)).replace(os.sep, "/")
    else:
        prefix = base_key.rstrip("/")
        rel = key if not prefix else key[len(prefix) + 1:] if key.startswith(prefix + "/") else ""
    segments = rel.split("/")
    if not rel or rel == "." or ".." in segments or "." in segments or "" in segments or "\0" in rel:
        raise ValueError(f"{uri!r} is not under {base!r}")
    return rel


def download(uri: str, local_path: str) -> None:
    """Copy ``uri`` to the local file ``local_path`` atomically; FileNotFoundError if missing."""
    kind, _, dest = _parse(local_path)
    if kind != "local":
        raise ValueError(f"download needs a local destination, not {local_path!r}")
    if not is_gcs(uri):
        src = _parse(uri)[2]
        _atomic_local(dest, lambda tmp: shutil.copyfile(src, tmp))
        return
    _, bucket, key = _gs(uri)
    with _gcs_errors(uri):
        _atomic_local(dest, lambda tmp: _blob(bucket, key).download_to_filename(tmp, retry=RETRY))


def upload(local_path: str, uri: str) -> None:
    """Copy the local file ``local_path`` to ``uri`` (resumable, chunked, when over 8 MiB)."""
    kind, _, src = _parse(local_path)
    if kind != "local":
        raise ValueError(f"upload needs a local source, not {local_path!r}")
    if not is_gcs(uri):
        _atomic_local(_parse(uri)[2], lambda tmp: shutil.copyfile(src, tmp))
        return
    _, bucket, key = _gs(uri)
    size = os.path.getsize(src)
    content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    logger.info("uploading %s (%d bytes) to %s", src, size, uri)
    with _gcs_errors(uri):
        _blob(bucket, key, size).upload_from_filename(src, content_type=content_type, retry=RETRY)


def delete(uri: str) -> None:
    """Remove the file or object at ``uri``; FileNotFoundError if it is absent."""
    if not is_gcs(uri):
        os.unlink(local_path(uri))
        return
    _, bucket, key = _gs(uri)
    with _gcs_errors(uri):
        _blob(bucket, key).delete(retry=RETRY)


def check_writable(folder_uri: str) -> None:
    """Fail early, before any expensive work, when ``folder_uri`` cannot be written to.

    Writes and removes a small probe file; a missing bucket is FileNotFoundError naming it,
    a forbidden one google's Forbidden, a malformed URI ValueError.
    """
    probe = join(folder_uri, f".neumo-write-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"")
    delete(probe)


# --- optimistic concurrency on gs:// (read-modify-write of a shared object) ---------------


def read_with_generation(uri: str) -> tuple[bytes | None, int]:
    """(content, generation) of the gs:// object ``uri``; (None, 0) when it does not exist.

    Pass the generation to :func:`write_if_generation` to replace the object only if nobody
    wrote it in between (generation 0 means "only if it still does not exist").
    """
    _, bucket, key = _gs(uri)
    for _ in range(20):
        blob = _client().bucket(bucket).get_blob(key, retry=RETRY)
        if blob is None:
            return None, 0
        generation = int(blob.generation)
        try:
            # the content must be that generation's: a newer one is 412, and we look again
            return blob.download_as_bytes(if_generation_match=generation, retry=RETRY), generation
        except (gexc.PreconditionFailed, gexc.NotFound):
            continue
    raise TimeoutError(f"{uri} kept changing while being read")


def write_if_generation(uri: str, data: bytes, generation: int) -> bool:
    """Replace the gs:// object ``uri`` with ``data`` only if its generation is still ``generation``
    (0: only if absent). True when written; False when someone else wrote it first (HTTP 412)."""
    _, bucket, key = _gs(uri)
    content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    try:
        with _gcs_errors(uri):
            _blob(bucket, key, len(data)).upload_from_string(
                data, content_type=content_type, if_generation_match=int(generation), retry=RETRY)
    except gexc.PreconditionFailed:
        return False
    return True
