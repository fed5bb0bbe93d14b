"""Custom-op libraries: per model (in its folder or version folder), server-wide, and LD_PRELOAD."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from tests import models
from tests.conftest import ROOT, SIMPLE_CONFIG, custom_op_config
from tests.serving import RunningServer


def add_one(client: httpclient.InferenceServerClient, model: str) -> np.ndarray:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = httpclient.InferInput("INPUT0", [2, 4], "FP32")
    tensor.set_data_from_numpy(data)
    return client.infer(model, [tensor]).as_numpy("OUTPUT0") - data


@pytest.mark.parametrize("model", ["ops_in_model_dir", "ops_in_version_dir"])
def test_model_operations_library_ships_with_the_model(client, model: str) -> None:
    np.testing.assert_array_equal(add_one(client, model), np.ones((2, 4), dtype=np.float32))


def test_metadata_names_the_loaded_libraries(client, test_repository) -> None:
    metadata = client.get_model_metadata("ops_in_version_dir")
    assert metadata["op_libraries"] == [
        str(test_repository.resolve() / "ops_in_version_dir" / "1" / "libmy_ops.so")
    ]


def test_missing_library_makes_only_that_model_unavailable(client, server: RunningServer) -> None:
    response = requests.get(f"http://{server.url}/v2/models/ops_missing_library/ready")
    assert response.status_code == 400
    reason = response.json()["error"]
    assert "op library 'libnot_there.so' of model 'ops_missing_library' was not found" in reason
    assert "ops_missing_library/libnot_there.so" in reason  # where it looked
    assert "libnot_there.so" in server.log()
    assert client.is_model_ready("ops_in_model_dir")


def test_unregistered_op_is_unavailable_with_onnxruntimes_message(server: RunningServer) -> None:
    response = requests.get(f"http://{server.url}/v2/models/ops_not_registered/ready")
    assert response.status_code == 400
    assert "AddOne" in response.json()["error"]


@pytest.fixture(scope="module")
def plain_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that uses my_ops::AddOne without naming a library, and one that has nothing to do with it."""
    repo = tmp_path_factory.mktemp("plain") / "repository"
    models.write_model(
        repo, "uses_add_one", models.custom_op(), custom_op_config("uses_add_one", None)
    )
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    return repo


def test_server_wide_op_library_flag(
    plain_repository: Path, my_ops_library: Path, tmp_path: Path
) -> None:
    with RunningServer(
        [plain_repository], ["--op-library", str(my_ops_library)], log_path=tmp_path / "log"
    ) as server:
        client = httpclient.InferenceServerClient(server.url)
        np.testing.assert_array_equal(
            add_one(client, "uses_add_one"), np.ones((2, 4), dtype=np.float32)
        )
        assert client.is_model_ready("simple")


def test_ld_preload_keeps_working_from_the_folder_that_holds_the_clone(
    plain_repository: Path, my_ops_library: Path, tmp_path: Path
) -> None:
    """With LD_PRELOAD set, `opserve serve` runs itself again without it. Started from the
    folder that holds the clone (named `opserve`, as `git clone` names it), where
    `python -m opserve` would take the clone for the package, it still runs the same opserve."""
    (tmp_path / "opserve").symlink_to(ROOT, target_is_directory=True)
    # the console script's code, with no PYTHONPATH: opserve is found as installed
    console_script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from opserve.cli import main; raise SystemExit(main())"
    )
    env = {"LD_PRELOAD": str(my_ops_library), "PYTHONPATH": ""}
    with RunningServer(
        [plain_repository.resolve()],
        env=env,
        log_path=tmp_path / "log",
        cwd=tmp_path,
        program=[sys.executable, "-c", console_script],
    ) as server:
        client = httpclient.InferenceServerClient(server.url)
        np.testing.assert_array_equal(
            add_one(client, "uses_add_one"), np.ones((2, 4), dtype=np.float32)
        )


def test_library_that_fails_to_load(tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    folder = models.write_model(
        repo,
        "broken_library",
        models.custom_op(),
        custom_op_config("broken_library", "libbroken.so"),
    )
    (folder / "libbroken.so").write_bytes(b"this is not an ELF file")
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    with RunningServer([repo], log_path=tmp_path / "log") as server:
        client = httpclient.InferenceServerClient(server.url)
        response = requests.get(f"http://{server.url}/v2/models/broken_library/ready")
        assert response.status_code == 400
        reason = response.json()["error"]
        library = folder / "libbroken.so"
        assert f"op library '{library}' is not a readable ELF shared library" in reason
        assert f"{library}: file too short" in reason  # the loader's own words
        assert "libbroken.so" in server.log()
        assert client.is_model_ready("simple")
