"""Custom operations without Triton's limits: colliding libraries never meet, ops live and die
with their model, libraries are inspected before use and stay inside the repository."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.clients import infer_input, simple_answers
from tests.conftest import SIMPLE_CONFIG, custom_op_config
from tests.framework_models import framework_model
from tests.frameworks import requires
from tests.oplibs import build
from tests.serving import RunningServer, children, mapped

TORCH_ADD_ONE_CONFIG = """
name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
model_operations {{ {libraries} }}
"""


def ort_model(repo: Path, name: str, libraries: dict[str, Path]) -> Path:
    """An ONNX model using my_ops::AddOne, with `libraries` (file name -> build) in its folder."""
    folder = models.write_model(repo, name, models.custom_op(), custom_op_config(name, None))
    listed = " ".join(f'op_library_filename: "{n}"' for n in libraries)
    with (folder / "config.pbtxt").open("a") as config:
        config.write(f"model_operations {{ {listed} }}\n")
    for filename, library in libraries.items():
        build.copy_to(library, folder / filename)
    return folder


def torch_model(repo: Path, name: str, libraries: dict[str, Path], model: Path) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(model, folder / "1" / "model.pt")
    listed = " ".join(f'op_library_filename: "{n}"' for n in libraries)
    (folder / "config.pbtxt").write_text(TORCH_ADD_ONE_CONFIG.format(name=name, libraries=listed))
    for filename, library in libraries.items():
        build.copy_to(library, folder / filename)
    return folder


def tf_model(repo: Path, name: str, library: Path, model: Path) -> Path:
    folder = repo / name
    shutil.copytree(model, folder / "1" / "model.savedmodel")
    (folder / "config.pbtxt").write_text(
        'platform: "tensorflow_savedmodel"\nmodel_operations { op_library_filename: "libzero_out.so" }\n'
    )
    build.copy_to(library, folder / "libzero_out.so")
    return folder


def added(
    client: httpclient.InferenceServerClient,
    model: str,
    name: str = "INPUT0",
    output: str = "OUTPUT0",
) -> float:
    data = np.zeros((1, 4), dtype=np.float32)
    return float(client.infer(model, [infer_input(name, data, "FP32")]).as_numpy(output)[0, 0])


def ready_reason(server: RunningServer, model: str) -> str:
    response = requests.get(f"http://{server.url}/v2/models/{model}/ready")
    assert response.status_code == 400, f"{model} is ready"
    return response.json()["error"]


@pytest.fixture(scope="module")
def ort_ops() -> tuple[Path, Path]:
    return build.onnxruntime_my_ops(1.0), build.onnxruntime_my_ops(2.0, name="libmy_ops_v2.so")


# 1. collisions -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collision_server(tmp_path_factory, ort_ops):
    repo = tmp_path_factory.mktemp("collisions") / "repository"
    one, two = ort_ops
    ort_model(repo, "ort_adds_1", {"libmy_ops.so": one})
    ort_model(repo, "ort_adds_2", {"libmy_ops.so": two})
    ort_model(repo, "ort_both", {"libmy_ops.so": one, "libmy_ops_v2.so": two})
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    with RunningServer([repo], log_path=repo.parent / "server.log") as server:
        yield server


def test_colliding_onnxruntime_libraries_serve_side_by_side(collision_server) -> None:
    client = httpclient.InferenceServerClient(collision_server.url)
    assert added(client, "ort_adds_1") == 1.0
    assert added(client, "ort_adds_2") == 2.0
    assert added(client, "ort_adds_1") == 1.0


def test_two_libraries_of_one_model_that_register_the_same_op(collision_server) -> None:
    reason = ready_reason(collision_server, "ort_both")
    assert "op 'my_ops::AddOne' is registered by both" in reason
    assert "ort_both/libmy_ops.so" in reason and "ort_both/libmy_ops_v2.so" in reason
    assert simple_answers(httpclient.InferenceServerClient(collision_server.url))


@requires("torch")
def test_colliding_pytorch_libraries(tmp_path: Path) -> None:
    one = build.pytorch_my_ops(1.0)
    two = build.pytorch_my_ops_v2()
    model = framework_model("torch_add_one", "model.pt", one)
    repo = tmp_path / "repository"
    torch_model(repo, "torch_adds_1", {"libmy_torch_ops.so": one}, model)
    torch_model(repo, "torch_adds_2", {"libmy_torch_ops.so": two}, model)
    # PyTorch aborts a process that registers an op twice: this model must never get a worker
    torch_model(repo, "torch_both", {"a.so": one, "b.so": two}, model)
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    with RunningServer([repo], log_path=tmp_path / "log") as server:
        client = httpclient.InferenceServerClient(server.url)
        assert added(client, "torch_adds_1", "INPUT__0", "OUTPUT__0") == 1.0
        assert added(client, "torch_adds_2", "INPUT__0", "OUTPUT__0") == 2.0
        reason = ready_reason(server, "torch_both")
        assert "op 'my_ops::add_one' is registered by both" in reason
        assert "torch_both/a.so" in reason and "torch_both/b.so" in reason
        assert "was killed by signal" not in server.log()
        assert simple_answers(client)


@requires("tensorflow")
def test_colliding_tensorflow_libraries(tmp_path: Path) -> None:
    first = build.tensorflow_zero_out()
    last = build.tensorflow_zero_out_keeping_last()
    model = framework_model("tf_zero_out_savedmodel", "model.savedmodel", first)
    repo = tmp_path / "repository"
    tf_model(repo, "keeps_first", first, model)
    tf_model(repo, "keeps_last", last, model)
    with RunningServer([repo], log_path=tmp_path / "log") as server:
        client = httpclient.InferenceServerClient(server.url)
        data = np.array([[1, 2, 3, 4]], dtype=np.int32)
        for model_name, expected in (("keeps_first", [1, 0, 0, 0]), ("keeps_last", [0, 0, 0, 4])):
            result = client.infer(model_name, [infer_input("to_zero", data, "INT32")])
            assert result.as_numpy("zeroed").tolist() == [expected]


# 2. ops live and die with their model -----------------------------------------------------------


def worker_pids(server: RunningServer) -> set[int]:
    return children(server.process.pid)


def test_explicit_mode_loads_unloads_and_reloads_new_libraries(tmp_path: Path, ort_ops) -> None:
    one, two = ort_ops
    repo = tmp_path / "repository"
    folder = ort_model(repo, "adds", {"libmy_ops.so": one})
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    args = ["--model-control-mode", "explicit", "--load-model", "simple"]
    with RunningServer([repo], args, log_path=tmp_path / "log") as server:
        client = httpclient.InferenceServerClient(server.url)
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert index["simple"]["state"] == "READY" and "state" not in index["adds"]
        assert not client.is_model_ready("adds")

        before = worker_pids(server)
        client.load_model("adds")
        assert added(client, "adds") == 1.0
        workers = worker_pids(server) - before  # Triton's two CPU instances for onnxruntime
        assert len(workers) == 2
        assert all(mapped(worker, str(folder / "libmy_ops.so")) for worker in workers)

        client.unload_model("adds")
        assert not client.is_model_ready("adds")
        # the processes that held the library are gone
        assert not any(Path(f"/proc/{worker}").exists() for worker in workers)
        index = {(e["name"], e.get("version")): e for e in client.get_model_repository_index()}
        assert (
            index[("adds", "1")]["state"] == "UNAVAILABLE"
            and index[("adds", "1")]["reason"] == "unloaded"
        )
        assert [e["name"] for e in client.get_model_repository_index()] == ["adds", "simple"]

        shutil.copyfile(two, folder / "libmy_ops.so")  # a new build of the library, same name
        client.load_model("adds")
        assert added(client, "adds") == 2.0  # the new library's behaviour, same server
        assert simple_answers(client)

        ready = requests.post(
            f"http://{server.url}/v2/repository/index", json={"ready": True}
        ).json()
        assert sorted(e["name"] for e in ready) == ["adds", "simple"]

        # a load request may carry the config, in JSON, as Triton's does
        override = {
            "backend": "onnxruntime",
            "max_batch_size": 2,
            "model_operations": {"op_library_filename": ["libmy_ops.so"]},
        }
        client.load_model("adds", config=json.dumps(override))
        assert client.get_model_config("adds")["max_batch_size"] == 2
        assert added(client, "adds") == 2.0

        # a reload that fails loses nothing: the loaded model keeps serving
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("adds", config=json.dumps({"backend": "no_such_backend"}))
        assert refused.value.status() == "400" and "keeps serving" in refused.value.message()
        assert client.is_model_ready("adds") and added(client, "adds") == 2.0

        client.unload_model("adds")  # an unloaded model does not hold the server's readiness back
        assert client.is_server_ready()


def test_loading_a_model_that_fails_reports_why(tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    models.write_model(repo, "broken", models.custom_op(), custom_op_config("broken", "libnone.so"))
    with RunningServer(
        [repo], ["--model-control-mode", "explicit"], log_path=tmp_path / "log"
    ) as server:
        client = httpclient.InferenceServerClient(server.url)
        with pytest.raises(InferenceServerException) as raised:
            client.load_model("broken")
        assert raised.value.status() == "400" and "libnone.so" in raised.value.message()
        with pytest.raises(InferenceServerException) as raised:
            client.load_model("no_such_model")
        # Triton's code and words (L0_lifecycle test_model_control checks them)
        assert raised.value.status() == "500"
        assert (
            "failed to load 'no_such_model', failed to poll from model repository"
            in raised.value.message()
        )


def test_mode_none_refuses_load_and_unload(client) -> None:
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as raised:
            call("simple")
        assert raised.value.status() == "503"
        assert "not allowed" in raised.value.message()
    assert client.is_model_ready("simple")


# 4. inspection ------------------------------------------------------------------------------------


def test_library_built_for_a_newer_onnxruntime(tmp_path: Path) -> None:
    newer = build.onnxruntime_my_ops(name="libmy_ops_api40.so", request_api_version=40)
    repo = tmp_path / "repository"
    ort_model(repo, "too_new", {"libmy_ops.so": newer})
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    with RunningServer([repo], log_path=tmp_path / "log") as server:
        reason = ready_reason(server, "too_new")
        assert "too_new/libmy_ops.so" in reason
        assert "built for ONNX Runtime API version 40" in reason
        assert "was killed by signal" not in server.log()  # no serving worker ever crashed
        assert simple_answers(httpclient.InferenceServerClient(server.url))


@requires("torch")
def test_library_built_against_another_libtorch(tmp_path: Path) -> None:
    other = build.pytorch_my_ops(name="libother_torch.so", needs_missing_symbol=True)
    model = framework_model("torch_add_one", "model.pt", build.pytorch_my_ops())
    repo = tmp_path / "repository"
    torch_model(repo, "other_torch", {"libmy_torch_ops.so": other}, model)
    with RunningServer([repo], log_path=tmp_path / "log") as server:
        reason = ready_reason(server, "other_torch")
        assert "other_torch/libmy_torch_ops.so" in reason
        assert "undefined symbol" in reason and "symbol_from_another_libtorch" in reason
        assert "built for a different libtorch than this server's 2." in reason


def inspect(path: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "opserve", "ops", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode, result.stdout


def test_ops_inspect_command(ort_ops) -> None:
    code, output = inspect(ort_ops[0])
    facts = json.loads(output)
    assert code == 0 and facts["ok"]
    assert facts["framework"] == "onnxruntime" and facts["api_version"] > 0
    assert facts["ops"] == [
        "my_ops::AddOne",
        "my_ops::Checked",
        "my_ops::Rendezvous",
        "my_ops::RuntimeMinor",
        "my_ops::Segfault",
        "my_ops::Slow",
        "my_ops::Spin",
    ]
    assert facts["needed"]["libc.so.6"]
    text = subprocess.run(
        [sys.executable, "-m", "opserve", "ops", "inspect", str(ort_ops[0])],
        capture_output=True,
        text=True,
    ).stdout
    assert "my_ops::AddOne" in text and "verdict:    ok" in text


@requires("torch")
def test_ops_inspect_finds_missing_symbols() -> None:
    code, output = inspect(
        build.pytorch_my_ops(name="libother_torch.so", needs_missing_symbol=True)
    )
    facts = json.loads(output)
    assert code == 1 and not facts["ok"]
    assert facts["framework"] == "pytorch"
    assert any("symbol_from_another_libtorch" in s for s in facts["unresolved_symbols"])


def test_ops_inspect_a_library_with_a_missing_dependency(tmp_path: Path) -> None:
    (tmp_path / "gone.c").write_text("int gone_function(void) { return 1; }\n")
    source = tmp_path / "needs.c"
    source.write_text("int gone_function(void);\nint uses(void) { return gone_function(); }\n")
    dependency = tmp_path / "libgone.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(dependency), str(tmp_path / "gone.c")], check=True
    )
    library = tmp_path / "libneeds.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(library), str(source), f"-L{tmp_path}", "-lgone"],
        check=True,
    )
    dependency.unlink()
    code, output = inspect(library)
    facts = json.loads(output)
    assert code == 1
    assert facts["needed"]["libgone.so"] is None
    assert any("libgone.so" in p and "not found" in p for p in facts["problems"])


# 5. ops stay inside the repository ----------------------------------------------------------------


def test_library_paths_must_stay_inside_the_repository(tmp_path: Path, ort_ops) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    build.copy_to(ort_ops[0], outside / "libmy_ops.so")
    build.copy_to(ort_ops[0], allowed / "libmy_ops.so")
    repo = tmp_path / "repository"
    for name, library in (
        ("escapes", "../../outside/libmy_ops.so"),
        ("absolute_outside", str(outside / "libmy_ops.so")),
        ("absolute_allowed", str(allowed / "libmy_ops.so")),
    ):
        models.write_model(repo, name, models.custom_op(), custom_op_config(name, library))
    args = ["--op-library-root", str(allowed)]
    with RunningServer([repo], args, log_path=tmp_path / "log") as server:
        assert "escapes the model's folder" in ready_reason(server, "escapes")
        assert "outside the model repository and every --op-library-root" in ready_reason(
            server, "absolute_outside"
        )
        assert added(httpclient.InferenceServerClient(server.url), "absolute_allowed") == 1.0


# 6. check before deploying -------------------------------------------------------------------------


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opserve", "check", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_check_command(tmp_path: Path, ort_ops) -> None:
    one, two = ort_ops
    repo = tmp_path / "repository"
    ort_model(repo, "good", {"libmy_ops.so": one})
    ort_model(repo, "colliding", {"a.so": one, "b.so": two})
    ort_model(
        repo,
        "too_new",
        {
            "libmy_ops.so": build.onnxruntime_my_ops(
                name="libmy_ops_api40.so", request_api_version=40
            )
        },
    )
    models.write_model(
        repo, "missing_library", models.custom_op(), custom_op_config("missing_library", "libx.so")
    )
    models.write_model(repo, "bad_config", models.identity(), "max_batch_size: [\n")
    models.write_model(repo, "gpu", models.identity(), "instance_group [ { kind: KIND_GPU } ]\n")
    models.write_model(
        repo, "pinned", models.identity(), "optimization { priority: PRIORITY_MAX }\n"
    )
    result = run_check("--model-repository", str(repo))
    assert result.returncode == 1
    text = result.stdout
    assert "ok     good" in text and "my_ops::AddOne" in text
    assert "FAILED colliding" in text and "op 'my_ops::AddOne' is registered by both" in text
    assert "FAILED too_new" in text and "API version 40" in text
    assert "FAILED missing_library" in text and "libx.so" in text
    assert "FAILED bad_config" in text and "config.pbtxt:1:" in text
    assert "FAILED gpu" in text and "'instance_group.kind: KIND_GPU' of model 'gpu'" in text
    assert "ok     pinned" in text
    assert "warning: config field 'optimization.priority' of model 'pinned' is ignored" in text
    assert "7 models, 5 with problems" in text

    report = json.loads(run_check("--model-repository", str(repo), "--json").stdout)
    assert not report["ok"]
    by_name = {m["name"]: m for m in report["models"]}
    assert by_name["good"]["ok"] and not by_name["colliding"]["ok"]
    assert report["libraries"][str((repo / "good" / "libmy_ops.so").resolve())]["ops"] == [
        "my_ops::AddOne",
        "my_ops::Checked",
        "my_ops::Rendezvous",
        "my_ops::RuntimeMinor",
        "my_ops::Segfault",
        "my_ops::Slow",
        "my_ops::Spin",
    ]

    for name in ("colliding", "too_new", "missing_library", "bad_config", "gpu"):
        shutil.rmtree(repo / name)
    assert run_check("--model-repository", str(repo)).returncode == 0


def test_check_loads_nothing_into_its_own_process(tmp_path: Path, ort_ops) -> None:
    repo = tmp_path / "repository"
    ort_model(repo, "good", {"libmy_ops.so": ort_ops[0]})
    code = (
        "import sys; from opserve.cli import main;"
        f"status = main(['check', '--model-repository', {str(repo)!r}]);"
        "maps = open('/proc/self/maps').read();"
        "assert 'libmy_ops' not in maps and 'onnxruntime' not in maps, 'loaded';"
        "assert 'onnxruntime' not in sys.modules; sys.exit(status)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_restart_is_quick(tmp_path: Path) -> None:
    """Sanity for point 3 (tested in full in test_worker_crash): a restarted worker answers again."""
    repo = tmp_path / "repository"
    one_instance = SIMPLE_CONFIG + "instance_group [ { count: 1 } ]\n"
    models.write_model(repo, "simple", models.add_sub(), one_instance)
    with RunningServer([repo], log_path=tmp_path / "log") as server:
        client = httpclient.InferenceServerClient(server.url)
        (worker,) = worker_pids(server)
        subprocess.run(["kill", "-SEGV", str(worker)], check=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (
            client.is_model_ready("simple") and worker_pids(server) - {worker}
        ):
            time.sleep(0.05)
        assert simple_answers(client)
        assert "SIGSEGV" in server.log()
