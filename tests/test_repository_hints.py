"""Messages for a repository laid out the wrong way: what was found, the rule, and the fix (pure
logic, no server; the server's side is in test_repository's broken models)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from opserve.check import check_repository, describe_ops
from opserve.config import normalize_platform
from opserve.errors import InvalidArgumentError
from opserve.hints import missing_model_file, model_folder_instead, no_version_folders
from opserve.proto import ModelConfig
from opserve.repository.layout import no_versions_reason, repository_problem, select_versions
from tests import models


def test_no_version_folders_lists_what_it_found_and_the_rule(tmp_path: Path) -> None:
    (tmp_path / "config.pbtxt").write_text("")
    (tmp_path / "v1").mkdir()
    (tmp_path / "01").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"")
    assert no_version_folders(tmp_path) == (
        f"no version folders found in '{tmp_path}': it holds 01/, config.pbtxt, model.onnx, "
        "v1/; version folders have numeric names such as 1/ (names with a leading zero are "
        "ignored)"
    )


def test_a_model_file_of_another_name_suggests_default_model_filename(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "resnet.onnx").write_bytes(b"")
    (tmp_path / "1" / "notes.txt").write_text("")
    assert missing_model_file(tmp_path / "1" / "model.onnx") == (
        f"model file '{tmp_path / '1' / 'model.onnx'}' does not exist; '{tmp_path / '1'}' holds "
        "'resnet.onnx': rename it to 'model.onnx' or set default_model_filename: "
        '"resnet.onnx" in config.pbtxt'
    )


def test_a_missing_model_file_without_candidates_names_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "notes.txt").write_text("")
    message = missing_model_file(tmp_path / "1" / "model.pt")
    assert message.endswith(f"does not exist; '{tmp_path / '1'}' holds notes.txt")
    assert "default_model_filename" not in message


@pytest.mark.parametrize(
    "field, value, closest",
    [
        ("platform", "onnxruntime_onx", "onnxruntime_onnx"),
        ("platform", "pytorch_libtorc", "pytorch_libtorch"),
        ("backend", "pytorh", "pytorch"),
        ("backend", "pyton", "python"),
    ],
)
def test_a_platform_or_backend_typo_names_the_closest_valid_value(
    tmp_path: Path, field: str, value: str, closest: str
) -> None:
    config = ModelConfig(name="m", **{field: value})
    with pytest.raises(InvalidArgumentError) as raised:
        normalize_platform(config, tmp_path)
    intro = (  # Triton's words for a platform
        f"unexpected platform type '{value}' for m"
        if field == "platform"
        else f"unsupported backend '{value}' for model 'm'"
    )
    assert f"{intro}; valid {field}s: " in raised.value.message
    assert raised.value.message.endswith(f"(did you mean '{closest}'?)")


def test_a_value_far_from_every_valid_one_gets_the_list_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        normalize_platform(ModelConfig(name="m", backend="vllm"), tmp_path)
    assert raised.value.message == (
        "unsupported backend 'vllm' for model 'm'; valid backends: onnxruntime, python, "
        "pytorch, tensorflow, tensorrt"
    )


def specific(*versions: int) -> ModelConfig:
    config = ModelConfig(name="m")
    config.version_policy.specific.versions.extend(versions)
    return config


def test_a_policy_naming_only_absent_versions_says_which_were_asked_and_which_exist(
    tmp_path: Path,
) -> None:
    config = specific(3, 4)
    assert select_versions(config, [1, 2]) == []
    assert no_versions_reason(config, tmp_path, [1, 2]) == (
        f"version_policy asks for versions 3, 4, but '{tmp_path}' has only version folders 1, 2"
    )


def test_a_policy_naming_some_absent_versions_warns_and_loads_the_others(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="opserve.repository.layout"):
        assert select_versions(specific(2, 3), [1, 2]) == [2]
    assert caplog.messages == [
        "model 'm': version_policy asks for versions 2, 3, but the model has version folders "
        "1, 2 only: loading 2"
    ]


def test_no_versions_reason_without_folders_is_the_layout_message(tmp_path: Path) -> None:
    assert no_versions_reason(ModelConfig(name="m"), tmp_path, []) == no_version_folders(tmp_path)


def test_a_model_folder_is_not_a_repository(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    folder = models.write_model(repository, "simple", models.identity(), 'name: "simple"\n')
    assert model_folder_instead(folder) == (
        f"'{folder}' looks like a model folder, not a model repository: it holds config.pbtxt "
        f"and the version folder 1/; pass the folder that contains it: --model-repository "
        f"{repository}"
    )
    assert repository_problem(folder) == model_folder_instead(folder)
    assert repository_problem(repository) is None  # the repository itself is fine
    # without a config: the model file beside the version folder gives it away too
    (folder / "config.pbtxt").unlink()
    (folder / "model.onnx").write_bytes(b"")
    assert "it holds model.onnx and the version folder 1/" in (repository_problem(folder) or "")


def test_repository_problems(tmp_path: Path) -> None:
    assert repository_problem(tmp_path / "nope") == (
        f"model repository '{tmp_path / 'nope'}' does not exist"
    )
    (tmp_path / "file").write_text("")
    assert repository_problem(tmp_path / "file") == (
        f"model repository '{tmp_path / 'file'}' is not a directory"
    )


def test_check_reports_the_hints(tmp_path: Path) -> None:
    models.write_model(
        tmp_path, "misnamed", models.identity(), 'backend: "onnxruntime"\n', filename="m.onnx"
    )
    models.write_model(tmp_path, "unnumbered", models.identity(), "", versions=("v1",))
    report = {m.name: m for m in check_repository([tmp_path]).models}
    assert report["misnamed"].problems == [
        f"version 1: {missing_model_file(tmp_path / 'misnamed' / '1' / 'model.onnx')}"
    ]
    assert no_version_folders(tmp_path / "unnumbered") in report["unnumbered"].problems


def test_ops_of_a_library_are_counted_unless_verbose() -> None:
    ops = [f"Op{i}" for i in range(65)]
    assert describe_ops(ops) == "65 ops: Op0, Op1, Op2, Op3, Op4, ... (--verbose lists them all)"
    assert describe_ops(ops, verbose=True) == ", ".join(ops)
    assert describe_ops(ops[:5]) == "Op0, Op1, Op2, Op3, Op4"
    assert describe_ops([]) == "no ops found"
