"""The command line every neumo pipeline shares: compile it, run it here (kfp.local), submit one
run to a cluster, or schedule recurring runs.

Parameter values come from a preset (`--preset`, default: the declared defaults), then a JSON file
(`--params FILE`), then `--set NAME=VALUE` flags, each parsed and checked by `neumo.parameters`
(unknown names, types, ranges) and the search space and trial configuration by `neumo.trial`,
before anything is compiled or run. The values are baked into the compiled YAML as the pipeline's
parameter defaults, so what you compile is what runs. Needs only `kfp` and `kfp-kubernetes`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "shared"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from components import images as placeholders  # noqa: E402
from neumo import parameters  # noqa: E402
from pipelines.placement import Images, Placement  # noqa: E402

logger = logging.getLogger("neumo.pipeline")
#: The project's log format (components and the `neumo` command log in it too).
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

#: What `make push` records: the images it pushed for this commit (images/README.md).
PUSHED = ROOT / "images" / "pushed.json"


def git_tag() -> str:
    """The tag `make build push` gives this commit's images (the same `git describe`)."""
    try:
        done = subprocess.run(["git", "describe", "--tags", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
    except OSError:
        return "dev"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "dev"


def resolve_images(registry: str | None, tag: str | None) -> Images:
    """The images to bake in: those `make push` recorded in images/pushed.json (unless a registry
    or tag is given), else REGISTRY/neumo-{cpu,gpu}:TAG with the registry's default and the tag
    from git, as `make build push` names them."""
    pushed = json.loads(PUSHED.read_text()) if registry is None and tag is None and PUSHED.exists() else {}
    registry = registry or pushed.get("registry") or placeholders.REGISTRY
    tag = tag or pushed.get("tag") or git_tag()
    return Images(**{f: pushed.get(f, f"{registry}/neumo-{f}:{tag}") for f in ("cpu", "gpu")})


def parameter_list(declared=parameters.PARAMETERS) -> str:
    """Every parameter (of `declared`) with its default and meaning, for --help (from the declaration)."""
    lines = ["parameters (--set NAME=VALUE; declared in shared/neumo/parameters.py):"]
    for p in declared:
        default = "required" if p.required else json.dumps(p.default)
        lines.append(f"  {p.name} = {default}{'  [compile time]' if p.graph else ''}\n      {p.help}")
    lines.append(f"presets (--preset NAME): {', '.join(parameters.PRESETS)}; `neumo preset NAME` prints one")
    return "\n".join(lines)


def build_parser(doc: str, single: bool, kind: str = "train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, epilog=parameter_list(parameters.of(kind)),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if single:
        p.add_argument("--config", metavar="FILE", help="the trial configuration (JSON; configs/ has examples): its "
                       "hyperparameters, or {\"trial\": {...}, \"parameters\": {...}} with the run's other settings "
                       "(configs/recommended.json), which --params and --set override")
    p.add_argument("--compile", nargs="?", const="", metavar="PATH", help="write the pipeline YAML (default: NAME.yaml)")
    p.add_argument("--local", action="store_true", help="run the pipeline here with kfp.local")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="local runs: show everything (kfp.local, TensorFlow, each task's output) on the terminal "
                   "instead of the project's lines and a log file (WORKDIR/logs/)")
    p.add_argument("--preset", choices=sorted(parameters.PRESETS), default="default",
                   help="a named set of parameter values (neumo.parameters.PRESETS)")
    p.add_argument("--workdir", default=str(ROOT / "work" / "local"), help="local runs: artifacts, results")
    p.add_argument("--params", "--params-file", dest="params", metavar="FILE", help="a JSON file of parameter values")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="one parameter's value (JSON for search_space and config); repeatable")
    if not single and kind == "train":
        p.add_argument("--rounds", type=int, help="tuning rounds (compile time)")
        p.add_argument("--trials-per-round", "--trials", dest="trials_per_round", type=int,
                       help="trials per round (compile time)")
    if not single:
        p.add_argument("--parallelism", type=int, help="tasks of one loop running at once (compile time)")
    p.add_argument("--registry", help="image registry (default: images/pushed.json from `make push`, else "
                   f"{placeholders.REGISTRY})")
    p.add_argument("--image-tag", help="image tag (default: images/pushed.json, else `git describe`)")
    p.add_argument("--gpu-type", default=Placement.gpu_type)
    p.add_argument("--gpu-limit", type=int, default=Placement.gpu_limit)
    p.add_argument("--gpu-node-selector", default="=".join(Placement.gpu_node_selector), metavar="KEY=VALUE")
    p.add_argument("--retries", type=int, default=Placement.retries)
    cluster = p.add_argument_group("Kubeflow cluster (pipelines/submit.py; token from $KF_PIPELINES_TOKEN)")
    cluster.add_argument("--submit", action="store_true", help="compile, then create one run on the cluster")
    cluster.add_argument("--schedule", metavar="CRON", help="compile, then create a recurring run (6 cron fields, "
                         "seconds first: '0 0 2 * * 1' is Mondays 02:00); one run at a time, no catch-up")
    cluster.add_argument("--host", help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT, else kube config)")
    cluster.add_argument("--experiment", default="neumo", help="experiment name (created if absent)")
    cluster.add_argument("--run-name", help="run / recurring run name")
    cluster.add_argument("--pipeline-root", help="artifact root for the run, e.g. gs://BUCKET/pipeline-root")
    cluster.add_argument("--service-account", help="Kubernetes service account of the run's pods (neumo-pipeline: "
                         "manifests/)")
    cluster.add_argument("--namespace", help="multi-user Kubeflow: the profile namespace")
    return p


def user_values(args: argparse.Namespace, base: dict | None = None) -> tuple[dict, dict]:
    """(every value: the preset, then `base` (a configuration file's parameters), then --params
    FILE, then each --set; only what the user gave)."""
    given: dict = dict(base or {})
    if args.params:
        try:
            from_file = json.loads(Path(args.params).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--params {args.params}: cannot read a JSON object of parameters ({err})") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"--params {args.params}: expected a JSON object of parameters")
        given.update(from_file)
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes NAME=VALUE, got {item!r}")
        given[name] = text
    for name in ("rounds", "trials_per_round", "parallelism"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    values = parameters.apply(parameters.preset(args.preset), given)
    return values, {k: values[k] for k in given}


#: The keys of a configuration file that holds more than a trial (configs/recommended.json).
CONFIG_KEYS = ("trial", "parameters", "about")


def read_config(path: str) -> tuple[dict, dict]:
    """(the trial's hyperparameters, the run's other parameters) of a --config file: either the
    trial alone, or {"trial": {...}, "parameters": {...}, "about": "..."}."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path}: cannot read a JSON trial configuration ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: must hold a JSON object of the trial's hyperparameters")
    if "trial" not in config:
        return config, {}
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {unknown}; a configuration with a \"trial\" has "
                         f"{', '.join(CONFIG_KEYS)}")
    trial, params = config["trial"], config.get("parameters", {})
    if not isinstance(trial, dict) or not isinstance(params, dict):
        raise ValueError(f"--config {path}: \"trial\" and \"parameters\" must be JSON objects")
    bad = sorted(k for k in params if k in ("config", "rounds", "trials_per_round"))
    if bad:
        raise ValueError(f"--config {path}: \"parameters\" cannot set {bad} (a single run trains its trial "
                         "ensemble_size times, once)")
    for name, value in params.items():
        try:
            parameters.parse(name, value)
        except ValueError as err:
            raise ValueError(f"--config {path}: parameters.{name}: {err}") from None
    return trial, params


def check(values: dict) -> None:
    """The rules a run applies, applied now: the search space, and the trial configuration."""
    from neumo.trial import SearchSpace, TrialConfig

    SearchSpace.from_dict(values["search_space"])
    if values["config"]:
        TrialConfig.from_dict(values["config"])


def main(factory, *, name: str, doc: str, argv=None, single: bool = False, kind: str = "train") -> int:
    """The command line over a pipeline factory (`create_pipeline` of pipelines/full.py).
    `single`: one configuration (--config FILE), no tuning: a graph of one round of one trial.
    `kind`: whose parameters the pipeline takes (neumo.parameters.of: "train" or "predict")."""
    args = build_parser(doc, single, kind).parse_args(argv)
    own = parameters.of(kind)
    # From the command line, a local run shows the project's lines and logs the rest to a file (run_logged);
    # a caller passing argv, -v, and the child run_logged starts get everything here (run_local).
    logged = args.local and not args.verbose and argv is None
    configure_logging(compact=logged)
    remote = args.submit or args.schedule
    if args.compile is None and not args.local and not remote:
        raise SystemExit("nothing to do: give --compile [PATH], --local, --submit or --schedule CRON")
    if args.local and remote:
        raise SystemExit("--local runs here; --submit/--schedule send the pipeline to a cluster: choose one")
    key, sep, value = args.gpu_node_selector.partition("=")
    if not sep:
        raise SystemExit(f"--gpu-node-selector must be KEY=VALUE, got {args.gpu_node_selector!r}")
    try:
        trial, from_config = ({}, {})
        if single:
            if not args.config:
                raise ValueError("--config FILE is required: the trial configuration to train (see configs/)")
            trial, from_config = read_config(args.config)
        values, given = user_values(args, from_config)
        if single:
            values["config"] = given["config"] = parameters.parse("config", trial)
            # one round of `ensemble_size` seeds of the configuration (one trial when 1)
            members = max(1, int(values["ensemble_size"]))
            values.update(rounds=1, trials_per_round=members, parallelism=members)
        foreign = sorted(set(given) - {p.name for p in own})
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not a parameter of {name} (its parameters: "
                             f"{', '.join(p.name for p in own)})")
        if kind == "train":
            check(values)
        # Retries are for preempted pods on a cluster; a local run fails fast instead.
        retries = 0 if args.local and args.compile is None else args.retries
        placement = Placement(gpu_type=args.gpu_type, gpu_limit=args.gpu_limit, gpu_node_selector=(key, value),
                              retries=retries)
    except ValueError as err:
        raise SystemExit(f"{name}: {err}") from None
    graph = {p.name: values[p.name] for p in own if p.graph}
    values = {p.name: values[p.name] for p in own if not p.graph}
    images = resolve_images(args.registry, args.image_tag)
    try:
        pipeline = factory(**graph, values=values, placement=placement, images=images, name=name)
    except ValueError as err:  # a graph parameter out of range (rounds, preprocess_shards, ...)
        raise SystemExit(f"{name}: {err}") from None
    # the local runner takes the parameters as arguments; the compiled YAML has them as defaults
    if args.compile is not None or remote:
        compile_to(pipeline, args.compile or "", name, images, remote, args, {k: given[k] for k in given if k in values})
    if args.local:
        workdir = Path(args.workdir).resolve()
        if "results_uri" in values:
            values["results_uri"] = values["results_uri"] or str(workdir / "results")
        missing = [p.name for p in own if p.required and not p.graph and not values[p.name]]
        if missing and kind != "train":
            raise SystemExit(f"{missing[0]} is required: --set {missing[0]}=PATH_OR_GS_URI")
        if missing:
            raise SystemExit("dataset_uri is required: --set dataset_uri=PATH_OR_GS_URI (or --params FILE, e.g. "
                             "the one `neumo demo-data` writes)")
        if logged:
            return run_logged([sys.executable, *sys.orig_argv[1:], "--verbose"], workdir)
        run_local(pipeline, values, workdir)
    return 0


def compile_yaml(pipeline, path: str) -> None:
    """Write the YAML; byte-identical for the same inputs. (KFP's header comment prints dict
    defaults in protobuf's map order, which changes from one process to the next: sorted here.)"""
    import ast
    import re

    from kfp import compiler

    compiler.Compiler().compile(pipeline, path)
    header = re.compile(r"^(#\s+\w+: dict \[Default: )(\{.*\})(\])$")

    def sort_keys(line: str) -> str:
        m = header.match(line)
        if not m:
            return line
        value = ast.literal_eval(m.group(2))
        return m.group(1) + repr(dict(sorted(value.items()))) + m.group(3)

    text = Path(path).read_text()
    Path(path).write_text("\n".join(sort_keys(line) for line in text.split("\n")))


def compile_to(pipeline, path: str, name: str, images: Images, remote: bool, args, given: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        package = path or (os.path.join(tmp, f"{name}.yaml") if remote else f"{name}.yaml")
        compile_yaml(pipeline, package)
        if not remote or path:
            logger.info("wrote %s (images: %s, %s)", package, images.cpu, images.gpu)
        if remote:
            submit(package, args, given)


def submit(package: str, args, params: dict) -> None:
    from pipelines import submit as cluster_api

    cluster = dict(host=args.host, experiment=args.experiment, pipeline_root=args.pipeline_root,
                   service_account=args.service_account, namespace=args.namespace)
    try:
        if args.submit:
            cluster_api.submit(package, params, run_name=args.run_name, **cluster)
        if args.schedule:
            cluster_api.schedule(package, params, cron=args.schedule, name=args.run_name or Path(package).stem,
                                 **cluster)
    except ValueError as err:
        raise SystemExit(str(err)) from err


def run_local(pipeline, values: dict, workdir: Path) -> None:
    """Run the pipeline here through kfp.local (one subprocess per task, this Python), logging
    "task k of n" as tasks start and finish, and stopping at the first failed task."""
    import warnings

    from kfp import local

    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    # TensorFlow's C++ INFO and WARNING lines (CPU features, oneDNN) in every task; TF_CPP_MIN_LOG_LEVEL=0 keeps them
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    workdir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "pipeline_root"),
               raise_on_error=True)
    tasks = LocalTasks(pipeline.pipeline_spec)
    with own_handler(logger):
        try:
            with tasks.watching():
                pipeline(**values)
        except (TaskFailed, RuntimeError):  # RuntimeError: kfp.local's "finished with status FAILURE"
            if tasks.failed is None:
                raise
            raise SystemExit(f"FAILED: task {tasks.failed}; its error is in the output above") from None
        results = values.get("results_uri")
        if not results:
            logger.info("done. Every artifact is under %s", workdir / "pipeline_root")
            return
        logger.info("done. CSVs: %s/train_max_unsupervised.csv and %s/image_class_evaluation_unsupervised.csv; "
                    "models, report and every artifact under %s", results, results, workdir / "pipeline_root")


@contextlib.contextmanager
def own_handler(log: logging.Logger):
    """`log` writes through a handler of its own, in the project's format, while in the block.
    kfp.local swaps the root logger's handlers for its own around each task, and when two tasks
    run at once (a loop's parallelism) can leave its own there: the runner's lines keep their format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    propagate, log.propagate = log.propagate, False
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


# --- local runs a person can follow ---------------------------------------------------------------
#
# `run_local` (in the process that runs kfp.local) counts the tasks and logs a line as each starts
# and finishes; `run_logged` runs that in a child process, writes everything it prints to a log
# file, and shows a person the lines `RunView` picks: these task lines and the project's own.

TASK_STARTED = "task %d of %s: %s started"
TASK_FINISHED = "task %d of %s: %s finished in %s (%s since the start)"
TASK_FAILED = "task %d of %s: %s FAILED after %s"
#: What RunView reads back from those three lines.
TASK_LINE = re.compile(r"^task (?P<k>\d+) of (?P<n>\d+\+?): (?P<task>.+?) (?P<event>started|finished|FAILED)(?: |$)")


class TaskFailed(Exception):
    """Raised into kfp.local's orchestrator to end the run: a task failed, nothing else starts."""


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class LocalTasks:
    """The tasks of one kfp.local run: counts them ("task k of n"), times them, and stops the run at
    the first failure.

    n counts the tasks that will run: those of each ParallelFor once the task whose output it loops
    over has finished (until then n is shown with a '+'). kfp.local (2.17) skips only the tasks
    downstream of a failed task and still starts every other one (suggest after a failed ingest),
    even with raise_on_error=True: that is raised only when the whole DAG is done. So a failed task
    raises TaskFailed from kfp.local's single-task executor, which ends the DAG loop, and any task
    asked to start afterwards (a loop's queued iterations) raises it without starting."""

    def __init__(self, spec):
        self.spec = spec
        self.sizes: dict[tuple[str, str], int] = {}  # (producer task, output key) -> items of the list
        self.started = 0
        self.failed: str | None = None  # "ingest (2 of 8+)"
        self.lock = threading.Lock()
        self.start = time.monotonic()

    def count(self, dag=None) -> tuple[int, list[str]]:
        """(tasks known to run, the tasks whose outputs size the loops not yet counted)."""
        dag = dag if dag is not None else self.spec.root.dag
        known, pending = 0, []
        for task in dag.tasks.values():
            component = self.spec.components[task.component_ref.name]
            if component.WhichOneof("implementation") != "dag":
                known += 1
                continue
            inner, inner_pending = self.count(component.dag)
            items, producer = self.loop_size(task)
            if items is None:
                pending.append(producer)
            else:
                known += items * inner
                pending += inner_pending if items else []
        return known, pending

    def loop_size(self, task) -> tuple[int | None, str]:
        """(how many times the task's body runs, or None: not known yet; what it waits for)."""
        if task.WhichOneof("iterator") is None:
            return 1, ""
        if task.WhichOneof("iterator") == "parameter_iterator":
            items = task.parameter_iterator.items
            if items.HasField("raw"):
                return len(json.loads(items.raw)), ""
            source = task.inputs.parameters[items.input_parameter]
            if source.HasField("task_output_parameter"):
                out = source.task_output_parameter
                return self.sizes.get((out.producer_task, out.output_parameter_key)), out.producer_task
        return None, task.task_info.name

    def total(self) -> str:
        known, pending = self.count()
        return f"{known}+" if pending else str(known)

    def learn(self, task_name: str, resource: str, outputs: dict) -> None:
        """A root task's list outputs size the loops over them."""
        if "/" not in resource:
            for key, value in (outputs or {}).items():
                if isinstance(value, list):
                    self.sizes[(task_name, key)] = len(value)

    def run(self, execute, *args, **kwargs):
        """Stands in for kfp.local's execute_single_task (same arguments, same result)."""
        from kfp.local import status

        name, spec = kwargs["task_name"], kwargs["task_spec"]
        resource = kwargs["pipeline_resource_name"]
        # a loop iteration runs under ".../for-loop-2-iteration-1": "train[1]"
        label = (spec.task_info.name or name) + "".join(f"[{i}]" for i in re.findall(r"-iteration-(\d+)", resource))
        with self.lock:
            if self.failed is not None:
                raise TaskFailed(f"{label} not started: task {self.failed} failed")
            self.started += 1
            k = self.started
        logger.info(TASK_STARTED, k, self.total(), label)
        began = time.monotonic()
        outputs, task_status = execute(*args, **kwargs)
        took = time.monotonic() - began
        if task_status != status.Status.SUCCESS:
            with self.lock:
                n = self.total()
                self.failed = self.failed or f"{label} ({k} of {n})"
            logger.error(TASK_FAILED, k, n, label, duration(took))
            raise TaskFailed(f"task {label} failed")
        with self.lock:
            self.learn(name, resource, outputs)
        logger.info(TASK_FINISHED, k, self.total(), label, duration(took), duration(time.monotonic() - self.start))
        return outputs, task_status

    @contextlib.contextmanager
    def watching(self):
        """kfp.local runs each task through this object's `run` while in the block."""
        from kfp.local.orchestrator import task_executor

        original = task_executor.execute_single_task

        def execute(*args, **kwargs):
            return self.run(original, *args, **kwargs)

        known, pending = self.count()
        name = self.spec.pipeline_info.name
        if pending:
            logger.info("running %s here: %d tasks, and those of the loops over the outputs of %s once they "
                        "finish (n has a '+' until then)", name, known, ", ".join(sorted(set(pending))))
        else:
            logger.info("running %s here: %d tasks", name, known)
        task_executor.execute_single_task = execute
        try:
            yield self
        finally:
            task_executor.execute_single_task = original


#: Lines of the project's format ("%(asctime)s %(name)s %(levelname)s %(message)s") from a neumo logger.
PROJECT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<name>neumo[\w.]*) "
                          r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) (?P<message>.*)$")
#: Lines a component logs inside KFP's executor, whose format (no logger name) wins over the
#: component's basicConfig (it runs first); KFP's own lines there start with EXECUTOR_OWN.
EXECUTOR_LINE = re.compile(r"^\[KFP Executor \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
                           r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\]: (?P<message>.*)$")
EXECUTOR_OWN = ("Looking for component", "--component_module_path is not specified", "Loading KFP component",
                "Got executor_input", "Wrote executor output file", "Did not write output file")
#: The last line of a Python traceback: "ValueError: no files under ...".
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)(?::.*)?$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RunView:
    """Reads the full output of a local run line by line and picks what a person follows: the task
    lines and the project's own (the neumo loggers, and what components log inside KFP's executor
    other than KFP's own lines). Remembers the failed task and the reason to give for it."""

    def __init__(self):
        self.failed: str | None = None  # "ingest (2 of 8+)"
        self.running: dict[str, str] = {}  # task -> "k of n"
        self.exception = ""  # the last exception line since a task started
        self.error = ""  # the last project ERROR message
        self.last = ""  # the last non-blank line

    def feed(self, raw: str) -> tuple[int, str] | None:
        """(level, text) to show for one line of output, or None."""
        line = ANSI.sub("", raw).strip()
        if not line:
            return None
        self.last = line
        if EXCEPTION_LINE.match(line):
            self.exception = line
        m = PROJECT_LINE.match(line) or EXECUTOR_LINE.match(line)
        if m is None or (m.re is EXECUTOR_LINE and m["message"].startswith(EXECUTOR_OWN)):
            return None
        level, message = logging.getLevelName(m["level"]), m["message"]
        task = TASK_LINE.match(message) if m.re is PROJECT_LINE else None
        if task:
            label = task["task"]
            if task["event"] == "started":
                self.running[label] = f"{task['k']} of {task['n']}"
                self.exception = self.error = ""
            else:
                self.running.pop(label, None)
            if task["event"] == "FAILED" and self.failed is None:
                self.failed = f"{label} ({task['k']} of {task['n']})"
            return level, message
        if level >= logging.ERROR:
            self.error = message
        prefix = "" if level == logging.INFO else logging.getLevelName(level) + " "
        # the runner's own lines flush left, the stages' under the task lines
        indent = "" if m.re is PROJECT_LINE and m["name"] == logger.name else "  "
        return level, indent + prefix + message

    def reason(self) -> str:
        text = self.exception or self.error or "exited with an error (see the full log)"
        return text if len(text) <= 400 else text[:400] + "..."


def log_path(workdir: Path) -> Path:
    """WORKDIR/logs/run-YYYYmmdd-HHMMSS.log, a new file each run."""
    folder = workdir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    stem = "run-" + time.strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"{stem}.log", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.log"
    return path


def stop(child: subprocess.Popen, first: int, grace: float = 10.0) -> None:
    """Signal the child's process group (it and its tasks), then kill it if still there after `grace` s."""
    for sig, wait in ((first, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            child.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(command: list[str], workdir: Path, *, grace: float = 5.0) -> int:
    """Run `command` (this local run again, with --verbose) in a child process: everything it and
    its tasks print goes to a log file named first and last; the terminal gets RunView's lines. A
    failure ends with the failed task and its reason, then the log's path. Returns the exit status.

    The child has its own process group: once a task has failed, tasks still running (a loop's other
    iterations) are stopped after `grace` seconds; Ctrl-C stops them all."""
    path = log_path(workdir)
    logger.info("full log: %s", path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines reach the log and the view as they are written
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    view = RunView()
    began, interrupted, stopping = time.monotonic(), False, None
    with open(path, "w", encoding="utf-8", buffering=1) as log:
        log.write(f"# {shlex.join(command)}\n")
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, encoding="utf-8", errors="replace", env=env, start_new_session=True)
        while True:
            try:
                for raw in child.stdout:
                    log.write(ANSI.sub("", raw))
                    shown = view.feed(raw)
                    if shown:
                        logger.log(*shown)
                    if view.failed and stopping is None:
                        stopping = threading.Timer(grace, lambda: child.poll() is None and stop(child, signal.SIGTERM))
                        stopping.daemon = True
                        stopping.start()
                break
            except KeyboardInterrupt:  # Ctrl-C reaches this process only: pass it on, keep reading
                first = signal.SIGKILL if interrupted else signal.SIGINT
                interrupted = True
                threading.Thread(target=stop, args=(child, first), daemon=True).start()
        code = child.wait()
        if stopping is not None:
            stopping.cancel()
        if code == 0:
            summary = [(logging.INFO, f"finished in {duration(time.monotonic() - began)}; full log: {path}")]
        else:
            if view.failed:
                ending = f"FAILED: task {view.failed}: {view.reason()}"
            elif interrupted:
                ending = "interrupted" + (f" while running {', '.join(view.running)}" if view.running else "")
            else:
                ending = f"FAILED: {view.exception or view.error or view.last or f'exit status {code}'}"
            summary = [(logging.ERROR, f"stopped the tasks still running: {', '.join(view.running)}")] \
                if view.failed and view.running else []
            summary += [(logging.ERROR, ending), (logging.INFO, f"full log: {path}")]
        for level, text in summary:
            log.write(text + "\n")
            logger.log(level, text)
    return 0 if code == 0 else 130 if interrupted else 1


def configure_logging(compact: bool = False) -> None:
    """The project's log format; `compact` (what a person watches a local run with): time and message."""
    if compact:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    else:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
