"""A model whose framework is not installed is UNAVAILABLE with the extra to install."""

from __future__ import annotations

from pathlib import Path

import requests
import tritonclient.http as httpclient

from tests import models
from tests.clients import simple_answers
from tests.conftest import SIMPLE_CONFIG
from tests.serving import RunningServer


def test_missing_framework_names_the_extra(tmp_path: Path) -> None:
    # Hide torch from the worker processes: a package named `torch` that fails to import, first
    # on the path. (The frameworks are all installed where the tests run.)
    hidden = tmp_path / "hide" / "torch"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('torch is hidden by this test')\n")
    repo = tmp_path / "repository"
    (repo / "scripted" / "1").mkdir(parents=True)
    (repo / "scripted" / "1" / "model.pt").write_bytes(b"")
    (repo / "scripted" / "config.pbtxt").write_text('platform: "pytorch_libtorch"\n')
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    env = {"PYTHONPATH": str(hidden.parent)}
    with RunningServer([repo], env=env, log_path=tmp_path / "log") as server:
        response = requests.get(f"http://{server.url}/v2/models/scripted/ready")
        assert response.status_code == 400
        reason = response.json()["error"]
        assert "backend 'pytorch' needs its framework" in reason
        assert "pip install 'opserve[pytorch]'" in reason
        assert simple_answers(httpclient.InferenceServerClient(server.url))
