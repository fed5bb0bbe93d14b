"""A custom op that crashes takes down its worker, never the server; the worker comes back."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.clients import simple_answers
from tests.conftest import SIMPLE_CONFIG, custom_op_config
from tests.oplibs import build
from tests.serving import RunningServer


def checked_input(value: float) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
    return [tensor]


def test_crashing_op_restarts_its_worker(tmp_path: Path, my_ops_library: Path) -> None:
    repo = tmp_path / "repository"
    folder = models.write_model(
        repo, "crashy", models.custom_op("Checked"), custom_op_config("crashy", "libmy_ops.so")
    )
    build.copy_to(my_ops_library, folder / "libmy_ops.so")
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    with RunningServer([repo], log_path=tmp_path / "log") as server:
        client = httpclient.InferenceServerClient(server.url, concurrency=4)
        assert client.infer("crashy", checked_input(2.0)).as_numpy("OUTPUT0").tolist() == [
            [2.0] * 4
        ]

        with ThreadPoolExecutor(4) as pool:
            others = [
                pool.submit(simple_answers, httpclient.InferenceServerClient(server.url))
                for _ in range(20)
            ]
            with pytest.raises(InferenceServerException) as raised:
                client.infer("crashy", checked_input(-1.0))
            assert all(f.result() for f in others)
        assert raised.value.status() == "500"
        message = raised.value.message()
        assert "model 'crashy' version 1" in message and "SIGABRT" in message

        deadline = time.monotonic() + 5
        while not client.is_model_ready("crashy") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.is_model_ready("crashy"), server.log()
        assert client.infer("crashy", checked_input(3.0)).as_numpy("OUTPUT0").tolist() == [
            [3.0] * 4
        ]
        assert simple_answers(client)
        assert "SIGABRT" in server.log()
