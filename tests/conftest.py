"""Shared pytest fixtures: a local GCS emulator, a fresh bucket per test, and ../shared/data."""

from __future__ import annotations

import shutil
import textwrap
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _emulator_executable() -> str:
    beside = Path(sys.executable).parent / "gcp-storage-emulator"
    found = str(beside) if beside.exists() else shutil.which("gcp-storage-emulator")
    if not found:
        pytest.fail("gcp-storage-emulator is not installed: pip install -e '.[test]'")
    return found


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gcp-storage-emulator on 127.0.0.1 for the session; yields its URL (http://127.0.0.1:PORT)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("gcs-emulator") / "emulator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [_emulator_executable(), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gcp-storage-emulator exited with {proc.returncode}: {log_path.read_text()}")
            try:
                with urllib.request.urlopen(url + "/", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gcp-storage-emulator did not answer on {url}: {log_path.read_text()}")
            time.sleep(0.05)
        yield url
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server the tests started; kill it if it does not stop within 5 s."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def gcs_bucket(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new, empty bucket on the emulator, with STORAGE_EMULATOR_HOST pointing there; yields its name."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    from neumo import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "neumo-local")
    storage.reset_client()
    name = f"neumo-test-{uuid.uuid4().hex[:12]}"
    gcs.Client(project="neumo-local", credentials=AnonymousCredentials()).create_bucket(name)
    yield name
    storage.reset_client()  # later tests must not reuse a client bound to this environment


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder ../shared/data beside the repo; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data is absent: expected it at {SHARED_DATA}")
    return SHARED_DATA


#: What a pipeline must compile without: every heavy library and every neumo module but the
#: standard-library-only declaration of parameters and trials.
NOT_FOR_COMPILING = ("tensorflow", "keras", "cv2", "numpy", "pandas", "skimage", "mango", "scipy", "sklearn",
                     "matplotlib", "pydicom")


def compile_with_only_kfp(pipeline: Path, out: Path, args: tuple[str, ...] = (), blocked: tuple[str, ...] = ()) -> None:
    """`pipeline --compile out ARGS` in a fresh interpreter where NOT_FOR_COMPILING, `blocked` (and
    google.cloud) cannot be imported; fails the test with its stderr if it does not compile."""
    script = textwrap.dedent(f"""
        import sys, runpy
        BLOCKED = {NOT_FOR_COMPILING + tuple(blocked)!r}
        ALLOWED_NEUMO = ("neumo", "neumo.parameters", "neumo.trial")
        class Block:
            def find_spec(self, name, path=None, target=None):
                top = name.split(".")[0]
                if top in BLOCKED or name.startswith("google.cloud") or (top == "neumo" and name not in ALLOWED_NEUMO):
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        sys.argv = [{pipeline.name!r}, "--compile", {str(out)!r}, *{list(args)!r}]
        runpy.run_path({str(pipeline)!r}, run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def lung_mask_stand_in(path: str, pixels: int = 32) -> None:
    """A stand-in lung-mask model, made rather than trained (seconds saved): its lungs are the
    darker parts of the image (a 1x1 convolution, sigmoid(8 - 20 x) on x in [0, 1])."""
    import keras
    import numpy as np

    image = keras.Input((pixels, pixels, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="dark")
    model = keras.Model(image, conv(image), name="lung_mask")
    conv.set_weights([np.full((1, 1, 1, 1), -20.0, np.float32), np.full((1,), 8.0, np.float32)])
    model.save(path)
