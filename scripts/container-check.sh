#!/usr/bin/env bash
# Proof that the CPU image works, on a machine with no Docker engine and no registry
# (`make container-check`):
#
#   1. tools      buildah, podman, runc, debootstrap from apt when missing (needs root)
#   2. base       Debian bookworm (python3.11 + venv) by debootstrap, `podman import`ed; cached
#   3. build      images/Dockerfile, FLAVOUR=cpu, with buildah (chroot isolation) on that base
#   4. inspect    labels, user, env (no NVIDIA_VISIBLE_DEVICES), imports, `pip check` inside the image
#   5. stage      `podman run` real stages: neumo synthetic + neumo ingest, output JSON checked
#   6. pipeline   kfp.local DockerRunner over `podman system service`: the real ingest component
#                 from components/, run as a container (CONTAINER_CHECK_PIPELINE=0 skips)
#   7. full       only with CONTAINER_CHECK_FULL=1: the whole pipeline on tiny data through
#                 DockerRunner, every task a container (GPU stages on the CPU image)
# STEPS="stage pipeline" runs only those steps (on the image already built).
#
# Everything lives under $WORK (default work/container-check, removed by `make clean`), with its
# own container storage (overlay when the kernel allows it, else vfs), so nothing touches the
# machine's other images. Each step's time is printed at the end and written to
# $WORK/timings.txt. Knobs: DEBIAN_MIRROR, PIP_MIRROR (a local simple index folder mounted into
# the build, default /opt/pypi when present), CA_BUNDLE, STORAGE_DRIVER, REBUILD_BASE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${WORK:-$ROOT/work/container-check}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
BASE_IMAGE=${BASE_IMAGE_LOCAL:-localhost/neumo-base:bookworm}
IMAGE=${IMAGE:-localhost/neumo-cpu:check}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PIP_MIRROR=${PIP_MIRROR:-/opt/pypi}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Kernel overlayfs when this machine can mount it (a container starts in about a second), else vfs
# (every container and layer is a full copy of the image: tens of seconds each). STORAGE_DRIVER forces one.
overlay_works() {
    local t
    t=$(mktemp -d "$WORK/overlay-probe.XXXXXX") && mkdir -p "$t"/{lower,upper,work,merged} || return 1
    if mount -t overlay overlay -o "lowerdir=$t/lower,upperdir=$t/upper,workdir=$t/work" "$t/merged" 2>/dev/null; then
        umount "$t/merged"; rm -rf "$t"; return 0
    fi
    rm -rf "$t"; return 1
}
if [[ -z ${STORAGE_DRIVER:-} ]]; then
    if overlay_works; then STORAGE_DRIVER=overlay; else STORAGE_DRIVER=vfs; fi
fi
echo "$STORAGE_DRIVER" > "$WORK/storage-driver"
STORE=(--root "$WORK/storage-$STORAGE_DRIVER" --runroot "$WORK/run-$STORAGE_DRIVER" --storage-driver "$STORAGE_DRIVER")
PODMAN=(podman "${STORE[@]}" --runtime runc)
BUILDAH=(buildah "${STORE[@]}")
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
TIMINGS=$WORK/timings.txt
: > "$TIMINGS"

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'container-check: %s\n' "$*" >&2; exit 1; }
step() {  # step NAME FUNCTION: run it, record its wall time
    local name=$1 start end
    log "$name"
    start=$(date +%s)
    "$2"
    end=$(date +%s)
    printf '%-10s %4ds\n' "$name" $((end - start)) | tee -a "$TIMINGS" >&2
}

tools() {
    local missing=()
    for tool in buildah podman runc debootstrap; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
        command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    buildah --version && podman --version && runc --version | head -1
}

base() {
    if [[ -z ${REBUILD_BASE:-} ]] && "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
        echo "cached: $BASE_IMAGE"
        return
    fi
    [[ $(id -u) == 0 ]] || die "debootstrap needs root"
    local rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
    # As in python:3.11-slim: no apt lists or caches; and no device nodes (the runtime provides /dev).
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/dev/*
    tar -C "$rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
    rm -rf "$rootfs"
    "${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network none "$BASE_IMAGE" python3 --version
}

build() {
    local extra=()
    # pip inside the build: the host's CA bundle (proxies that re-sign TLS), and a local mirror when there is one.
    if [[ -f $CA_BUNDLE ]]; then
        extra+=(--volume "$CA_BUNDLE:/etc/neumo-build-ca.pem:ro" --build-arg PIP_CERT=/etc/neumo-build-ca.pem)
    fi
    if [[ -d $PIP_MIRROR/simple ]]; then
        extra+=(--volume "$PIP_MIRROR:$PIP_MIRROR:ro" --build-arg "PIP_EXTRA_INDEX_URL=file://$PIP_MIRROR/simple")
    fi
    # FLAVOUR always passed: buildah < 1.29 resolves `FROM flavour-${FLAVOUR}` only from a build arg.
    "${BUILDAH[@]}" bud --isolation chroot --layers=false -f images/Dockerfile --build-arg FLAVOUR=cpu \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg GIT_REVISION="$REVISION" \
        --build-arg NEUMO_IMAGE="$IMAGE" "${extra[@]}" -t "$IMAGE" .
}

inspect() {
    local revision title user
    revision=$("${PODMAN[@]}" image inspect --format '{{ index .Labels "org.opencontainers.image.revision" }}' "$IMAGE")
    [[ $revision == "$REVISION" ]] || die "label org.opencontainers.image.revision is '$revision', expected '$REVISION'"
    title=$("${PODMAN[@]}" image inspect --format '{{ index .Labels "org.opencontainers.image.title" }}' "$IMAGE")
    [[ $title == neumo-cpu ]] || die "label org.opencontainers.image.title is '$title', expected 'neumo-cpu'"
    user=$("${PODMAN[@]}" image inspect --format '{{ .Config.User }}' "$IMAGE")
    [[ -n $user && $user != root && $user != 0* ]] || die "image user is '$user', expected a non-root user"
    "${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network none "$IMAGE" sh -ec '
        test "$(id -u)" != 0
        test "$NEUMO_GIT_REVISION" = "'"$REVISION"'"
        test "$NEUMO_IMAGE" = "'"$IMAGE"'"
        test -z "${NVIDIA_VISIBLE_DEVICES:-}"
        test -w /gcs && test -w /minio && test -w /s3
        cd /src && python scripts/image_requirements.py --check
        python -c "import tensorflow as tf, keras, cv2, kfp, skimage, neumo.stages, mango; print(\"imports ok: tensorflow\", tf.__version__, \"keras\", keras.__version__, \"kfp\", kfp.__version__)"
        echo "user $(id -un) ($(id -u)), revision $NEUMO_GIT_REVISION, image $NEUMO_IMAGE"'
    "${PODMAN[@]}" image inspect --format 'size {{ .Size }} bytes' "$IMAGE"
}

stage() {
    local out
    out=$("${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network none "$IMAGE" sh -ec '
        neumo synthetic --out /tmp/s --per-class 4 --size 128 > /dev/null
        neumo ingest --dataset-uri /tmp/s/images --masks-uri /tmp/s/masks --out /tmp/m > /dev/null
        cat /tmp/m/summary.json')
    printf '%s\n' "$out" > "$WORK/ingest-summary.json"
    "$ROOT/.venv/bin/python" - "$WORK/ingest-summary.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
files, accepted = summary["files"], summary["accepted"]
assert files > 0 and accepted == files and not summary["rejected"], summary
print(f"ingest in the container: {files} files, {accepted} accepted, data_version {summary['data_version']}")
EOF
}

service=
docker_api() {  # a Docker-compatible API over podman, and the Docker SDK DockerRunner needs (beside .venv)
    local sock=$WORK/podman.sock pydeps=$WORK/pydeps
    [[ -d $pydeps/docker ]] || "$ROOT/.venv/bin/python" -m pip install --quiet --no-deps --target "$pydeps" docker==7.1.0
    [[ -n $service ]] && return
    rm -f "$sock"
    "${PODMAN[@]}" system service --time=0 "unix://$sock" >"$WORK/podman-service.log" 2>&1 &
    service=$!
    trap 'kill "$service" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do [[ -S $sock ]] && break; sleep 0.2; done
    [[ -S $sock ]] || die "podman system service did not open $sock (log: $WORK/podman-service.log)"
}

pipeline() {
    local sock=$WORK/podman.sock pydeps=$WORK/pydeps
    docker_api
    # DockerRunner mounts only the pipeline root into each container: the data lives inside it, and
    # the image's non-root user must be able to write there.
    local data=$WORK/pipeline
    rm -rf "$data" && mkdir -p "$data" && chmod 1777 "$data"
    "${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network none -v "$data:$data" "$IMAGE" \
        neumo synthetic --out "$data/s" --per-class 4 --size 128 > /dev/null
    DOCKER_HOST="unix://$sock" PYTHONPATH="$pydeps" "$ROOT/.venv/bin/python" - "$IMAGE" "$data" <<'EOF'
import json, sys, pathlib
import docker
from kfp import local
from components.ingest.component import ingest
from pipelines.placement import with_image

image, data = sys.argv[1], pathlib.Path(sys.argv[2])
ingest = with_image(ingest, image)  # the component exactly as compiled for Kubeflow, in the local image

ulimits = [docker.types.Ulimit(name="nofile", soft=1024, hard=1024), docker.types.Ulimit(name="nproc", soft=4096, hard=4096)]
local.init(runner=local.DockerRunner(ulimits=ulimits, network_mode="none"), pipeline_root=str(data),
           raise_on_error=True)
task = ingest(dataset_uri=str(data / "s" / "images"), masks_uri=str(data / "s" / "masks"), pretrain_uri="",
              sample_per_class=0, seed=0, data_fingerprint="")
manifest = task.outputs["manifest"]
summary = json.loads((pathlib.Path(manifest.path) / "summary.json").read_text())
assert summary["accepted"] == summary["files"] > 0, summary
print(f"DockerRunner: ingest component ran in {image}: {summary['files']} files; manifest metadata {manifest.metadata}")
EOF
}

# The whole pipeline (every stage, GPU stages on the CPU image) on tiny data through DockerRunner.
full() {
    local data=$WORK/full
    docker_api
    rm -rf "$data" && mkdir -p "$data/root" && chmod 1777 "$data" "$data/root"
    "${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network none -v "$data:$data" "$IMAGE" \
        neumo synthetic --out "$data/root/s" --per-class 8 --size 128 > /dev/null
    DOCKER_HOST="unix://$WORK/podman.sock" PYTHONPATH="$WORK/pydeps" "$ROOT/.venv/bin/python" - "$IMAGE" "$data/root" <<'EOF'
import sys, pathlib
import docker
from kfp import local
from neumo import parameters
from pipelines.full import create_pipeline
from pipelines.placement import Images, Placement

image, root = sys.argv[1], pathlib.Path(sys.argv[2])
ulimits = [docker.types.Ulimit(name="nofile", soft=1024, hard=1024), docker.types.Ulimit(name="nproc", soft=4096, hard=4096)]
local.init(runner=local.DockerRunner(ulimits=ulimits, network_mode="none"), pipeline_root=str(root), raise_on_error=True)
pipeline = create_pipeline(rounds=1, trials_per_round=1, parallelism=1, placement=Placement(retries=0),
                           images=Images(cpu=image, gpu=image))
data = root / "s"
values = parameters.apply(parameters.preset("smoke"), {
    "dataset_uri": str(data / "images"), "masks_uri": str(data / "masks"), "pretrain_uri": str(data / "nih"),
    "results_uri": str(root / "results"), "depth": 2, "patience": 1,
    "search_space": {"model": [1], "frozen_layers": [0], "loss": ["bce"], "augmentation": ["none"]}})
pipeline(**{p.name: values[p.name] for p in parameters.RUN_TIME})
csvs = sorted(p.name for p in (root / "results").glob("*.csv"))
assert csvs == ["image_class_evaluation_unsupervised.csv", "train_max_unsupervised.csv"], csvs
print("DockerRunner: the whole pipeline ran in", image, "->", csvs)
EOF
}

# STEPS="stage pipeline" reruns some steps on the image already built; CONTAINER_CHECK_FULL=1 adds
# the whole pipeline after them.
default_steps="tools base build inspect stage pipeline"
[[ ${CONTAINER_CHECK_FULL:-0} == 1 ]] && default_steps+=" full"
for name in ${STEPS:-$default_steps}; do
    [[ $name == pipeline && ${CONTAINER_CHECK_PIPELINE:-1} == 0 ]] || step "$name" "$name"
done
log "container-check passed; step times (s):"
cat "$TIMINGS"
