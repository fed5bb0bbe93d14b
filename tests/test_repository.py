"""The model repository: config.pbtxt, versions and their policy, auto-complete, broken models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from opserve.config import parse_model_config
from opserve.config.normalize import visible_gpus
from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig
from opserve.repository import select_versions, version_folders
from tests.serving import RunningServer


def add_input(value: float) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
    return [tensor]


def added(client: httpclient.InferenceServerClient, model: str, version: str = "") -> float:
    """Which constant the addressed version adds (each test version adds its own number)."""
    result = client.infer(model, add_input(0.0), model_version=version)
    return float(result.as_numpy("OUTPUT0")[0, 0])


def ready_versions(client: httpclient.InferenceServerClient, model: str, candidates) -> list[int]:
    return [v for v in candidates if client.is_model_ready(model, str(v))]


def test_default_policy_serves_the_latest_version_only(client) -> None:
    # folders 1, 2, 3, 10, plus "0011" (leading zero) and "abc", which are not versions
    assert ready_versions(client, "policy_default", [1, 2, 3, 10, 11]) == [10]
    assert added(client, "policy_default") == 10.0
    assert client.get_model_metadata("policy_default")["versions"] == ["10"]


def test_latest_n_policy(client) -> None:
    assert ready_versions(client, "policy_latest2", [1, 2, 3]) == [2, 3]
    assert added(client, "policy_latest2") == 3.0
    assert added(client, "policy_latest2", "2") == 2.0
    with pytest.raises(InferenceServerException, match="version 1 is not found"):
        added(client, "policy_latest2", "1")


def test_all_policy(client) -> None:
    assert ready_versions(client, "policy_all", [1, 2]) == [1, 2]
    assert added(client, "policy_all", "1") == 1.0
    assert added(client, "policy_all", "2") == 2.0
    assert client.get_model_metadata("policy_all")["versions"] == ["1", "2"]


def test_specific_policy(client) -> None:
    assert ready_versions(client, "policy_specific", [1, 2, 3]) == [1, 3]
    assert added(client, "policy_specific") == 3.0
    assert added(client, "policy_specific", "1") == 1.0


def test_default_model_filename(client) -> None:
    assert added(client, "custom_filename") == 5.0
    assert client.get_model_config("custom_filename")["default_model_filename"] == "my_model.onnx"


def test_model_file_may_be_a_folder(client) -> None:
    assert added(client, "onnx_folder") == 6.0


def test_autocomplete_without_config_pbtxt(client) -> None:
    config = client.get_model_config("no_config")
    assert config["name"] == "no_config"
    assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 4  # a dynamic first dimension means batching
    assert config["input"] == [
        {**config["input"][0], "name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}
    ]
    assert config["output"][0]["name"] == "OUTPUT0" and config["output"][0]["dims"] == [16]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    data = np.random.default_rng(1).random((4, 16), dtype=np.float32)
    tensor = httpclient.InferInput("INPUT0", [4, 16], "FP32")
    tensor.set_data_from_numpy(data)
    np.testing.assert_array_equal(client.infer("no_config", [tensor]).as_numpy("OUTPUT0"), data)


def test_autocomplete_keeps_what_the_config_says(client) -> None:
    config = client.get_model_config("partial_config")
    assert config["max_batch_size"] == 2
    assert config["input"][0]["dims"] == [16] and config["input"][0]["data_type"] == "TYPE_FP32"


def test_autocomplete_of_a_vector_model_uses_reshape(client) -> None:
    config = client.get_model_config("vector_batch")
    assert config["max_batch_size"] == 4
    assert config["input"][0]["dims"] == [1]
    assert config["input"][0]["reshape"] == {"shape": []}
    tensor = httpclient.InferInput("INPUT0", [3, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[1], [2], [3]], dtype=np.float32))
    result = client.infer("vector_batch", [tensor])
    assert result.as_numpy("OUTPUT0").tolist() == [[1], [2], [3]]


def test_autocomplete_without_batching(client) -> None:
    config = client.get_model_config("fp16_matrix")  # fixed shape [2, 3]: no batching
    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [2, 3] and config["input"][0]["data_type"] == "TYPE_FP16"


@pytest.mark.parametrize(
    "model, reason",
    [
        ("bad_syntax", "bad_syntax/config.pbtxt:3:17: invalid model configuration"),
        ("wrong_name", "model name 'another_name'"),
        (
            "no_versions",
            "no_versions': it holds config.pbtxt, v1/; version folders have numeric names such as 1/",
        ),
        (
            "misnamed_file",
            "misnamed_file/1' holds 'my.onnx': rename it to 'model.onnx' or set "
            'default_model_filename: "my.onnx" in config.pbtxt',
        ),
        (
            "platform_typo",
            "unexpected platform type 'onnxruntime_onx' for platform_typo; valid platforms: "
            "ensemble, onnxruntime_onnx, pytorch_libtorch, tensorflow_graphdef, "
            "tensorflow_savedmodel, tensorrt_plan (did you mean 'onnxruntime_onnx'?)",
        ),
        (
            "backend_typo",
            "unsupported backend 'onxruntime' for model 'backend_typo'; valid backends: "
            "onnxruntime, python, pytorch, tensorflow, tensorrt (did you mean 'onnxruntime'?)",
        ),
        ("policy_missing", "policy_missing' has only version folder 1"),
        ("unknown_tensor", "unexpected inference input 'NOPE', allowed inputs are: INPUT0"),
        (
            "gpu_instance",
            # Triton's words where there is no GPU; opserve's where onnxruntime cannot use it
            "config field 'instance_group.kind: KIND_GPU' of model 'gpu_instance' is not "
            "supported by opserve"
            if visible_gpus()
            else "instance group gpu_instance_0 of model gpu_instance has kind KIND_GPU but no "
            "GPUs are available",
        ),
    ],
)
def test_broken_models_are_unavailable_with_their_reason(
    client, server: RunningServer, model: str, reason: str
) -> None:
    assert not client.is_model_ready(model)
    response = requests.get(f"http://{server.url}/v2/models/{model}/ready")
    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert reason in server.log()
    assert client.is_model_ready("simple")  # every other model keeps serving


def test_an_ignored_config_field_serves_with_a_warning(client, server: RunningServer) -> None:
    assert client.is_model_ready("pinned_memory")
    assert (
        "config field 'optimization.input_pinned_memory' of model 'pinned_memory' is ignored"
        in server.log()
    )


def test_config_syntax_error_names_file_and_line() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"^models/m/config.pbtxt:3:1: invalid model configuration"
    ):
        parse_model_config(
            'name: "m"\nmax_batch_size: 4\nbogus_field: 1\n', "models/m/config.pbtxt"
        )


def test_config_is_the_official_model_config_message() -> None:
    config = parse_model_config('name: "m"\ninstance_group [ { count: 2 kind: KIND_CPU } ]\n')
    assert isinstance(config, ModelConfig)
    assert config.DESCRIPTOR.full_name == "inference.ModelConfig"
    assert config.instance_group[0].count == 2


def test_version_folders_ignore_leading_zeros_and_names(tmp_path: Path) -> None:
    for name in ("1", "2", "0", "012", "v3", "latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a folder")
    assert sorted(version_folders(tmp_path)) == [0, 1, 2]


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("", [9]),
        ("version_policy: { latest: { num_versions: 2 } }", [9, 5]),
        ("version_policy: { all: {} }", [9, 5, 1]),
        ("version_policy: { specific: { versions: [1, 4] } }", [1]),
    ],
)
def test_select_versions(policy: str, expected: list[int]) -> None:
    assert select_versions(parse_model_config(policy), [1, 5, 9]) == expected


def test_one_repository_given_twice_is_one_repository(tmp_path: Path) -> None:
    """Triton accepts a repeated --model-repository (issue 15; qa/L0_model_config does it)."""
    from opserve.repository import find_models

    (tmp_path / "repo" / "m" / "1").mkdir(parents=True)
    repo = tmp_path / "repo"
    assert find_models([repo, repo, tmp_path / "repo" / ".." / "repo"]) == {"m": repo / "m"}


def test_a_file_copied_over_with_its_time_kept_is_a_change(tmp_path: Path) -> None:
    """Polling sees what Triton sees: the later of a file's modification and status change
    (core filesystem `FileModificationTime`), so a model file replaced by `cp -p` or
    `shutil.copy2` (same size, an older modification time kept) is reloaded."""
    import os
    import shutil
    import time

    from opserve.repository.manager import fingerprint

    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    model = folder / "1" / "model.onnx"
    model.write_bytes(b"first")
    replacement = tmp_path / "replacement"
    replacement.write_bytes(b"other")
    stat = model.stat()
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = fingerprint(folder)
    time.sleep(0.05)  # past the file system clock's tick (a few ms), so the status change shows
    shutil.copy2(replacement, model)
    assert model.stat().st_mtime_ns == stat.st_mtime_ns  # what the copy kept
    assert fingerprint(folder) != before


def test_poll_interval_zero_means_no_polling() -> None:
    """As in Triton (main.cc: polling only while --repository-poll-secs > 0)."""
    from opserve.settings import ServerSettings

    settings = ServerSettings([Path(".")], model_control_mode="poll", repository_poll_secs=0)
    assert settings.repository_poll_secs == 0
    with pytest.raises(ValueError, match="must not be negative"):
        ServerSettings([Path(".")], model_control_mode="poll", repository_poll_secs=-1)
