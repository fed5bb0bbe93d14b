"""The pure rules behind self-healing workers and confined model files (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig
from opserve.repository.confinement import confine_model_files
from opserve.repository.supervision import (
    FIRST_DELAY_S,
    MAX_DELAY_S,
    execution_timeout,
    restart_delay,
)


def config(text: str) -> ModelConfig:
    return text_format.Parse('name: "m"\n' + text, ModelConfig())


def test_restart_delays_double_up_to_a_ceiling() -> None:
    delays = [restart_delay(n) for n in range(12)]
    assert delays[0] == FIRST_DELAY_S and delays[1] == 2 * FIRST_DELAY_S
    assert delays == sorted(delays) and delays[-1] == MAX_DELAY_S
    assert restart_delay(10_000) == MAX_DELAY_S


def test_the_execution_timeout_is_the_models_parameter_else_the_servers() -> None:
    assert execution_timeout(config(""), 7.0) == 7.0
    own = 'parameters { key: "EXECUTION_TIMEOUT_SECS" value: { string_value: "%s" } }'
    assert execution_timeout(config(own % "2.5"), 7.0) == 2.5
    assert execution_timeout(config(own % "0"), 7.0) == 0.0  # this model: no limit
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(InvalidArgumentError, match="EXECUTION_TIMEOUT_SECS must be"):
            execution_timeout(config(own % bad), 7.0)


@pytest.mark.parametrize(
    "text",
    [
        'default_model_filename: "../../etc/passwd"',
        'default_model_filename: "/etc/passwd"',
        'default_model_filename: "sub/../../model.onnx"',
        'model_warmup { name: "w" batch_size: 1 inputs { key: "X" value: { data_type: TYPE_FP32 '
        'dims: [1] input_data_file: "../../../secret" } } }',
        'sequence_batching { state { input_name: "i" output_name: "o" data_type: TYPE_FP32 '
        'dims: [1] initial_state { name: "s" data_type: TYPE_FP32 dims: [1] '
        'data_file: "/etc/shadow" } } }',
    ],
)
def test_model_files_must_stay_inside_the_model_folder(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="leaves the model's folder"):
        confine_model_files(config(text), tmp_path / "m", [tmp_path], from_request=False)


def test_names_inside_the_model_folder_pass(tmp_path: Path) -> None:
    for name in ("model.onnx", "model.savedmodel", "sub/model.pt", "./model.onnx"):
        confine_model_files(
            config(f'default_model_filename: "{name}"'), tmp_path / "m", [], from_request=True
        )


def test_a_load_requests_execution_environment_stays_in_the_allowed_roots(
    tmp_path: Path,
) -> None:
    environment = (
        'backend: "python" parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "%s" } }'
    )
    outside = config(environment % "/usr/local/venv.tar.gz")
    with pytest.raises(InvalidArgumentError, match="EXECUTION_ENV_PATH"):
        confine_model_files(outside, tmp_path / "m", [tmp_path], from_request=True)
    confine_model_files(outside, tmp_path / "m", [tmp_path], from_request=False)  # config.pbtxt
    inside = config(environment % "$$TRITON_MODEL_DIRECTORY/env.tar.gz")
    confine_model_files(inside, tmp_path / "m", [tmp_path], from_request=True)
    allowed = config(environment % f"{tmp_path}/envs/py.tar.gz")
    confine_model_files(allowed, tmp_path / "m", [tmp_path / "envs"], from_request=True)
