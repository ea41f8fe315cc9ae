"""The requirements an image installs, read from pyproject.toml, and the image's `pip check`.

    python image_requirements.py [--gpu] [--pyproject PATH] > requirements.txt
    python image_requirements.py --check [--gpu]

pyproject.toml is the single list of runtime dependencies. The CPU image installs it as is
(tensorflow-cpu). The GPU image swaps `tensorflow-cpu==V` for `tensorflow[and-cuda]==V` (same
release, CUDA and cuDNN as pip wheels), installs that list, then the neumo package with
`--no-deps`; its `pip check` then reports exactly one expected line (neumo's declared
tensorflow-cpu is not installed), which `--check --gpu` accepts and nothing else. Needs only
Python >= 3.11 (tomllib), so it runs in a bare base image before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

CPU_TENSORFLOW = "tensorflow-cpu"
GPU_TENSORFLOW = "tensorflow[and-cuda]"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, gpu: bool = False) -> list[str]:
    """pyproject's [project].dependencies; with gpu, tensorflow-cpu==V becomes tensorflow[and-cuda]==V."""
    deps = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
    if not gpu:
        return list(deps)
    out, swapped = [], False
    for dep in deps:
        match = _NAME.match(dep)
        if match and _canonical(match.group(1)) == CPU_TENSORFLOW:
            out.append(f"{GPU_TENSORFLOW}{match.group(3).strip()}")
            swapped = True
        else:
            out.append(dep)
    if not swapped:
        raise ValueError(f"{pyproject} has no {CPU_TENSORFLOW} dependency to swap for the GPU image")
    return out


def expected_gpu_problem(line: str) -> bool:
    """The one `pip check` line the GPU image expects: neumo's tensorflow-cpu is not installed."""
    return bool(re.match(r"^neumo \S+ requires tensorflow-cpu, which is not installed\.?$", line.strip(), re.I))


def unexpected_problems(pip_check_output: str, gpu: bool) -> list[str]:
    """`pip check` lines that are real problems (all of them on CPU; all but the swap on GPU)."""
    lines = [ln for ln in pip_check_output.splitlines() if ln.strip() and not ln.startswith("No broken")]
    return [ln for ln in lines if not (gpu and expected_gpu_problem(ln))]


def check(gpu: bool) -> int:
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    problems = unexpected_problems(proc.stdout + proc.stderr, gpu)
    for line in problems:
        print(f"pip check: {line}", file=sys.stderr)
    if not problems:
        print("pip check: no broken requirements" + (" (tensorflow-cpu replaced by tensorflow)" if gpu else ""))
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the GPU image: tensorflow[and-cuda] instead of tensorflow-cpu")
    p.add_argument("--pyproject", default="pyproject.toml", type=Path)
    p.add_argument("--check", action="store_true", help="run `pip check`, failing on anything unexpected")
    args = p.parse_args(argv)
    if args.check:
        return check(args.gpu)
    print("\n".join(requirements(args.pyproject, args.gpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
