"""The container images: what goes into them (fast, no container tools needed) and, when an image
built by `make container-check` is at hand, a real stage run inside it (slow).

Building the images is `make container-check` (minutes: debootstrap base, buildah build, podman
runs, the ingest component through kfp.local's DockerRunner); the slow test here reuses the image
it left in work/container-check rather than building again.
"""

from __future__ import annotations

import importlib.util
import json
import os
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

DOCKERFILE = REPO / "images" / "Dockerfile"  # both images: --build-arg FLAVOUR=cpu|gpu
FLAVOURS = ("cpu", "gpu")
GPU_ENV = ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
           "LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib")
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


def _instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments and blank lines left out."""
    out, current = [], ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        current += (" " if current else "") + line.strip().removesuffix("\\").strip()
        if not line.rstrip().endswith("\\"):
            out.append(current)
            current = ""
    return out


def _stages(instructions: list[str]) -> dict[str, list[str]]:
    """Instructions by stage: {"": global ARGs, alias or FROM line: that stage's instructions}."""
    stages, name = {"": []}, ""
    for ins in instructions:
        if ins.startswith("FROM "):
            words = ins.split()
            name = words[3] if len(words) == 4 and words[2].upper() == "AS" else ins
            stages[name] = []
        stages[name].append(ins)
    return stages


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    instructions = _instructions(text)
    assert instructions[0] == "ARG BASE_IMAGE=python:3.11-slim" and "ARG FLAVOUR=cpu" in _stages(instructions)[""]
    assert "FROM ${BASE_IMAGE} AS common" in instructions
    user = [line for line in instructions if line.startswith("USER ")]
    assert user and user[-1] not in {"USER root", "USER 0", "USER 0:0"}
    assert "ARG GIT_REVISION" in text and 'org.opencontainers.image.revision="${GIT_REVISION}"' in text
    assert "NEUMO_GIT_REVISION=${GIT_REVISION}" in text and "NEUMO_IMAGE=${NEUMO_IMAGE}" in text
    assert all("--no-cache-dir" in line for line in text.splitlines() if "pip install" in line and "#" not in line)
    assert "-c constraints.txt -c images/constraints.txt" in text
    assert ":latest" not in text
    assert not re.search(r"(?i)(password|secret|token|credential)s?\s*=", text), "no credentials in images"


def test_dockerfile_flavours_differ_only_in_requirements_labels_gpu_env_and_default_image():
    stages = _stages(_instructions(DOCKERFILE.read_text()))
    final = stages["FROM flavour-${FLAVOUR}"]
    assert list(stages) == ["", "common", *(f"flavour-{f}" for f in FLAVOURS), "FROM flavour-${FLAVOUR}"]
    assert "ARG FLAVOUR" in final and "ARG NEUMO_IMAGE=neumo-${FLAVOUR}" in final
    # The revision comes last (a new commit rebuilds only those layers), after deps, then the library.
    runs = [i for i, ins in enumerate(final) if ins.startswith("RUN ")]
    assert len(runs) == 2 and "pip install --no-cache-dir -c " in final[runs[0]] and "--no-deps ." in final[runs[1]]
    assert runs[1] < final.index("ARG GIT_REVISION=unknown")
    for flavour in FLAVOURS:
        stage = " ".join(stages[f"flavour-{flavour}"])
        assert f'org.opencontainers.image.title="neumo-{flavour}"' in stage
        assert "org.opencontainers.image.description=" in stage
        # NVIDIA_VISIBLE_DEVICES=all would hand every GPU of the node to a CPU task: GPU image only.
        assert all((env in stage) == (flavour == "gpu") for env in GPU_ENV), flavour
    assert not any(env.split("=")[0] in ins for env in GPU_ENV for ins in stages["common"] + final)


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dockerfile_flavour_picks_its_requirements_and_pip_check(flavour):
    """The RUN steps' `if [ "${FLAVOUR}" = gpu ]` run in sh, with python echoing what it was asked."""
    runs = [ins for ins in _stages(_instructions(DOCKERFILE.read_text()))["FROM flavour-${FLAVOUR}"]
            if ins.startswith("RUN ")]
    choices = [m for run in runs for m in re.findall(r'if \[ "\$\{FLAVOUR\}" = gpu \]; then .*?; fi', run)]
    assert len(choices) == 2
    gpu = ["--gpu"] if flavour == "gpu" else []
    env = {"PATH": os.environ.get("PATH", os.defpath), "FLAVOUR": flavour}
    calls = [subprocess.run(["sh", "-c", f'python() {{ echo "$*"; }}; {choice}'], env=env, capture_output=True,
                            text=True, check=True).stdout.strip() for choice in choices]
    assert calls == [" ".join(["scripts/image_requirements.py", *gpu]),
                     " ".join(["scripts/image_requirements.py", "--check", *gpu])]


def test_makefile_builds_each_flavour_from_the_one_dockerfile():
    makefile = (REPO / "Makefile").read_text()
    assert "-f images/Dockerfile --build-arg FLAVOUR=$*" in makefile
    assert re.search(r"^lint-images:.*\n\t\$\(VENV\)/bin/hadolint images/Dockerfile$", makefile, re.M)
    assert "images/cpu/" not in makefile and "images/gpu/" not in makefile


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("python3") is None, reason="needs make and python3")
def test_make_push_records_what_it_pushed(tmp_path):
    """`make push` with CONTAINER_TOOL=true (build and push do nothing) writes PUSHED_JSON."""
    pushed = tmp_path / "pushed.json"

    def push(*targets, tag="abc123", registry="registry.example/p"):
        subprocess.run(["make", "-s", "-C", str(REPO), *targets, "CONTAINER_TOOL=true", f"REGISTRY={registry}",
                        f"TAG={tag}", f"PUSHED_JSON={pushed}"], capture_output=True, text=True, check=True)
        return json.loads(pushed.read_text())

    assert push("push-gpu") == {"registry": "registry.example/p", "tag": "abc123",
                                "gpu": "registry.example/p/neumo-gpu:abc123"}
    assert push("push-cpu") == {"registry": "registry.example/p", "tag": "abc123",
                                "cpu": "registry.example/p/neumo-cpu:abc123",
                                "gpu": "registry.example/p/neumo-gpu:abc123"}
    # Another tag starts afresh: the file never names images of two different pushes.
    assert push("push-cpu", tag="def456") == {"registry": "registry.example/p", "tag": "def456",
                                              "cpu": "registry.example/p/neumo-cpu:def456"}
    assert push("-j2", "push", tag="def456", registry="r2.example") == {
        "registry": "r2.example", "tag": "def456", "cpu": "r2.example/neumo-cpu:def456",
        "gpu": "r2.example/neumo-gpu:def456"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pushed.json"]


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            sources = line.split()[1:-1]
            copied.update(s.rstrip("/") for s in sources)
    assert copied
    for source in copied:
        assert source in allowed or any(a.startswith(source + "/") for a in allowed), source
        assert (REPO / source).exists(), source


@pytest.mark.skipif(not (shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint").exists()),
                    reason="hadolint is not installed (`make lint-images` installs it into .venv)")
def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
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
