"""`opserve serve` as a drop-in for `tritonserver`: its 2.51 command line, flag by flag."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from opserve.cli import build_parser
from opserve.settings import ServerSettings
from opserve.triton_flags import triton_values
from tests import models
from tests.conftest import add_constant
from tests.serving import RunningServer, children

FLAGS = Path(__file__).parent / "data" / "tritonserver-2.51-flags.txt"  # `tritonserver --help`
SAMPLES = {
    "<boolean>": "false",
    "<integer>": "7",
    "<float>": "2.5",
    "<string>": "x",
}


CHOICES = {"--model-control-mode": "poll", "--log-format": "ISO8601"}


def triton_flags() -> list[tuple[str, str]]:
    flags = []
    for line in FLAGS.read_text().splitlines():
        name, _, kind = line.partition(" ")
        flags.append((name, kind))
    return flags


def parse(*flags: str):
    return build_parser().parse_known_args(["serve", "--model-repository", "repo", *flags])


@pytest.mark.parametrize("name, kind", triton_flags(), ids=[f for f, _ in triton_flags()])
def test_every_tritonserver_flag_is_accepted_in_both_forms(name: str, kind: str) -> None:
    if not kind:  # a switch: --disable-auto-complete-config
        assert parse(name)[1] == []
        return
    value = CHOICES.get(name) or SAMPLES.get(kind, "a,b=c")
    for form in ([f"{name}={value}"], [name, value]):
        args, unknown = parse(*form)
        assert unknown == []


def values(*flags: str) -> dict:
    args, unknown = parse(*flags)
    assert unknown == []
    return triton_values(args)[0]


def test_tritons_defaults() -> None:
    triton = values()
    assert (triton["exit_on_error"], triton["strict_readiness"], triton["id"]) == (
        True,
        True,
        "triton",
    )
    assert (triton["model_load_thread_count"], triton["exit_timeout_secs"]) == (4, 30)
    assert triton["grpc_keepalive_time"] == 7200000 and triton["log_format"] == "default"


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--allow-sagemaker=true", "there is no SageMaker endpoint"),
        ("--allow-vertex-ai=1", "there is no Vertex AI endpoint"),
        ("--rate-limit=execution_count", "--rate-limit execution_count is not supported"),
        ("--model-namespacing=true", "--model-namespacing=true is not supported"),
        ("--grpc-infer-response-compression-level=max", "must be none, low, medium or high"),
        ("--strict-readiness=maybe", None),  # argparse refuses it
    ],
)
def test_values_that_cannot_be_honoured_are_refused(flag: str, message: str | None) -> None:
    if message is None:
        with pytest.raises(SystemExit):
            parse(flag)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        values(flag)


def test_flags_without_effect_are_noted_once_set() -> None:
    args, _ = parse("--pinned-memory-pool-byte-size=1024", "--grpc-infer-allocation-pool-size=4")
    _, notes = triton_values(args)
    assert len(notes) == 2 and all("has no effect here" in n for n in notes)
    assert triton_values(parse()[0])[1] == []


def test_settings_from_triton_flags(tmp_path: Path) -> None:
    args, _ = parse(
        f"--model-store={tmp_path}",
        "--strict-model-config=true",
        "--backend-config=onnxruntime,default-max-batch-size=16",
        "--backend-config=default-max-batch-size=2",
        "--response-cache-byte-size=4096",
        "--grpc-keepalive-time=1000",
        "--reuse-grpc-port=true",
        "--metrics-config=counter_latencies=false",
        "--http-thread-count=3",
    )
    triton, notes = triton_values(args)
    assert not any("--http-thread-count" in note for note in notes)  # honoured, not noted
    settings = ServerSettings.from_flags(args, triton)
    assert settings.http_thread_count == 3
    assert settings.model_repositories == [Path("repo"), tmp_path]
    assert not settings.auto_complete and settings.cache is not None and settings.cache.size == 4096
    assert settings.default_max_batch_size == {"onnxruntime": 16, "": 2}
    assert settings.grpc_keepalive.time_ms == 1000 and settings.grpc_keepalive.timeout_ms == 20000
    assert settings.reuse_grpc_port
    assert settings.counter_latencies is False
    args, _ = parse("--http-thread-count=0")
    with pytest.raises(ValueError, match="--http-thread-count must be at least 1"):
        ServerSettings.from_flags(args, triton_values(args)[0])


def run_opserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opserve", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_an_unknown_flag_is_an_error_under_the_serve_usage() -> None:
    result = run_opserve("--model-repository", "x", "--no-such-flag=1")
    assert result.returncode == 2
    assert "usage: opserve serve" in result.stderr
    assert "unrecognized arguments: --no-such-flag=1" in result.stderr


# a real server started with Triton's launch line ---------------------------------------------------
@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("flags") / "repository"
    models.write_model(repo, "plus_one", add_constant(1.0))  # no config.pbtxt
    folder = models.write_model(repo, "plus_two", add_constant(2.0), "max_batch_size: 8\n")
    (folder / "configs").mkdir()
    (folder / "configs" / "small.pbtxt").write_text('name: "plus_two"\nmax_batch_size: 2\n')
    models.write_model(repo, "broken", add_constant(3.0), "max_batch_size: [\n")
    return repo


def test_a_triton_launch_line_serves(repository: Path, tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    args = [
        "--strict-model-config=false",
        "--strict-readiness=false",
        "--exit-on-error=false",
        "--log-verbose=1",
        "--log-format=ISO8601",
        f"--log-file={log}",
        "--id=edge-7",
        "--model-config-name=small",
        "--model-load-thread-count=2",
        "--backend-config=python,shm-default-byte-size=1048576",
        "--allow-sagemaker=false",
        "--grpc-keepalive-time=10000",
        "--pinned-memory-pool-byte-size=0",
    ]
    with RunningServer([], [f"--model-store={repository}", *args]) as server:
        client = httpclient.InferenceServerClient(server.url)
        assert client.is_server_ready()  # although 'broken' is not: --strict-readiness=false
        assert client.get_server_metadata()["name"] == "edge-7"
        assert client.get_model_config("plus_two")["max_batch_size"] == 2  # configs/small.pbtxt
        assert client.get_model_config("plus_one")["max_batch_size"] == 4  # auto-completed
        text = log.read_text()
        assert re.search(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ I \d+ server\.py:\d+\] serving HTTP", text, re.M
        )
        assert "--pinned-memory-pool-byte-size has no effect here" in text
        assert "--backend-config python,shm-default-byte-size=1048576 has no effect here" in text
        assert re.search(r"^\S+Z V ", text, re.M)  # verbose (debug) lines are there
        # a second after the last load the server collected its heap once and froze it, and
        # each worker did once its model was loaded
        settled = re.compile(r"collector\.py:\d+\] collected the heap and froze \d+ objects")
        deadline = time.monotonic() + 30
        while not settled.search(log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text()
        assert settled.search(text)
        assert re.search(r"worker\[\d+\] opserve\.collector: collected the heap and froze", text)


def test_exit_on_error_is_the_default(repository: Path) -> None:
    result = run_opserve(
        "--model-repository", str(repository), "--http-port=0", "--grpc-port=0", "--metrics-port=0"
    )
    assert result.returncode == 1
    assert "failed to load all models" in result.stderr and "'broken'" in result.stderr


def test_strict_readiness_and_disabled_auto_complete(repository: Path) -> None:
    args = ["--exit-on-error=false", "--disable-auto-complete-config"]
    with RunningServer([repository], args) as server:
        client = httpclient.InferenceServerClient(server.url)
        assert not client.is_server_ready()  # strict readiness: some models are not ready
        for model, reason in (
            ("plus_one", "has no config.pbtxt, and auto-complete is disabled"),
            ("plus_two", "auto-complete is disabled, so its config must list the model's inputs"),
        ):
            response = requests.get(f"http://{server.url}/v2/models/{model}/ready")
            assert reason in response.json()["error"]


def test_ports_of_zero_are_logged_as_bound(repository: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    command = [sys.executable, "-m", "opserve", "serve", "--model-repository", str(repository)]
    command += ["--exit-on-error=false", "--http-address=127.0.0.1", "--http-port=0"]
    command += ["--grpc-address=127.0.0.1", "--grpc-port=0", "--metrics-address=127.0.0.1"]
    command += ["--metrics-port=0", "--log-file", str(log)]
    process = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 120
        ports = {}
        while len(ports) < 3:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
            text = log.read_text() if log.exists() else ""
            ports = dict(re.findall(r"serving (HTTP|gRPC|metrics) on [\d.]+:(\d+)", text))
        assert "0" not in ports.values()
        url = f"http://127.0.0.1:{ports['HTTP']}/v2/health/live"
        assert requests.get(url).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


# the logging extension --------------------------------------------------------------------------
def test_log_settings_change_while_the_server_runs(repository: Path) -> None:
    args = ["--log-info=false", "--model-control-mode=explicit", "--load-model=plus_one"]
    with RunningServer([repository], args) as server:
        http = httpclient.InferenceServerClient(server.url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        assert http.get_log_settings() == {
            "log_file": "",
            "log_info": False,
            "log_warning": True,
            "log_error": True,
            "log_verbose_level": 0,
            "log_format": "default",
        }
        assert "is READY" not in server.log()  # info lines are off
        updated = grpc.update_log_settings(
            {"log_info": True, "log_format": "ISO8601"}, as_json=True
        )
        assert updated["settings"]["log_info"]["bool_param"] is True
        http.load_model("plus_two")
        ready = r"^\d{4}-\d\d-\d\dT\S+Z I \d+ manager\.py:\d+\] model 'plus_two' version 1 is READY"
        assert re.search(ready, server.log(), re.M)
        for change, problem in (
            ({"log_verbose_level": -1}, "log_verbose_level"),
            ({"log_format": "xml"}, "invalid log format 'xml'"),
            ({"log_info": False, "colour": True}, "unknown log setting 'colour'"),
        ):
            bad = requests.post(f"http://{server.url}/v2/logging", json=change)
            assert bad.status_code == 400 and problem in bad.json()["error"]
        assert http.get_log_settings()["log_info"] is True  # a refused update changes nothing
        grpc.close()


# workers named after their model, CPU metrics, gRPC over TLS -------------------------------------
def test_workers_are_named_after_their_model_and_cpu_metrics_are_reported(repository: Path) -> None:
    with RunningServer([repository], ["--exit-on-error=false"]) as server:
        assert server.process is not None
        titles = {
            Path(f"/proc/{pid}/comm").read_text().strip() for pid in children(server.process.pid)
        }
        lines = {
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            for pid in children(server.process.pid)
        }
        assert {"plus_one:1", "plus_two:1"} <= titles
        assert any(line.rstrip().endswith("opserve-worker:plus_one:1") for line in lines)
        metrics = requests.get(server.metrics_url).text
        utilization = re.search(r"^nv_cpu_utilization (\S+)$", metrics, re.M)
        assert utilization is not None and 0.0 <= float(utilization.group(1)) <= 1.0
        assert re.search(r"^nv_cpu_memory_total_bytes [1-9]", metrics, re.M)
    with RunningServer(
        [repository], ["--exit-on-error=false", "--allow-cpu-metrics=false"]
    ) as server:
        assert "nv_cpu_utilization" not in requests.get(server.metrics_url).text


def _certificates(folder: Path) -> dict[str, Path]:
    """A root CA, and a server and a client certificate it signed (PEM files)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())

    def sign(subject: str, key, issuer_key, ca: bool, san: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name("test root"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    files = {}
    root = sign("test root", root_key, root_key, True, False)
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = sign(role, key, root_key, False, True)
        files[f"{role}_key"] = folder / f"{role}.key"
        files[f"{role}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files[f"{role}_cert"] = folder / f"{role}.pem"
        files[f"{role}_cert"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files["root"] = folder / "root.pem"
    files["root"].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return files


def test_grpc_over_mutual_tls(repository: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    pem = _certificates(tmp_path)
    args = [
        "--exit-on-error=false",
        "--grpc-use-ssl-mutual=true",
        f"--grpc-server-cert={pem['server_cert']}",
        f"--grpc-server-key={pem['server_key']}",
        f"--grpc-root-cert={pem['root']}",
    ]
    with RunningServer([repository], args) as server:
        url = f"localhost:{server.grpc_port}"
        client = grpcclient.InferenceServerClient(
            url,
            ssl=True,
            root_certificates=str(pem["root"]),
            private_key=str(pem["client_key"]),
            certificate_chain=str(pem["client_cert"]),
        )
        assert client.is_server_live()
        client.close()
        anonymous = grpcclient.InferenceServerClient(
            url, ssl=True, root_certificates=str(pem["root"])
        )
        with pytest.raises(InferenceServerException):
            anonymous.is_server_live()
        plain = grpcclient.InferenceServerClient(url)
        with pytest.raises(InferenceServerException):
            plain.is_server_live()


# restricted APIs and forwarded headers ------------------------------------------------------------
def test_restricted_apis_need_their_header_and_forwarded_headers_reach_the_model(
    tmp_path: Path,
) -> None:
    import json

    from tests.test_python_models import place_python_model

    repo = tmp_path / "repository"
    place_python_model(repo, "add_sub")
    args = [
        "--http-restricted-api=model-repository,statistics:admin-key=secret",
        "--grpc-restricted-protocol=inference:token=t1",
        "--http-header-forward-pattern=^x-fwd-",
        "--grpc-header-forward-pattern=^x-fwd-",
    ]
    with RunningServer([repo], args) as server:
        base = f"http://{server.url}/v2"
        refused = requests.get(f"{base}/models/stats")
        assert refused.status_code == 403
        assert refused.json() == {"error": "This API is restricted, expecting header 'admin-key'"}
        assert requests.get(f"{base}/models/stats", headers={"admin-key": "secret"}).ok
        assert (
            requests.post(f"{base}/repository/index", headers={"admin-key": "no"}).status_code
            == 403
        )
        assert requests.get(f"{base}/health/ready").ok  # not restricted

        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = httpclient.InferInput(name, [1, 4], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
            inputs.append(tensor)
        http = httpclient.InferenceServerClient(server.url)
        result = http.infer("add_sub", inputs, headers={"X-Fwd-Tenant": "a", "X-Other": "b"})
        parameters = json.loads(result.as_numpy("ARGS")[0, 0])["parameters"]
        assert parameters == {"x-fwd-tenant": "a"}

        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        grpc_inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = grpcclient.InferInput(name, [1, 4], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
            grpc_inputs.append(tensor)
        with pytest.raises(InferenceServerException) as denied:
            grpc.infer("add_sub", grpc_inputs)
        assert denied.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "This protocol is restricted, expecting header 'token'" in denied.value.message()
        result = grpc.infer("add_sub", grpc_inputs, headers={"token": "t1", "x-fwd-zone": "z"})
        parameters = json.loads(result.as_numpy("ARGS")[0, 0])["parameters"]
        assert parameters == {"x-fwd-zone": "z"}
        assert grpc.is_server_live()  # health is not restricted
        grpc.close()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--http-restricted-api=everything:k=v", "unknown API 'everything'"),
        ("--grpc-restricted-protocol=inference", "must read <apis>:<key>=<value>"),
        ("--http-header-forward-pattern=(", "is not a regular expression"),
    ],
)
def test_bad_access_flags_are_refused(flag: str, message: str) -> None:
    args, _ = parse(flag)
    triton, _ = triton_values(args)
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerSettings.from_flags(args, triton)
