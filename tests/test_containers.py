"""The container images: what goes into them (fast, no container tools needed) and, when an image
built by `make container-check` is at hand, a real stage run inside it (slow).

Building the images is `make container-check` (minutes: debootstrap base, buildah build, podman
runs, the ingest component through kfp.local's DockerRunner); the slow test here reuses the image
it left in work/container-check rather than building again.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("image_requirements", REPO / "scripts" / "image_requirements.py")
image_requirements = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_requirements)

DOCKERFILES = {name: REPO / "images" / name / "Dockerfile" for name in ("cpu", "gpu")}
CHECK_WORK = REPO / "work" / "container-check"
CHECK_IMAGE = "localhost/neumo-cpu:check"


def _pyproject_deps() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def test_cpu_image_installs_exactly_pyprojects_dependencies():
    assert image_requirements.requirements(REPO / "pyproject.toml") == _pyproject_deps()


def test_gpu_image_swaps_tensorflow_cpu_for_the_same_tensorflow_release_and_nothing_else():
    cpu = image_requirements.requirements(REPO / "pyproject.toml")
    gpu = image_requirements.requirements(REPO / "pyproject.toml", gpu=True)
    changed = [(a, b) for a, b in zip(cpu, gpu) if a != b]
    assert len(cpu) == len(gpu) and len(changed) == 1
    (before, after), = changed
    version = before.split("==")[1]
    assert before == f"tensorflow-cpu=={version}" and after == f"tensorflow[and-cuda]=={version}"
    pins = dict(line.split("==") for line in (REPO / "images" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["tensorflow"] == version, "images/constraints.txt must pin the TensorFlow release pyproject pins"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+]*", v) for v in pins.values()), "exact pins only"
    assert not set(map(str.lower, pins)) & {line.split("==")[0].lower() for line in
                                            (REPO / "constraints.txt").read_text().splitlines() if "==" in line}


def test_gpu_pip_check_accepts_only_the_swapped_tensorflow():
    swapped = "neumo 0.1.0 requires tensorflow-cpu, which is not installed."
    broken = "keras 3.15.1 has requirement numpy>=2, but you have numpy 1.26.4."
    assert image_requirements.unexpected_problems(swapped + "\n", gpu=True) == []
    assert image_requirements.unexpected_problems(swapped, gpu=False) == [swapped]
    assert image_requirements.unexpected_problems(f"{swapped}\n{broken}", gpu=True) == [broken]
    assert image_requirements.unexpected_problems("No broken requirements found.", gpu=False) == []


def test_missing_tensorflow_cpu_is_an_error_for_the_gpu_swap(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["numpy==2.4.6"]\n')
    with pytest.raises(ValueError, match="no tensorflow-cpu"):
        image_requirements.requirements(tmp_path / "pyproject.toml", gpu=True)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_contract(name):
    text = DOCKERFILES[name].read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "ARG BASE_IMAGE=python:3.11-slim" and "FROM ${BASE_IMAGE}" in instructions
    user = [line for line in instructions if line.startswith("USER ")]
    assert user and user[-1] not in {"USER root", "USER 0", "USER 0:0"}
    assert "ARG GIT_REVISION" in text and 'org.opencontainers.image.revision="${GIT_REVISION}"' in text
    assert "NEUMO_GIT_REVISION=${GIT_REVISION}" in text and "NEUMO_IMAGE=${NEUMO_IMAGE}" in text
    assert all("--no-cache-dir" in line for line in text.splitlines() if "pip install" in line and "#" not in line)
    assert "-c constraints.txt -c images/constraints.txt" in text
    assert ":latest" not in text
    assert not re.search(r"(?i)(password|secret|token|credential)s?\s*=", text), "no credentials in images"
    assert ("--gpu" in text) == (name == "gpu")


def test_dockerignore_sends_only_what_the_dockerfiles_copy():
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for text in (path.read_text() for path in DOCKERFILES.values()):
        for line in text.splitlines():
            if line.startswith("COPY "):
                sources = line.split()[1:-1]
                copied.update(s.rstrip("/") for s in sources)
    for source in copied:
        assert source in allowed or any(a.startswith(source + "/") for a in allowed), source
        assert (REPO / source).exists(), source


@pytest.mark.skipif(not (shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint").exists()),
                    reason="hadolint is not installed (`make lint-images` installs it into .venv)")
def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def _podman() -> list[str] | None:
    marker = CHECK_WORK / "storage-driver"  # written by scripts/container-check.sh: overlay or vfs
    if not (shutil.which("podman") and shutil.which("runc") and marker.is_file()):
        return None
    driver = marker.read_text().strip()
    podman = ["podman", "--root", str(CHECK_WORK / f"storage-{driver}"), "--runroot", str(CHECK_WORK / f"run-{driver}"),
              "--storage-driver", driver, "--runtime", "runc"]
    exists = subprocess.run([*podman, "image", "exists", CHECK_IMAGE], capture_output=True, check=False)
    return podman if exists.returncode == 0 else None


@pytest.mark.slow
def test_a_real_stage_runs_in_the_built_cpu_image():
    """neumo synthetic + neumo ingest inside the image, as a non-root user, with no network."""
    podman = _podman()
    if podman is None:
        pytest.skip(f"no {CHECK_IMAGE} in {CHECK_WORK} (needs podman + runc): run `make container-check` first")
    script = ("neumo synthetic --out /tmp/s --per-class 4 --size 128 >/dev/null && "
              "neumo ingest --dataset-uri /tmp/s/images --out /tmp/m >/dev/null && "
              "id -u && cat /tmp/m/summary.json")
    out = subprocess.run([*podman, "run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
                          "--ulimit", "nproc=4096:4096", CHECK_IMAGE, "sh", "-ec", script],
                         capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    uid, _, summary = out.stdout.partition("\n")
    assert uid.strip() != "0"
    summary = json.loads(summary)
    assert summary["files"] > 0 and summary["accepted"] == summary["files"] and not summary["rejected"]
