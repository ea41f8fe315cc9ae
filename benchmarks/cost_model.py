"""Cost model: the seed's full experiment at NIH scale (4 pretraining variants, the tuning budget),
projected in wall hours and GPU hours on 1, 4 and 8 GPUs and on 2 and 4 nodes, from step rates
measured here (CPU) or on a GPU (`benchmarks/device_step.py --json FILE`, then `--rates FILE`).

    python -m benchmarks.cost_model [--measure-pixels 128] [--steps 3] [--json out.json]
    python -m benchmarks.cost_model --rates device_rates.json [--policy mixed_float16]

Measured: images/s of a training step of the U-Net autoencoder and classifiers 1 and 2 (batch 8),
at the pixel sizes measured (others by the pixel-count rule below), and the preprocessing chain's
CPU seconds per image (the stage, one worker, on synthetic 1024x1024 NIH PNGs). Everything else is
projected from the experiment's sizes (printed, from neumo.parameters and ../shared/docs/ARCHITECTURE.md)
and stated assumptions (printed as such): the pixel-count rule, a forward pass = a third of a
training step, the data-parallel efficiency model (all-reduce over NVLink and the network plus a
fixed fraction lost), CPU cores per node. With CPU rates, "GPU" reads "a device like the one
measured": the arithmetic is the same, the figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from benchmarks.common import WORKDIR, report, setup

MODELS = ("unet", "clf1", "clf2")
STAGES = ("preprocess", "masking", "pretrain", "tuning")


class BadInput(ValueError):
    """A flag or rates file the model cannot use; main prints it as one line and exits 2."""


@dataclass(frozen=True)
class Experiment:
    """The sizes of the seed's experiment (ARCHITECTURE.md; neumo.parameters defaults and the seed preset)."""

    nih_images: int = 112_120  # NIH ChestX-ray14, all of it, pretraining only (the seed preset: unlabelled only)
    kermany_train: int = 5_216  # Kermany train split (1341 NORMAL + 3875 PNEUMONIA): train + valid folds
    kermany_eval: int = 640  # Kermany test (624) + val (16): evaluated by every trial
    valid_fraction: float = 0.2  # the seed's train/validation split 0.8/0.2
    pretrain_held_out: float = 0.1  # training.PRETRAIN_HELD_OUT: a tenth held out for the validation loss
    variants: tuple = ((512, False), (512, True), (256, False), (256, True))  # (pixels, lung mask)
    pretrain_epochs: int = 10
    epochs: int = 10  # per trial, an upper bound (early stopping, patience 3, can end a trial sooner)
    rounds: int = 5
    trials_per_round: int = 4
    parallelism: int = 4  # the pipeline's ParallelFor cap: trials (and variants) running at once
    batch: int = 8
    share_512: float = 0.5  # share of trials the tuner runs at 512 px (the rest at 256); models 1 and 2 half each
    mask_pixels: int = 256  # the lung-mask U-Net's input size

    @classmethod
    def seed(cls, **overrides) -> Experiment:
        """The seed's experiment with the project's declared defaults (neumo.parameters), then `overrides`."""
        from neumo import parameters

        p = parameters.preset("seed")
        names = ("pretrain_epochs", "epochs", "rounds", "trials_per_round", "parallelism", "mask_pixels")
        return cls(**{**{k: int(p[k]) for k in names}, "batch": int(p["batch_size"]), **overrides})

    def check(self) -> None:
        """Refuse sizes the projection cannot mean (BadInput, one line)."""
        for name in ("nih_images", "kermany_train", "pretrain_epochs", "epochs", "rounds", "trials_per_round",
                     "parallelism", "batch", "mask_pixels"):
            if getattr(self, name) < 1:
                raise BadInput(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kermany_eval < 0 or not 0 <= self.share_512 <= 1 or not 0 < self.valid_fraction < 1:
            raise BadInput("kermany_eval must be >= 0, share_512 within 0..1, valid_fraction within (0, 1)")


@dataclass(frozen=True)
class Cluster:
    """Data-parallel efficiency model: every number here is an assumption, printed with the results.

    One step on k GPUs (per-GPU batch kept at the seed's 8) takes t1 / dp_fraction + all-reduce of the
    gradients, with the all-reduce hierarchical: a ring inside the node, 2(g-1)/g x bytes / NVLink
    bandwidth + 2(g-1) x NVLink latency, then a ring across n nodes, 2(n-1)/n x bytes / network
    bandwidth per node + 2(n-1) x network latency. No overlap with the backward pass is assumed.
    """

    nvlink_gbs: float = 150.0  # achieved all-reduce bus bandwidth inside a node, GB/s (NCCL on 8x A100/H100 NVLink)
    network_gbs: float = 25.0  # between nodes, GB/s per node (200 Gbit/s)
    nvlink_latency_us: float = 10.0  # per ring step inside a node
    network_latency_us: float = 30.0  # per ring step between nodes
    dp_fraction: float = 0.95  # of the ideal kept by any k > 1 beyond the all-reduce (input pipeline, stragglers, sync)
    cpus_per_node: int = 32  # CPU cores per node that preprocessing uses (scales perfectly: see preprocess_bench)
    forward_fraction: float = 1 / 3  # a forward pass (prediction, masking, validation) = this x a training step

    def check(self) -> None:
        """Refuse a model that cannot mean anything (BadInput, one line)."""
        if min(self.nvlink_gbs, self.network_gbs, self.cpus_per_node) <= 0:
            raise BadInput("bandwidths and cpus_per_node must be > 0")
        if min(self.nvlink_latency_us, self.network_latency_us) < 0:
            raise BadInput("latencies must be >= 0")
        if not 0 < self.dp_fraction <= 1 or not 0 < self.forward_fraction <= 1:
            raise BadInput("dp_fraction and forward_fraction must be within (0, 1]")


@dataclass
class Rates:
    """Training-step images/s per (model, pixels) and where each came from; preprocessing CPU s/image."""

    images_s: dict = field(default_factory=dict)  # {(model, pixels): images/s}
    device: str = ""
    preprocess_cpu_s: float = 0.0
    preprocess_source: str = ""

    def at(self, model: str, pixels: int) -> tuple[float, str]:
        """(images/s, provenance) at `pixels`: measured there, or scaled from the nearest measured size.

        Pixel-count rule (an assumption): a convolutional step's work grows with H x W at fixed filters
        and depth, so images/s scales by (measured px / px)^2. On a GPU, small images under-fill the
        device, so scaling up from a small size overstates the large size's speed.
        """
        if (model, pixels) in self.images_s:
            return self.images_s[(model, pixels)], f"measured at {pixels} px"
        sizes = sorted((p for m, p in self.images_s if m == model), key=lambda p: (abs(math.log(p / pixels)), -p))
        if not sizes:
            raise BadInput(f"no step rate for model {model!r} at any size")
        p0 = sizes[0]
        return self.images_s[(model, p0)] * (p0 / pixels) ** 2, f"scaled from {p0} px by (px ratio)^2"


# --- data-parallel arithmetic -------------------------------------------------------------------

def placement(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(GPUs used per node, nodes) for a job on `gpus` GPUs, packed into as few nodes as possible."""
    nodes = math.ceil(gpus / gpus_per_node)
    return min(gpus, gpus_per_node), nodes


def allreduce_seconds(model_bytes: float, per_node: int, nodes: int, cluster: Cluster) -> float:
    """Seconds of one hierarchical ring all-reduce of `model_bytes` (see Cluster)."""
    inside = 2 * (per_node - 1) / per_node * model_bytes / (cluster.nvlink_gbs * 1e9) \
        + 2 * (per_node - 1) * cluster.nvlink_latency_us * 1e-6
    between = 0.0
    if nodes > 1:
        between = 2 * (nodes - 1) / nodes * model_bytes / (cluster.network_gbs * 1e9) \
            + 2 * (nodes - 1) * cluster.network_latency_us * 1e-6
    return inside + between


def efficiency(step_seconds: float, model_bytes: float, gpus: int, gpus_per_node: int, cluster: Cluster) -> float:
    """Data-parallel efficiency on `gpus` GPUs: one GPU's step time / the k-GPU step time (1.0 on one GPU)."""
    if gpus == 1:
        return 1.0
    per_node, nodes = placement(gpus, gpus_per_node)
    return step_seconds / (step_seconds / cluster.dp_fraction + allreduce_seconds(model_bytes, per_node, nodes, cluster))


@dataclass(frozen=True)
class Job:
    """One unit of work: its seconds on one GPU, its training step's seconds and gradient bytes
    (for data parallelism; step_seconds 0 = embarrassingly parallel, e.g. prediction)."""

    name: str
    seconds: float
    step_seconds: float = 0.0
    model_bytes: float = 0.0


def job_seconds_on(job: Job, gpus: int, gpus_per_node: int, cluster: Cluster) -> float:
    """Wall seconds of `job` on `gpus` GPUs: seconds / (gpus x efficiency)."""
    e = 1.0 if job.step_seconds == 0 else efficiency(job.step_seconds, job.model_bytes, gpus, gpus_per_node, cluster)
    return job.seconds / (gpus * e)


def schedule(jobs: list[Job], gpus: int, gpus_per_node: int, cluster: Cluster, cap: int,
             data_parallel: bool) -> dict:
    """Run `jobs` on `gpus` GPUs, at most `cap` at once, longest first into the least-loaded slot.

    Each running job gets gpus // slots GPUs when `data_parallel` (else one). Returns wall seconds,
    GPU seconds (GPUs given to running jobs x their time) and GPUs per job.
    """
    slots = max(1, min(len(jobs), cap, gpus))
    per_job = gpus // slots if data_parallel else 1
    load = [0.0] * slots
    gpu_seconds = 0.0
    for job in sorted(jobs, key=lambda j: -j.seconds):
        t = job_seconds_on(job, per_job, gpus_per_node, cluster)
        load[load.index(min(load))] += t
        gpu_seconds += t * per_job
    return {"wall_s": max(load), "gpu_s": gpu_seconds, "gpus_per_job": per_job, "at_once": slots}


# --- the experiment's jobs ------------------------------------------------------------------------

def pretrain_job(pixels: int, mask: bool, exp: Experiment, rates: Rates, cluster: Cluster, unet_bytes: float) -> Job:
    """One pretraining variant: epochs x (fit images' steps + the held-out tenth's forward pass)."""
    rate, _ = rates.at("unet", pixels)
    fit = exp.nih_images * (1 - exp.pretrain_held_out)
    held = exp.nih_images * exp.pretrain_held_out
    seconds = exp.pretrain_epochs * (fit + held * cluster.forward_fraction) / rate
    return Job(f"pretrain {pixels} px{' mask' if mask else ''}", seconds, exp.batch / rate, unet_bytes)


def trial_seconds(pixels: int, exp: Experiment, rates: Rates, cluster: Cluster) -> float:
    """One trial at `pixels` (models 1 and 2 averaged): epochs x (train steps + valid forward pass),
    then the evaluation's forward pass over valid, test and val."""
    train = exp.kermany_train * (1 - exp.valid_fraction)
    valid = exp.kermany_train * exp.valid_fraction
    per_image = sum(1 / rates.at(m, pixels)[0] for m in ("clf1", "clf2")) / 2
    return per_image * (exp.epochs * (train + valid * cluster.forward_fraction)
                        + (valid + exp.kermany_eval) * cluster.forward_fraction)


def round_jobs(exp: Experiment, rates: Rates, cluster: Cluster, clf_bytes: float) -> list[Job]:
    """One tuning round: share_512 of its trials at 512 px (rounded), the rest at 256 px."""
    n512 = round(exp.trials_per_round * exp.share_512)
    jobs = []
    for i in range(exp.trials_per_round):
        pixels = 512 if i < n512 else 256
        rate = 2 / sum(1 / rates.at(m, pixels)[0] for m in ("clf1", "clf2"))
        jobs.append(Job(f"trial {pixels} px", trial_seconds(pixels, exp, rates, cluster), exp.batch / rate, clf_bytes))
    return jobs


def pretrain_stage(exp: Experiment, rates: Rates, cluster: Cluster, gpus: int, gpus_per_node: int, unet_bytes: float,
                   how: str) -> dict:
    """The 4 variants either at once on gpus/4 GPUs each ("concurrent", the pipeline's ParallelFor) or
    in turn on all GPUs ("sequential", pretrain_nodes = nodes); "best": the faster (sequential on a tie)."""
    jobs = [pretrain_job(p, m, exp, rates, cluster, unet_bytes) for p, m in exp.variants]
    options = {"sequential": schedule(jobs, gpus, gpus_per_node, cluster, 1, True),
               "concurrent": schedule(jobs, gpus, gpus_per_node, cluster, exp.parallelism, True)}
    chosen = min(options, key=lambda k: options[k]["wall_s"]) if how == "best" else how
    return {**options[chosen], "schedule": chosen}


def tuning_stage(exp: Experiment, rates: Rates, cluster: Cluster, gpus: int, gpus_per_node: int, clf_bytes: float,
                 trial_gpus: str) -> dict:
    """Rounds in turn (each waits for the tuner's next suggestion), a round's trials at once up to the
    parallelism cap, one GPU each as the pipeline's pods ask ("one") or the GPUs split between them ("split")."""
    one_round = schedule(round_jobs(exp, rates, cluster, clf_bytes), gpus, gpus_per_node, cluster, exp.parallelism,
                         trial_gpus == "split")
    return {**{k: v * exp.rounds if k.endswith("_s") else v for k, v in one_round.items()},
            "trials": exp.rounds * exp.trials_per_round}


def project(exp: Experiment, rates: Rates, cluster: Cluster, gpus_per_node: int, nodes: int, unet_bytes: float,
            clf_bytes: float, pretrain_schedule: str = "best", trial_gpus: str = "one") -> dict:
    """Wall and GPU hours of every stage on `nodes` x `gpus_per_node` GPUs, and the totals.

    preprocess: CPU only, every image (NIH + Kermany) once per variant, over cpus_per_node x nodes
    cores. masking: the lung-mask U-Net's forward pass over every image once (shared by both mask
    variants), split evenly over the GPUs. pretrain: pretrain_stage. tuning: tuning_stage.
    """
    gpus = gpus_per_node * nodes
    images = exp.nih_images + exp.kermany_train + exp.kermany_eval
    cpu_s = images * len(exp.variants) * rates.preprocess_cpu_s
    mask_s = images * cluster.forward_fraction / rates.at("unet", exp.mask_pixels)[0] \
        if any(m for _, m in exp.variants) else 0.0
    stages = {"preprocess": {"wall_s": cpu_s / (cluster.cpus_per_node * nodes), "gpu_s": 0.0, "cpu_core_s": cpu_s},
              "masking": {"wall_s": mask_s / gpus, "gpu_s": mask_s},
              "pretrain": pretrain_stage(exp, rates, cluster, gpus, gpus_per_node, unet_bytes, pretrain_schedule),
              "tuning": tuning_stage(exp, rates, cluster, gpus, gpus_per_node, clf_bytes, trial_gpus)}
    gpu_wall = sum(v["wall_s"] for k, v in stages.items() if k != "preprocess")
    return {"gpus_per_node": gpus_per_node, "nodes": nodes, "gpus": gpus,
            "stages": {k: {**v, "wall_h": v["wall_s"] / 3600, "gpu_h": v["gpu_s"] / 3600} for k, v in stages.items()},
            "total": {"wall_h": (gpu_wall + stages["preprocess"]["wall_s"]) / 3600,
                      "gpu_h": sum(v["gpu_s"] for v in stages.values()) / 3600, "gpu_h_held": gpus * gpu_wall / 3600}}


# --- inputs: measured here or read from a file ---------------------------------------------------

def parse_config(text: str) -> tuple[int, int]:
    """"GxN" -> (GPUs per node, nodes), both >= 1."""
    try:
        g, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BadInput(f"a configuration is GPUSxNODES (e.g. 8x2), got {text!r}") from None
    if g < 1 or n < 1:
        raise BadInput(f"a configuration needs >= 1 GPU and >= 1 node, got {text!r}")
    return g, n


def read_rates(path: str, policy: str) -> Rates:
    """Rates from device_step.py's --json file (or this command's own --save-rates file).

    `policy`: "auto" takes mixed_float16 where the file has it (the GPU default), else float32.
    """
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read rates file {path}: {exc}") from None
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise BadInput(f"rates file {path} has no 'results' list (write it with benchmarks/device_step.py --json)")
    try:
        policies = {r["policy"] for r in rows}
        chosen = ("mixed_float16" if "mixed_float16" in policies else "float32") if policy == "auto" else policy
        rates = {(r["model"], int(r["pixels"])): float(r["images_s"]) for r in rows if r["policy"] == chosen}
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"rates file {path}: a result lacks model/pixels/policy/images_s ({exc})") from None
    if not rates:
        raise BadInput(f"rates file {path} has no results for policy {chosen!r} (it has {sorted(policies)})")
    if any(not v > 0 for v in rates.values()):
        raise BadInput(f"rates file {path} has a rate <= 0")
    out = Rates(rates, f"{data.get('device', 'unknown device')}, {chosen} (from {os.path.basename(path)})")
    if float(data.get("preprocess_cpu_s", 0)) > 0:
        out.preprocess_cpu_s, out.preprocess_source = float(data["preprocess_cpu_s"]), f"from {os.path.basename(path)}"
    return out


def measure_steps(pixels: list[int], steps: int) -> Rates:
    """Training-step images/s of the three models here (float32, no XLA, batch 8: step_bench's build)."""
    from benchmarks.common import machine
    from benchmarks.step_bench import step_rate

    rates = {}
    for p in pixels:
        for m in MODELS:
            rates[(m, p)] = step_rate(m, p, "float32", False, steps)[0]
            print(f"measured {m} {p} px: {rates[(m, p)]:.2f} images/s", flush=True)
    return Rates(rates, f"this machine's CPU ({machine()}), float32")


def measure_preprocess(images: int, seconds: float) -> float:
    """CPU seconds per image of the preprocess stage (1 worker, 1024x1024 synthetic NIH PNG -> 512 px),
    repeated until about `seconds` have passed."""
    import shutil

    from benchmarks.common import cpu_seconds
    from benchmarks.preprocess_bench import manifest
    from neumo import preprocess, synthetic

    os.makedirs(WORKDIR, exist_ok=True)
    root = tempfile.mkdtemp(prefix="cost-", dir=WORKDIR)
    try:
        synthetic.write_nih(os.path.join(root, "nih"), images, size=1024)
        paths = sorted(os.path.join(root, "nih", f) for f in os.listdir(os.path.join(root, "nih")))
        config = preprocess.PreprocessConfig(acquisition_copies=0, pixels=512, workers=1)
        preprocess.prepare_variant(manifest(paths[:2], 1), config, os.path.join(root, "warm"))  # lazy imports
        done, cpu0, start = 0, cpu_seconds(), time.perf_counter()
        while done == 0 or time.perf_counter() - start < seconds:
            shutil.rmtree(os.path.join(root, "out"), ignore_errors=True)
            preprocess.prepare_variant(manifest(paths, 1), config, os.path.join(root, "out"))
            done += len(paths)
        return (cpu_seconds() - cpu0) / done
    finally:
        shutil.rmtree(root, ignore_errors=True)


def gradient_bytes() -> tuple[float, float]:
    """(U-Net autoencoder, classifier) float32 gradient bytes at the seed's filters 16, depth 4
    (parameter counts do not depend on pixels: fully convolutional, global pooling before the heads)."""
    from benchmarks.step_bench import build

    unet, _ = build("unet", 256)
    clf, _ = build("clf1", 256)
    return 4.0 * unet.count_params(), 4.0 * clf.count_params()


# --- output -------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    """Markdown table: configurations x stages, wall hours / GPU hours."""
    head = "| GPUs (per node x nodes) | " + " | ".join(f"{s} wall h / GPU h" for s in STAGES) + \
        " | total wall h | total GPU h (used / held) |"
    lines = [head, "|" + " --- |" * (len(STAGES) + 3)]
    for r in results:
        cells = []
        for s in STAGES:
            v = r["stages"][s]
            note = f" ({v['schedule']}, {v['gpus_per_job']}/variant)" if s == "pretrain" else ""
            cells.append(f"{v['wall_h']:.2f} / {v['gpu_h']:.2f}{note}")
        t = r["total"]
        lines.append(f"| {r['gpus']} ({r['gpus_per_node']}x{r['nodes']}) | " + " | ".join(cells)
                     + f" | {t['wall_h']:.2f} | {t['gpu_h']:.1f} / {t['gpu_h_held']:.1f} |")
    return "\n".join(lines)


def describe(exp: Experiment, rates: Rates, cluster: Cluster, unet_bytes: float, clf_bytes: float) -> list[str]:
    """The human lines above the table: what was measured, what is assumed, the experiment's sizes."""
    lines = [f"MEASURED on {rates.device}: training-step images/s, batch {exp.batch}"]
    for m in MODELS:
        for p in sorted({p for p, _ in exp.variants} | {exp.mask_pixels}):
            rate, how = rates.at(m, p)
            kind = "measured" if how.startswith("measured") else "PROJECTED"
            lines.append(f"  {m:5s} {p:4d} px: {rate:9.2f} images/s  [{kind}: {how}]")
    lines.append(f"MEASURED preprocessing: {rates.preprocess_cpu_s * 1000:.2f} CPU ms/image ({rates.preprocess_source})")
    lines.append(f"EXPERIMENT (the seed's; flags change it): {asdict(exp)}")
    lines.append(f"ASSUMED: {asdict(cluster)}; gradient bytes (float32, counted): U-Net {unet_bytes / 1e6:.1f} MB, "
                 f"classifier {clf_bytes / 1e6:.1f} MB")
    lines.append("ASSUMED: per-GPU batch stays 8 (k GPUs: global batch 8k, same epochs); trials run every epoch "
                 "(no early stop); preprocessing and masking shard perfectly; GPU h used = GPUs given to running "
                 "jobs x time, held = all GPUs x the GPU stages' wall time")
    return lines


def parser() -> argparse.ArgumentParser:
    """The command line; a bad flag raises BadInput (one line) instead of argparse's usage text."""
    class OneLine(argparse.ArgumentParser):
        def error(self, message):
            raise BadInput(message)

    p = OneLine(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", help="a device_step.py --json file (GPU rates); default: measure here")
    p.add_argument("--policy", default="auto", help="precision policy to read from --rates (auto: mixed if present)")
    p.add_argument("--measure-pixels", type=int, nargs="+", default=[128], help="sizes to measure step rates at here")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measured rate (after a warm-up step)")
    p.add_argument("--preprocess-images", type=int, default=16, help="synthetic NIH PNGs to time preprocessing on")
    p.add_argument("--preprocess-seconds", type=float, default=5.0)
    p.add_argument("--preprocess-ms", type=float, help="CPU ms per image to use instead of measuring it")
    p.add_argument("--save-rates", help="write the rates measured here to this file (reusable with --rates)")
    p.add_argument("--configs", nargs="+", default=["1x1", "4x1", "8x1", "8x2", "8x4"], help="GPUSxNODES")
    p.add_argument("--pretrain-schedule", choices=("best", "concurrent", "sequential"), default="best")
    p.add_argument("--trial-gpus", choices=("one", "split"), default="one")
    p.add_argument("--json", help="write the inputs and the projection to this file")
    for name, value in asdict(Experiment()).items():
        if name != "variants":
            p.add_argument("--" + name.replace("_", "-"), type=type(value), help="experiment size (default: the seed's, printed)")
    for name, value in asdict(Cluster()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help="assumption")
    return p


def inputs(args) -> tuple[Experiment, Cluster, Rates]:
    """The experiment, the assumptions and the rates the flags ask for (measuring what is not given)."""
    exp = Experiment.seed(**{k: getattr(args, k) for k in asdict(Experiment()) if getattr(args, k, None) is not None})
    cluster = Cluster(**{k: getattr(args, k) for k in asdict(Cluster())})
    exp.check()
    cluster.check()
    if args.steps < 1 or args.preprocess_images < 1 or any(p < 16 or p % 16 for p in args.measure_pixels):
        raise BadInput("--steps and --preprocess-images must be >= 1, --measure-pixels multiples of 16 (depth 4)")
    rates = read_rates(args.rates, args.policy) if args.rates else measure_steps(args.measure_pixels, args.steps)
    if args.preprocess_ms is not None:
        if args.preprocess_ms <= 0:
            raise BadInput("--preprocess-ms must be > 0")
        rates.preprocess_cpu_s, rates.preprocess_source = args.preprocess_ms / 1000, "given with --preprocess-ms"
    elif not rates.preprocess_cpu_s:
        rates.preprocess_cpu_s = measure_preprocess(args.preprocess_images, args.preprocess_seconds)
        rates.preprocess_source = "measured here: the stage, 1 worker, 1024 px synthetic NIH PNG -> 512 px"
    return exp, cluster, rates


def save_rates(path: str, rates: Rates) -> None:
    """The measured rates in device_step.py's --json layout (plus preprocess_cpu_s), for --rates."""
    rows = [{"model": m, "pixels": p, "policy": "float32", "images_s": round(v, 4)} for (m, p), v in rates.images_s.items()]
    with open(path, "w") as fh:
        json.dump({"device": rates.device, "batch": 8, "results": rows, "preprocess_cpu_s": rates.preprocess_cpu_s}, fh,
                  indent=2)


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
        configs = [parse_config(c) for c in args.configs]
        setup("cost model")
        exp, cluster, rates = inputs(args)
        unet_bytes, clf_bytes = gradient_bytes()
        results = [project(exp, rates, cluster, g, n, unet_bytes, clf_bytes, args.pretrain_schedule, args.trial_gpus)
                   for g, n in configs]
        lines = describe(exp, rates, cluster, unet_bytes, clf_bytes)
    except BadInput as exc:
        print(f"cost_model: {exc}", file=sys.stderr)
        return 2
    if args.save_rates:
        save_rates(args.save_rates, rates)
    print("\n".join(lines))
    print("PROJECTED (wall hours / GPU hours per stage; preprocessing is CPU: its CPU core hours "
          f"{results[0]['stages']['preprocess']['cpu_core_s'] / 3600:.1f}):")
    print(table(results))
    for r in results:
        report(bench="cost_model", gpus=r["gpus"], nodes=r["nodes"], wall_h=round(r["total"]["wall_h"], 3),
               gpu_h=round(r["total"]["gpu_h"], 2), **{f"{s}_wall_h": round(r["stages"][s]["wall_h"], 3) for s in STAGES})
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"experiment": asdict(exp), "assumptions": asdict(cluster),
                       "measured": {"device": rates.device, "step_images_s": [
                           {"model": m, "pixels": p, "images_s": v} for (m, p), v in rates.images_s.items()],
                           "preprocess_cpu_s_per_image": rates.preprocess_cpu_s,
                           "preprocess_source": rates.preprocess_source},
                       "gradient_bytes": {"unet": unet_bytes, "classifier": clf_bytes},
                       "projected": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
