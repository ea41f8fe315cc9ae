"""CONTRACT test of pipelines/submit.py (and `pipelines/full.py --submit/--schedule`) against a
fake Kubeflow Pipelines API server.

No cluster runs here, so a small `http.server` on 127.0.0.1 speaks the KFP v2beta1 REST endpoints
that the kfp 2.17.3 client calls for these operations (read from kfp/client/client.py and
kfp_server_api): GET /apis/v2beta1/healthz, GET and POST /apis/v2beta1/experiments, POST
/apis/v2beta1/runs, POST /apis/v2beta1/recurringruns. It records every request; the tests assert
what a real server would receive: the compiled pipeline and platform spec embedded in the body,
the parameters, the cron expression, one run at a time, no catch-up, the bearer token. What the
real server then does with them is outside this test.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from neumo import parameters

from pipelines import full, submit

API = "/apis/v2beta1"
PARAMS = ["--set", "dataset_uri=gs://neumo-data/chest_xray", "--set", "results_uri=gs://neumo-data/results",
          "--set", "epochs=3"]


class FakeKFP:
    """Records requests; answers like the KFP API server for the endpoints the client uses."""

    def __init__(self, experiments=()):
        self.requests: list[dict] = []
        self.experiments = {name: f"exp-{i}" for i, name in enumerate(experiments)}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, method: str) -> dict:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                request = {"method": method, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                           "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                fake.requests.append(request)
                return request

            def do_GET(self):
                request = self._record("GET")
                if request["path"] == f"{API}/healthz":
                    return self._reply(200, {"multi_user": False})
                if request["path"] == f"{API}/experiments":
                    wanted = json.loads(request["query"]["filter"][0])["predicates"][0]["stringValue"]
                    found = [{"experiment_id": eid, "display_name": name}
                             for name, eid in fake.experiments.items() if name == wanted]
                    return self._reply(200, {"experiments": found} if found else {})
                return self._reply(404, {"error": f"unexpected GET {request['path']}"})

            def do_POST(self):
                request = self._record("POST")
                body = request["body"]
                if request["path"] == f"{API}/experiments":
                    eid = f"exp-{len(fake.experiments)}"
                    fake.experiments[body["display_name"]] = eid
                    return self._reply(200, {**body, "experiment_id": eid})
                if request["path"] == f"{API}/runs":
                    return self._reply(200, {**body, "run_id": "run-1", "state": "PENDING"})
                if request["path"] == f"{API}/recurringruns":
                    return self._reply(200, {**body, "recurring_run_id": "rr-1", "status": "ENABLED"})
                return self._reply(404, {"error": f"unexpected POST {request['path']}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def one(self, method: str, path: str) -> dict:
        found = [r for r in self.requests if (r["method"], r["path"]) == (method, path)]
        assert len(found) == 1, self.calls()
        return found[0]


@pytest.fixture(autouse=True)
def isolated_client(tmp_path, monkeypatch):
    """No real KFP context file, endpoint or token from the machine running the tests."""
    from kfp.client import client as kfp_client

    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                 "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", submit.TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("submit") / "neumo-full.yaml"
    assert full.main(["--compile", str(path), "--image-tag", "t-test"]) == 0
    return path


def _assert_spec_embedded(body: dict, package: Path):
    pipeline_spec, platform_spec = yaml.safe_load_all(package.read_text())
    embedded = body["pipeline_spec"]
    assert embedded["pipeline_spec"]["pipelineInfo"]["name"] == "neumo-full"
    assert embedded["pipeline_spec"]["deploymentSpec"] == pipeline_spec["deploymentSpec"]
    assert embedded["platform_spec"] == platform_spec  # node selectors and tolerations travel with the run


def test_submit_creates_the_experiment_then_one_run_with_spec_and_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv(submit.TOKEN_ENV, "token-123")
    package = tmp_path / "submitted.yaml"  # the values given are baked into this one's defaults
    with FakeKFP() as kfp_api:
        assert full.main(["--submit", "--compile", str(package), "--image-tag", "t-test", "--host", kfp_api.url,
                          "--experiment", "neumo-test", "--run-name", "nightly-check",
                          "--pipeline-root", "gs://neumo-data/pipeline-root", "--service-account", "neumo-pipeline",
                          *PARAMS]) == 0
    assert kfp_api.calls() == [("GET", f"{API}/healthz"), ("GET", f"{API}/experiments"),
                               ("POST", f"{API}/experiments"), ("POST", f"{API}/runs")]
    assert all(r["headers"].get("authorization") == "Bearer token-123" for r in kfp_api.requests)
    assert kfp_api.one("POST", f"{API}/experiments")["body"]["display_name"] == "neumo-test"
    run = kfp_api.one("POST", f"{API}/runs")["body"]
    assert run["experiment_id"] == "exp-0" and run["display_name"] == "nightly-check"
    assert run["service_account"] == "neumo-pipeline"
    assert run["runtime_config"] == {"pipeline_root": "gs://neumo-data/pipeline-root", "parameters": {
        "dataset_uri": "gs://neumo-data/chest_xray", "results_uri": "gs://neumo-data/results", "epochs": 3}}
    _assert_spec_embedded(run, package)


def test_schedule_creates_a_recurring_run_one_at_a_time_without_catchup(package):
    with FakeKFP(experiments=["neumo"]) as kfp_api:  # an existing experiment is reused, not created
        assert full.main(["--schedule", "0 0 2 * * 1", "--image-tag", "t-test", "--host", kfp_api.url,
                          "--params-file", str(_params_file(package.parent))]) == 0
    assert ("POST", f"{API}/experiments") not in kfp_api.calls()
    assert kfp_api.calls()[-1] == ("POST", f"{API}/recurringruns")
    assert "authorization" not in kfp_api.requests[-1]["headers"]  # no token set: none sent
    body = kfp_api.one("POST", f"{API}/recurringruns")["body"]
    assert body["experiment_id"] == "exp-0" and body["display_name"] == "neumo-full"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * 1"}}
    assert body["max_concurrency"] in ("1", 1) and body["no_catchup"] is True and body["mode"] == "ENABLE"
    # a search space that names some dimensions is completed from the default before it is sent
    full_space = {**parameters.DEFAULT_SEARCH_SPACE, "pixels": [256], "model": [1]}
    assert body["runtime_config"]["parameters"] == {"dataset_uri": "gs://d/x", "results_uri": "gs://d/r",
                                                    "search_space": full_space}
    # compiled to a temporary file (no --compile): the same pipeline as the one compiled beside it
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "neumo-full"
    assert body["pipeline_spec"]["platform_spec"] == list(yaml.safe_load_all(package.read_text()))[1]


def _params_file(folder: Path) -> Path:
    path = folder / "params.json"
    path.write_text(json.dumps({"dataset_uri": "gs://d/x", "results_uri": "gs://d/r",
                                "search_space": {"pixels": [256], "model": [1]}}))
    return path


def test_library_functions_return_the_ids(package):
    params = {"dataset_uri": "gs://d/x", "results_uri": "gs://d/r"}
    with FakeKFP(experiments=["neumo"]) as kfp_api:
        assert submit.submit(package, params, kfp_api.url, "neumo") == "run-1"
        assert submit.schedule(package, params, kfp_api.url, "neumo", "0 30 1 * * *", "daily") == "rr-1"
    assert kfp_api.one("POST", f"{API}/recurringruns")["body"]["display_name"] == "daily"


@pytest.mark.parametrize("argv, message", [
    (["--submit", "--set", "dataset_uri=gs://d/x"], "missing required pipeline parameter.*results_uri"),
    (["--schedule", "0 2 * * 1", *PARAMS], "6 fields, seconds first: did you mean '0 0 2 \\* \\* 1'"),
    (["--schedule", "daily", *PARAMS], "6 space-separated fields"),
    (["--submit", "--local", *PARAMS], "choose one"),
])
def test_bad_requests_fail_before_anything_is_sent(argv, message):
    with FakeKFP() as kfp_api:
        with pytest.raises(SystemExit, match=message):
            full.main([*argv, "--host", kfp_api.url])
    assert kfp_api.requests == []


def test_check_params_names_unknown_parameters(package):
    with pytest.raises(ValueError, match="unknown pipeline parameter.*colour"):
        submit.check_params(package, {"dataset_uri": "a", "results_uri": "b", "colour": "red"})
    assert submit.pipeline_inputs(package)["dataset_uri"] is True
    assert submit.pipeline_inputs(package)["epochs"] is False
