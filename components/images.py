"""The images the components are declared with: placeholders. The pipeline factory
(`pipelines/full.py`) runs copies of the components in the images that `make build push` made for
this commit (`pipelines/runner.py` finds them), so no compiled pipeline names these."""

REGISTRY = "ghcr.io/neumo-project"
CPU_IMAGE = f"{REGISTRY}/neumo-cpu:unset"
GPU_IMAGE = f"{REGISTRY}/neumo-gpu:unset"
