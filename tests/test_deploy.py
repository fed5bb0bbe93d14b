"""deploy/: KServe's ServingRuntime and InferenceService, and plain Kubernetes manifests.

No cluster is reachable here, so the manifests are checked against the schemas a cluster would
check them with (Kubernetes' own, from `kubernetes-validate`; KServe's CRD schemas, vendored
under tests/data/kserve), strictly (an unknown field is an error, as `kubectl apply` says); their
flags are parsed by opserve's own parser; and real servers are started with their argument lists:
the ServingRuntime's (the flags KServe's Triton runtime passes), and the Deployment's, which a
SIGTERM then stops as a pod is stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from opserve.cli import build_parser, without_triton_program
from opserve.triton_flags import triton_values
from tests import dockerfile
from tests.serving import RunningServer, eventually
from tests.test_faults import python_model
from tests.test_scheduling_policies import wait_for_log

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KSERVE_SCHEMAS = Path(__file__).parent / "data" / "kserve"
# the oldest Kubernetes release still commonly run; the manifests use nothing newer
KUBERNETES = "1.30"
# KServe v0.20.0, config/runtimes/kserve-tritonserver.yaml: the container's args (Triton's image
# runs them as its command); for an InferenceService without a storageUri KServe appends
# --model-control-mode=explicit (pkg/apis/serving/v1beta1/inference_service_defaults.go)
KSERVE_TRITON_ARGS = [
    "tritonserver",
    "--model-store=/mnt/models",
    "--grpc-port=9000",
    "--http-port=8080",
    "--allow-grpc=true",
    "--allow-http=true",
]


def manifests(relative: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / relative).read_text()) if d is not None]


def manifest(relative: str) -> dict[str, Any]:
    (document,) = manifests(relative)
    return document


def serve_flags(args: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """`opserve serve ARGS` as opserve's command line reads it (refused values raise)."""
    parsed = build_parser().parse_args(without_triton_program(["serve", *args]))
    return parsed, triton_values(parsed)[0]


def the_container(document: dict[str, Any]) -> dict[str, Any]:
    spec = document["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    (container,) = pod["containers"]
    return container


# schemas -----------------------------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields refused: every object schema that lists
    its properties, and neither keeps unknown fields nor says what they are, allows no others."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    result = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


def kserve_errors(document: dict[str, Any]) -> list[str]:
    vendored = json.loads((KSERVE_SCHEMAS / f"{document['kind'].lower()}.json").read_text())
    assert document["apiVersion"] == vendored["apiVersion"]
    validator = jsonschema.Draft7Validator(strict(vendored["openAPIV3Schema"]))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


@pytest.mark.parametrize("path", ["kserve/servingruntime.yaml", "kserve/inferenceservice.yaml"])
def test_kserve_manifests_match_kserves_crd_schemas(path: str) -> None:
    assert kserve_errors(manifest(path)) == []


def test_the_kserve_check_refuses_an_unknown_field_and_a_wrong_type() -> None:
    runtime = manifest("kserve/servingruntime.yaml")
    runtime["spec"]["protocolVersion"] = ["v2"]  # the field is protocolVersions
    runtime["spec"]["supportedModelFormats"][0]["autoSelect"] = "yes"
    errors = kserve_errors(runtime)
    assert len(errors) == 2, errors
    assert any("'protocolVersion' was unexpected" in e for e in errors)
    assert any(e.startswith("spec.supportedModelFormats.0.autoSelect:") for e in errors)


KUBERNETES_MANIFESTS = sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml"))


@pytest.mark.parametrize("name", KUBERNETES_MANIFESTS)
def test_kubernetes_manifests_match_kubernetes_schemas(name: str) -> None:
    for document in manifests(f"kubernetes/{name}"):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_kubernetes_check_refuses_an_unknown_field() -> None:
    assert set(KUBERNETES_MANIFESTS) == {
        "deployment.yaml",
        "service.yaml",
        "hpa.yaml",
        "prometheus-adapter-rules.yaml",
    }
    deployment = manifest("kubernetes/deployment.yaml")
    broken = copy.deepcopy(deployment)
    the_container(broken)["livenessProbes"] = the_container(broken).pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


# agreement with opserve's command line -----------------------------------------------------------
def test_the_serving_runtime_is_kserves_triton_runtime_with_opserve() -> None:
    runtime = manifest("kserve/servingruntime.yaml")
    spec = runtime["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == {
        "onnx",
        "pytorch",
        "tensorflow",
        "triton",
    }
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    # KServe gives a runtime of this server type Triton's defaults (protocol, model control)
    assert runtime["metadata"]["annotations"]["serving.kserve.io/server-type"] == "tritonserver"
    container = the_container(runtime)
    assert container["name"] == "kserve-container"  # the container KServe merges a predictor into
    assert container["args"] == KSERVE_TRITON_ARGS[1:]  # the image's entrypoint is `opserve serve`
    parsed, triton = serve_flags(container["args"])
    assert parsed.model_store == [Path("/mnt/models")]  # where the storage initializer writes
    assert (parsed.http_port, parsed.grpc_port) == (8080, 9000)  # KServe's ports for Triton
    assert parsed.allow_grpc and triton["allow_http"]
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(parsed.metrics_port)
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0


def test_kserves_own_triton_argument_list_is_accepted() -> None:
    """KServe's Triton runtime with only its image changed: the argument list begins with the
    program's name, and KServe may append --model-control-mode=explicit."""
    parsed, _ = serve_flags([*KSERVE_TRITON_ARGS, "--model-control-mode=explicit"])
    assert parsed.model_store == [Path("/mnt/models")] and parsed.model_control_mode == "explicit"
    # through the real command line: the name is skipped, and the next complaint is that
    # /mnt/models does not exist here
    result = subprocess.run(
        [sys.executable, "-m", "opserve", "serve", *KSERVE_TRITON_ARGS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unrecognized" not in result.stderr and "/mnt/models" in result.stderr


def test_the_inference_service_is_served_by_the_runtime() -> None:
    runtime = manifest("kserve/servingruntime.yaml")
    model = manifest("kserve/inferenceservice.yaml")["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] == "triton" and "triton" in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].startswith("s3://example-bucket/")  # a placeholder


def test_the_deployment_agrees_with_opserves_flags() -> None:
    deployment = manifest("kubernetes/deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    container = the_container(deployment)
    parsed, triton = serve_flags(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": parsed.http_port,
        "grpc": parsed.grpc_port,
        "metrics": parsed.metrics_port,
    }
    for probe, path in (
        ("startupProbe", "/v2/health/live"),
        ("livenessProbe", "/v2/health/live"),
        ("readinessProbe", "/v2/health/ready"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    # the kubelet kills the pod terminationGracePeriodSeconds after it starts stopping it:
    # preStop first, then SIGTERM, then --exit-timeout-secs for in-flight requests and models
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert int(pre_stop[1]) + triton["exit_timeout_secs"] < pod["terminationGracePeriodSeconds"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(parsed.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # a read-only root: what opserve writes goes to mounted volumes; the models are read-only
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OPSERVE_CACHE_DIR"] in mounts and "/tmp" in mounts
    (repository,) = parsed.model_repository
    assert mounts[str(repository)].get("readOnly")


def test_the_service_and_the_autoscaler_point_at_the_deployment() -> None:
    deployment = manifest("kubernetes/deployment.yaml")
    container_ports = {p["name"]: p["containerPort"] for p in the_container(deployment)["ports"]}
    service = manifest("kubernetes/service.yaml")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    for port in service["spec"]["ports"]:
        assert port["port"] == container_ports[port["targetPort"]]
    assert {p["name"] for p in service["spec"]["ports"]} == set(container_ports)
    hpa = manifest("kubernetes/hpa.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    series, exposed = adapter_rule()
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == exposed
    assert series == "nv_inference_request_success"


def adapter_rule() -> tuple[str, str]:
    """(the series opserve exports, the metric the adapter serves) of the adapter's one rule."""
    config = manifest("kubernetes/prometheus-adapter-rules.yaml")["data"]["config.yaml"]
    (rule,) = yaml.safe_load(config)["rules"]
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'\""))
    assert series is not None and re.fullmatch(rule["name"]["matches"], series.group(0))
    assert "rate(<<.Series>>" in rule["metricsQuery"]  # a counter, served as a rate
    return series.group(0), rule["name"]["as"]


# real servers ------------------------------------------------------------------------------------
def launch(args: list[str], repository: Path, placeholder: str, server: RunningServer) -> list[str]:
    """A manifest's argument list with its repository path and ports replaced by this test's
    (every replaced value must be there: a manifest that changes breaks the test, not the
    replacement)."""
    replacements = {placeholder: str(repository)}
    parsed, _ = serve_flags(args)
    for flag, port in (("--http-port", server.port), ("--grpc-port", server.grpc_port)):
        if any(a.startswith(flag) for a in args):
            replacements[f"{flag}={getattr(parsed, flag[2:].replace('-', '_'))}"] = f"{flag}={port}"
    result = []
    for arg in args:
        for old, new in replacements.items():
            arg = arg.replace(old, new)
        result.append(arg)
    assert sum(a != b for a, b in zip(args, result, strict=True)) == len(replacements), result
    return result


def text_inputs(protocol: Any) -> list[Any]:
    text = np.array([["hello", "world"]], dtype=object)
    tensor = protocol.InferInput("TEXT", [1, 2], "BYTES")
    tensor.set_data_from_numpy(text)
    return [tensor]


@pytest.fixture(scope="module")
def kserve_server(example_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """opserve started with the ServingRuntime's arguments, serving what the storage initializer
    would put in /mnt/models: the InferenceService example's text_ops model."""
    models = tmp_path_factory.mktemp("mnt") / "models"
    shutil.copytree(example_repository / "text_ops", models / "text_ops")
    args = the_container(manifest("kserve/servingruntime.yaml"))["args"]
    server = RunningServer([], log_path=tmp_path_factory.mktemp("logs") / "kserve.log")
    server.extra_args = launch(args, models, "/mnt/models", server)
    with server:
        yield server


def test_the_serving_runtimes_arguments_serve_the_custom_op_model(
    kserve_server: RunningServer,
) -> None:
    for protocol, url in ((httpclient, kserve_server.url), (grpcclient, kserve_server.grpc_url)):
        client = protocol.InferenceServerClient(url)
        assert client.is_server_ready()
        result = client.infer("text_ops", text_inputs(protocol))
        assert result.as_numpy("UPPER").tolist() == [[b"HELLO", b"WORLD"]]
        assert result.as_numpy("LENGTH").tolist() == [[5, 5]]
        client.close()


def test_the_autoscalers_metric_comes_from_opserves_metrics(kserve_server: RunningServer) -> None:
    """The series the adapter rule reads is one opserve exports, counting requests per model."""
    client = httpclient.InferenceServerClient(kserve_server.url)
    before = success_count(kserve_server)
    client.infer("text_ops", text_inputs(httpclient))
    assert success_count(kserve_server) == before + 1


def success_count(server: RunningServer) -> int:
    series, _ = adapter_rule()
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf'^{series}{{[^}}]*model="text_ops"[^}}]*}} (\d+)', text, re.MULTILINE)
    return int(match.group(1)) if match else 0


HELD_MODEL = """
import os
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import json

        parameters = json.loads(args["model_config"])["parameters"]
        self.release = parameters["RELEASE_FILE"]["string_value"]

    def execute(self, requests):
        pb_utils.Logger.log_info("held executes")
        deadline = time.monotonic() + 120
        while not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy())]
            )
            for r in requests
        ]
"""

HELD_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "RELEASE_FILE" value: { string_value: "%s" } }
"""


def held_input(protocol: Any, value: int) -> list[Any]:
    data = np.array([value], dtype=np.int32)
    tensor = protocol.InferInput("IN", [1], np_to_triton_dtype(data.dtype))
    tensor.set_data_from_numpy(data)
    return [tensor]


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def health_check(url: str) -> int:
    """The Dockerfile's HEALTHCHECK command, run here against `url` (its exit status)."""
    check = dockerfile.read().final.last("HEALTHCHECK").arguments
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[0] == "python"
    env = {**os.environ, "OPSERVE_HEALTH_URL": url}
    return subprocess.run(
        [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30
    ).returncode


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_in_time(
    tmp_path: Path,
) -> None:
    """A pod being stopped: with a request in flight over HTTP and another over gRPC, SIGTERM
    closes both ports at once (new connections are refused, so liveness and readiness probes
    fail, and so does the image's health check), the two requests are answered, and the server
    exits with status 0 within the Deployment's --exit-timeout-secs."""
    release = tmp_path / "release"
    repository = tmp_path / "models"
    python_model(repository, "held", HELD_MODEL, HELD_CONFIG % release)
    args = the_container(manifest("kubernetes/deployment.yaml"))["args"]
    _, triton = serve_flags(args)
    server = RunningServer([], log_path=tmp_path / "server.log")
    server.extra_args = launch(args, repository, "/models", server)
    with server:
        assert server.process is not None
        live = f"http://{server.url}/v2/health/live"
        assert health_check(live) == 0
        http = httpclient.InferenceServerClient(server.url)
        assert http.is_server_ready()
        pending_http = http.async_infer("held", held_input(httpclient, 7))
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        answers: queue.Queue[Any] = queue.Queue()
        grpc.async_infer(
            "held", held_input(grpcclient, 8), lambda result, error: answers.put(result or error)
        )
        eventually(lambda: server.log().count("held executes") == 2, "both requests executing")

        server.process.send_signal(signal.SIGTERM)
        eventually(lambda: refuses_connections(server.port), "HTTP refuses connections")
        eventually(lambda: refuses_connections(server.grpc_port), "gRPC refuses connections")
        assert health_check(live) != 0
        with pytest.raises(InferenceServerException):
            grpcclient.InferenceServerClient(server.grpc_url).is_server_live()
        assert server.process.poll() is None  # still finishing the two requests

        release.touch()
        assert pending_http.get_result().as_numpy("OUT").tolist() == [7]
        answer = answers.get(timeout=60)
        assert not isinstance(answer, InferenceServerException), answer
        assert answer.as_numpy("OUT").tolist() == [8]
        assert server.process.wait(timeout=triton["exit_timeout_secs"]) == 0, server.log()
        wait_for_log(server, "shutting down: unloading models")
        assert "graceful shutdown exceeded" not in server.log()
