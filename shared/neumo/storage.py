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
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO
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
#: Characters of the target's name kept in a temp file's name (for whoever finds a leftover one):
#: short, so a temp name fits the file system's 255-byte limit whatever the target's name.
_TMP_NAME_CHARS = 24
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
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return storage.Client()
    except DefaultCredentialsError as err:
        raise PermissionError("gs:// needs Google Cloud credentials and none were found: run `gcloud auth "
                              "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or use Workload "
                              "Identity on the cluster (STORAGE_EMULATOR_HOST for an emulator)") from err


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
        return "local", "", unquote(parts.path, errors="surrogateescape")  # os.fsdecode's form
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
    # hidden, and at most 1 + 4 * 24 + 1 + 16 + 10 bytes: a target named up to the 255-byte limit still works
    tmp = os.path.join(parent, f".{os.path.basename(path)[:_TMP_NAME_CHARS]}.{uuid.uuid4().hex[:16]}{_TMP_SUFFIX}")
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


#: What a seekable remote read fetches per request (open_read): a zip's directory and one small member.
RANGE_BYTES = 256 * 1024


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A seekable binary file over ``uri``: a local file, or an object read by ranged requests of
    RANGE_BYTES, so reading one member of a large .npz fetches that member, not the object."""
    if not is_gcs(uri):
        with open(local_path(uri), "rb") as f:
            yield f
        return
    _, bucket, key = _gs(uri)
    with _gcs_errors(uri), _blob(bucket, key).open("rb", chunk_size=RANGE_BYTES, retry=RETRY) as f:
        yield f


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


# --- listing ---------------------------------------------------------------------------------

#: Files that operating systems and file managers leave in folders: never data.
_SYSTEM_FILES = {
    ".ds_store": "macOS metadata file (.DS_Store, Finder's folder settings)",
    "thumbs.db": "Windows metadata file (Thumbs.db, Explorer's thumbnail cache)",
    "ehthumbs.db": "Windows metadata file (ehthumbs.db, Media Center's thumbnail cache)",
    "desktop.ini": "Windows metadata file (desktop.ini, Explorer's folder settings)",
}
_MACOS_ZIP_FOLDER = "__macosx"
#: Why an object name is refused (it could escape a folder it is later joined to).
UNSAFE_NAME = "unsafe name: '..', '.', an empty segment or an absolute path"


@dataclass(frozen=True)
class Entry:
    """One entry found under a listed folder, reported as exactly one row by whoever lists it.

    ``status`` "" is a regular file to read; "skipped" is a hidden, system or temp file (never
    data); "rejected" is an entry that must not or cannot be read: a link out of the folder, a
    link loop or dangling link, something that is not a regular file, an unreadable file or
    folder, an unsafe object name. ``rel`` is the '/'-separated path under the folder ("" for an
    unsafe name); local names that are not valid UTF-8 are in ``os.fsdecode``'s form (the
    undecodable bytes as lone surrogates), so ``os.fsencode`` gives back the exact bytes.
    """

    uri: str
    rel: str
    status: str = ""
    reason: str = ""
    size: int = 0  # bytes, for a file to read (0 otherwise)
    version: int = 0  # generation on gs; locally mtime_ns | ctime_ns << 64 | inode << 128 (see list_versions)


@dataclass(frozen=True)
class Walk:
    """What :func:`walk` found: every entry (sorted by uri) and every folder walked (their rels)."""

    entries: list[Entry]
    folders: list[str]


def skip_reason(rel: str) -> str:
    """Why the entry at the '/'-separated ``rel`` is not data (hidden, system or temp file), or ""."""
    *folders, name = rel.split("/")
    for folder in folders:
        if folder.lower() == _MACOS_ZIP_FOLDER:
            return "macOS metadata folder (__MACOSX, left by unzipping an archive made on a Mac)"
        if folder.startswith("."):
            return f"in a hidden folder ({folder!r} starts with '.')"
    if name.endswith(_TMP_SUFFIX):
        return f"temp file of an unfinished write (name ends with {_TMP_SUFFIX!r})"
    if name.startswith("._"):
        return "macOS metadata file (AppleDouble '._' companion of another file, not an image)"
    system = _SYSTEM_FILES.get(name.lower())
    if system:
        return system
    if name.startswith("."):
        return "hidden file (name starts with '.')"
    return ""


def walk(uri: str) -> Walk:
    """Every entry under the folder ``uri``, recursively, each classified (:class:`Entry`).

    The same rules on a folder and on gs://: hidden names (a segment starting with '.'), macOS and
    Windows metadata files and our temp files are "skipped" with the reason. Locally, a link to a
    file or folder inside ``uri`` is followed (a folder link once per link: the files under it are
    listed under the link's name, and a link to a folder that encloses it is a rejected loop); a
    link that leaves ``uri``, a dangling link, a FIFO or device, and a file or folder that cannot
    be read are "rejected" with the reason, so one bad entry is one row, never the end of the
    listing. On gs the objects are those :func:`list_files` lists; a name that could escape a
    folder is rejected (:data:`UNSAFE_NAME`). A missing folder lists as no entries; a root that
    exists but cannot be listed raises its OSError, a missing bucket FileNotFoundError.
    """
    kind, _, key = _parse(uri)
    if kind == "local":
        return Walk(*_walk_local(uri, key))
    entries, folders = [], set()
    for u, size, version in list_versions(uri):
        try:
            rel = relative(u, uri)
        except ValueError:
            entries.append(Entry(u, "", "rejected", UNSAFE_NAME))
            continue
        skip = skip_reason(rel)
        entries.append(Entry(u, rel, "skipped" if skip else "", skip, size, version))
        parts = rel.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return Walk(entries, sorted(folders))


def _walk_local(uri: str, root: str) -> tuple[list[Entry], list[str]]:
    """Every entry under the local folder ``root`` (see walk), with its size and version (see
    list_versions), and the folders walked. os.scandir, not os.walk: os.walk drops what it cannot list and follows
    either every folder link or none."""
    as_uri = _scheme(os.fspath(uri)) == "file"
    prefix = uri if uri.endswith("/") else uri + "/"
    real_root = os.path.realpath(root)
    inside_prefix = real_root if real_root.endswith(os.sep) else real_root + os.sep
    found: list[Entry] = []
    folders: list[str] = []

    def add(rel: str, status: str = "", reason: str = "", st: os.stat_result | None = None) -> None:
        skip = skip_reason(rel)
        if skip:  # hidden or system: never read, whatever it is
            status, reason = "skipped", skip
        name = quote(os.fsencode(rel)) if as_uri else rel
        version = st.st_mtime_ns | st.st_ctime_ns << 64 | st.st_ino << 128 if st else 0
        found.append(Entry(prefix + name, rel, status, reason, st.st_size if st else 0, version))

    def regular(rel: str, st: os.stat_result) -> None:
        if stat.S_ISREG(st.st_mode):
            add(rel, st=st)
        else:  # a FIFO or device would block or stream for ever
            add(rel, "rejected", "not a regular file (a FIFO, socket or device is never opened)")

    # (path, rel, real paths of the folders from the root down to this one): the chain finds loops
    stack = [(root, "", (real_root,))]
    while stack:
        path, rel_dir, chain = stack.pop()
        try:
            with os.scandir(path) as it:
                items = list(it)
        except OSError as err:
            if rel_dir:
                add(rel_dir, "rejected", f"unreadable folder, its files cannot be listed: {err.strerror or err}")
                continue
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return [], []  # a missing folder lists as nothing
            raise
        if rel_dir:
            folders.append(rel_dir)
        for item in items:
            rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
            try:
                if item.is_symlink():
                    target = os.path.realpath(item.path)
                    if target != real_root and not target.startswith(inside_prefix):
                        add(rel, "rejected", f"link outside the dataset (points to {target})")
                        continue
                    try:
                        st = os.stat(item.path)
                    except OSError as err:
                        add(rel, "rejected", "symlink loop (the link resolves to itself)" if err.errno == errno.ELOOP
                            else f"dangling link (points to {target}, which does not exist)"
                            if err.errno == errno.ENOENT else f"unreadable link: {err.strerror or err}")
                        continue
                    if not stat.S_ISDIR(st.st_mode):
                        regular(rel, st)
                    elif target in chain:
                        add(rel, "rejected", f"symlink loop (points to {target}, a folder that encloses it)")
                    else:
                        stack.append((item.path, rel, (*chain, target)))
                elif item.is_dir(follow_symlinks=False):
                    stack.append((item.path, rel, (*chain, os.path.join(chain[-1], item.name))))
                else:
                    regular(rel, item.stat(follow_symlinks=False))
            except OSError as err:  # a file in a folder that can be listed but not entered, say
                add(rel, "rejected", f"unreadable: {err.strerror or err}")
    found.sort(key=lambda e: e.uri)
    return found, sorted(folders)


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Sorted full URIs of all files under the folder ``uri``, recursively.

    ``suffixes`` filters by name ending, case-insensitively. Locally, only the regular files
    :func:`walk` would read are listed (not hidden, system or temp files, nor rejected entries,
    which are logged), and a missing folder lists as []; on gs every object under the prefix
    ``key/`` is listed (hidden ones too: :func:`walk` classifies them) and a missing bucket
    raises FileNotFoundError.
    """
    return [u for u, _, _ in list_versions(uri, suffixes)]


def list_versions(uri: str, suffixes: tuple[str, ...] | None = None) -> list[tuple[str, int, int]]:
    """Like list_files, with each file's size and version: (uri, bytes, generation on gs; locally
    mtime_ns | ctime_ns << 64 | inode << 128, so a rewrite that puts the old mtime back still
    changes it). A cheap fingerprint of a folder: nothing is read."""
    kind, bucket, key = _parse(uri)
    ends = tuple(s.lower() for s in suffixes) if suffixes else None
    out: list[tuple[str, int, int]] = []
    if kind == "local":
        found, _ = _walk_local(uri, key)
        rejected = [e for e in found if e.status == "rejected"]
        if rejected:
            logger.warning("listing %s: %d entries not listed, such as %r (%s); storage.walk says why for each",
                           uri, len(rejected), rejected[0].rel, rejected[0].reason)
        return [(e.uri, e.size, e.version) for e in found
                if not e.status and (ends is None or e.rel.lower().endswith(ends))]
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


def copy(src: str, dst: str) -> None:
    """Copy the file or object ``src`` to ``dst`` atomically: within GCS a server-side copy (no bytes
    through this pod, which matters when a gather moves a whole variant), local files by file copy,
    across the two by download or upload."""
    if is_gcs(src) and is_gcs(dst):
        _, bucket, key = _gs(src)
        _, to_bucket, to_key = _gs(dst)
        client = _client()
        with _gcs_errors(src):
            client.bucket(bucket).copy_blob(client.bucket(bucket).blob(key), client.bucket(to_bucket), to_key,
                                            retry=RETRY)
    elif is_gcs(src):
        download(src, dst)
    else:
        upload(src, dst)


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
