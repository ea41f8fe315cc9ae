"""Where each task runs: the images, resources, GPU placement and retries of every task.

GPU stages get the accelerator type and limit, a node selector and a toleration for the GPU node
pool; every stage gets CPU and memory requests; stages that can be preempted get retries. Only
`kfp` and `kfp-kubernetes` are needed here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from kfp import kubernetes

from components import images as placeholders


@dataclass(frozen=True)
class Images:
    """The container images of the CPU and the GPU stages (pipelines/runner.py resolves the ones
    `make build push` made for this commit)."""

    cpu: str = placeholders.CPU_IMAGE
    gpu: str = placeholders.GPU_IMAGE


@dataclass(frozen=True)
class Placement:
    """Compile-time placement options (the command line of pipelines/full.py sets them)."""

    gpu_type: str = "nvidia.com/gpu"
    gpu_limit: int = 1
    gpu_node_selector: tuple[str, str] = ("cloud.google.com/gke-accelerator", "nvidia-tesla-t4")
    gpu_toleration: tuple[str, str, str] = ("nvidia.com/gpu", "present", "NoSchedule")
    cpu_request: str = "1"
    memory_request: str = "4G"
    gpu_cpu_request: str = "4"
    gpu_memory_request: str = "16G"
    retries: int = 2

    def __post_init__(self):
        if self.gpu_limit < 1:
            raise ValueError(f"gpu_limit must be >= 1, got {self.gpu_limit}")
        if len(self.gpu_node_selector) != 2 or not all(self.gpu_node_selector):
            raise ValueError(f"gpu_node_selector must be KEY=VALUE, got {self.gpu_node_selector}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


def place(task, placement: Placement, gpu: bool = False, retry: bool = False):
    """Apply resources (and GPU placement on GPU stages, retries where asked) to a task."""
    if gpu:
        task.set_cpu_request(placement.gpu_cpu_request).set_memory_request(placement.gpu_memory_request)
        task.set_accelerator_type(placement.gpu_type).set_accelerator_limit(placement.gpu_limit)
        kubernetes.add_node_selector(task, *placement.gpu_node_selector)
        key, value, effect = placement.gpu_toleration
        kubernetes.add_toleration(task, key=key, operator="Equal", value=value, effect=effect)
    else:
        task.set_cpu_request(placement.cpu_request).set_memory_request(placement.memory_request)
    if retry and placement.retries:
        task.set_retry(num_retries=placement.retries, backoff_duration="60s", backoff_factor=2.0)
    return task


def with_image(component, image: str):
    """A copy of a component that runs in `image`; the component itself is left as it is."""
    component = copy.deepcopy(component)
    component.component_spec.implementation.container.image = image
    return component
