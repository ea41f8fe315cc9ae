"""The project's container images: name and tag in one place.

`make compile` (and `pipelines/full.py --image-tag`) rewrites the components' images at compile
time with `pipelines.placement.set_images`, so a compiled pipeline names the tag that was pushed.
"""

REGISTRY = "ghcr.io/neumo-project"
TAG = "0.1.0"
CPU_IMAGE = f"{REGISTRY}/neumo-cpu:{TAG}"
GPU_IMAGE = f"{REGISTRY}/neumo-gpu:{TAG}"
