"""Model repositories in object storage, served from a local S3-compatible server (moto's,
started here on loopback with IAM authentication on), never a real cloud: a custom-op model
whose op library lives in the bucket beside it, new versions and models seen by polling and by
explicit loads, Triton's host:port form and its credential file, and the errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from opserve.remote.mirror import RemoteRepositoryError
from opserve.remote.repositories import localize
from tests import models
from tests.conftest import add_constant, custom_op_config
from tests.serving import RunningServer, children, eventually, free_port, mapped

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "models"
PREFIX = "triton/repo"


class S3Server:
    """moto's S3 server on loopback; the first three calls (no credentials yet) make an IAM user
    allowed everything and its key, after which every call needs that key."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.key_id = ""
        self.secret = ""

    def __enter__(self) -> S3Server:
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto did not start:\n{self.log_path.read_text()}"
                    ) from None
                time.sleep(0.1)
        iam = self._client("iam", "bootstrap", "bootstrap")
        iam.create_user(UserName="opserve")
        iam.put_user_policy(
            UserName="opserve",
            PolicyName="everything",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="opserve")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.s3 = self._client("s3", self.key_id, self.secret)
        self.iam = self._client("iam", self.key_id, self.secret)
        self.s3.create_bucket(Bucket=BUCKET)
        return self

    def _client(self, service: str, key_id: str, secret: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self._log.close()

    def url(self, prefix: str = PREFIX) -> str:
        """Triton's form for an S3-compatible server: s3://host:port/bucket/prefix."""
        return f"s3://127.0.0.1:{self.port}/{BUCKET}/{prefix}"

    def upload(self, folder: Path, prefix: str = PREFIX) -> None:
        """Every file under `folder` as `prefix/<relative path>`."""
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                self.s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())

    def delete(self, prefix: str) -> None:
        listed = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        for item in listed:
            self.s3.delete_object(Bucket=BUCKET, Key=item["Key"])

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret}

    def second_key(self) -> dict[str, str]:
        """The environment of another key of the same user, to revoke while a server uses it."""
        key = self.iam.create_access_key(UserName="opserve")["AccessKey"]
        return {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    def revoke(self, key_id: str) -> None:
        self.iam.delete_access_key(UserName="opserve", AccessKeyId=key_id)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, my_ops_library: Path) -> Iterator[S3Server]:
    """The bucket holds `addone`: an ONNX model of a custom op, its library in its folder."""
    work = tmp_path_factory.mktemp("s3")
    with S3Server(work / "moto.log") as server:
        local = work / "repository"
        folder = models.write_model(
            local, "addone", models.custom_op(), custom_op_config("addone", "libmy_ops.so")
        )
        (folder / "libmy_ops.so").write_bytes(my_ops_library.read_bytes())
        server.upload(local)
        yield server


def write_plain_model(root: Path, name: str, value: float, version: int = 1) -> Path:
    """A model without ops of its own: OUTPUT0 = INPUT0 + value."""
    return models.write_model(root, name, add_constant(value), "max_batch_size: 4\n", (version,))


def infer(client: httpclient.InferenceServerClient, model: str, version: str = "") -> np.ndarray:
    data = np.array([[1, 2, 3, 4]], dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [1, 4], "FP32")]
    inputs[0].set_data_from_numpy(data)
    return client.infer(model, inputs, model_version=version).as_numpy("OUTPUT0")


def ready(client: httpclient.InferenceServerClient, model: str, version: str = "") -> bool:
    try:
        return bool(client.is_model_ready(model, version))
    except InferenceServerException:
        return False


def test_polling_serves_the_bucket_and_follows_it(s3: S3Server, tmp_path: Path) -> None:
    """The custom-op model and its library come from the bucket, the library is inspected and
    loaded from the local mirror, and polling sees a new version, a new model and a removal;
    an object that did not change is not fetched again. Once its key is revoked, a poll fails
    and says so, and the loaded models keep serving."""
    cache = tmp_path / "cache"
    key = s3.second_key()
    with (
        RunningServer(
            [s3.url()],  # type: ignore[list-item]
            ["--model-control-mode", "poll", "--repository-poll-secs", "0.5"],
            env={**key, "OPSERVE_CACHE_DIR": str(cache)},
            log_path=tmp_path / "server.log",
        ) as server,
        httpclient.InferenceServerClient(server.url) as client,
    ):
        np.testing.assert_array_equal(infer(client, "addone"), [[2, 3, 4, 5]])
        mirrored = next(cache.glob("opserve/repositories/s3-*/repository"))
        library = mirrored / "addone" / "libmy_ops.so"
        assert library.is_file()
        # the worker loaded the library from the mirror, after its inspection
        assert any(mapped(pid, str(library)) for pid in children(server.process.pid))  # type: ignore[union-attr]
        model_file = mirrored / "addone" / "1" / "model.onnx"
        before = model_file.stat().st_ino

        staged = tmp_path / "staged"
        write_plain_model(staged, "addone", 10.0, version=2)
        (staged / "addone" / "config.pbtxt").unlink()  # only the new version folder
        write_plain_model(staged, "appears", 100.0)
        s3.upload(staged)
        eventually(lambda: ready(client, "addone", "2"), "version 2 of addone", seconds=60)
        np.testing.assert_array_equal(infer(client, "addone", "2"), [[11, 12, 13, 14]])
        eventually(lambda: ready(client, "appears"), "the new model 'appears'", seconds=60)
        np.testing.assert_array_equal(infer(client, "appears"), [[101, 102, 103, 104]])
        assert model_file.stat().st_ino == before  # unchanged: not fetched again

        s3.delete(f"{PREFIX}/appears/")

        def listed() -> set[str]:
            return {e["name"] for e in client.get_model_repository_index()}

        eventually(lambda: "appears" not in listed(), "'appears' to leave the index", seconds=60)
        assert not ready(client, "appears") and not (mirrored / "appears").exists()
        assert "addone" in listed()

        s3.revoke(key["AWS_ACCESS_KEY_ID"])
        eventually(
            lambda: "cannot poll the model repositories" in server.log(),
            "a failed poll",
            seconds=60,
        )
        assert f"model repository '{s3.url()}'" in server.log()
        np.testing.assert_array_equal(infer(client, "addone", "2"), [[11, 12, 13, 14]])
        with pytest.raises(InferenceServerException, match="Access Key Id"):
            client.get_model_repository_index()  # Triton's index polls the repository
    s3.delete(f"{PREFIX}/addone/2/")


def test_explicit_loads_with_the_credential_file(s3: S3Server, tmp_path: Path) -> None:
    """TRITON_CLOUD_CREDENTIAL_PATH: the longest matching name wins over a wrong "" entry; the
    repository index and an explicit load see a model uploaded after start-up."""
    credentials = tmp_path / "cloud_credential.json"
    credentials.write_text(
        json.dumps(
            {
                "s3": {
                    "": {"key_id": "AKIAWRONGWRONGWRONG0", "secret_key": "wrong"},
                    f"s3://127.0.0.1:{s3.port}/{BUCKET}": {
                        "key_id": s3.key_id,
                        "secret_key": s3.secret,
                        "region": "us-east-1",
                    },
                }
            }
        )
    )
    env = {"TRITON_CLOUD_CREDENTIAL_PATH": str(credentials), "OPSERVE_CACHE_DIR": str(tmp_path)}
    with (
        RunningServer(
            [s3.url()],  # type: ignore[list-item]
            ["--model-control-mode", "explicit", "--load-model", "addone"],
            env=env,
            log_path=tmp_path / "server.log",
        ) as server,
        httpclient.InferenceServerClient(server.url) as client,
    ):
        np.testing.assert_array_equal(infer(client, "addone"), [[2, 3, 4, 5]])
        staged = tmp_path / "staged"
        write_plain_model(staged, "late", 5.0)
        s3.upload(staged)
        assert "late" in {e["name"] for e in client.get_model_repository_index()}
        client.load_model("late")
        np.testing.assert_array_equal(infer(client, "late"), [[6, 7, 8, 9]])
        # a changed object is fetched again when the model is loaded again
        write_plain_model(staged, "late", 50.0)
        s3.upload(staged)
        client.load_model("late")
        np.testing.assert_array_equal(infer(client, "late"), [[51, 52, 53, 54]])
        # a model gone from the bucket: Triton's error for a load it cannot poll
        s3.delete(f"{PREFIX}/late/")
        with pytest.raises(InferenceServerException, match="failed to poll from model repository"):
            client.load_model("late")


def unreadable(url: str, env: dict[str, str], tmp_path: Path) -> str:
    """Why the repository at `url` cannot be fetched (the error `opserve serve` prints)."""
    with pytest.raises(RemoteRepositoryError) as caught:
        localize([url], {**env, "OPSERVE_CACHE_DIR": str(tmp_path)})
    assert f"model repository '{url}'" in caught.value.message
    return caught.value.message


def test_a_repository_that_cannot_be_read_stops_the_start(s3: S3Server, tmp_path: Path) -> None:
    """`opserve serve` refuses to start, naming the URL and never the secret, as it refuses a
    folder that does not exist."""
    wrong = {"AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    done = subprocess.run(
        [sys.executable, "-m", "opserve", "serve", "--model-repository", s3.url()],
        env={**os.environ, **wrong, "OPSERVE_CACHE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"opserve serve: error: model repository '{s3.url()}'" in done.stderr
    assert "signature" in done.stderr and "not-the-secret" not in done.stderr

    unknown = {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNUNKNOWN00", "AWS_SECRET_ACCESS_KEY": "x"}
    assert "Access Key Id you provided does not exist" in unreadable(s3.url(), unknown, tmp_path)
    missing = f"s3://127.0.0.1:{s3.port}/no-such-bucket/repo"
    assert "bucket does not exist" in unreadable(missing, s3.env(), tmp_path)
    empty = s3.url("nothing/here")
    assert "does not exist: no object under it" in unreadable(empty, s3.env(), tmp_path)
    closed = f"s3://127.0.0.1:{free_port()}/{BUCKET}/{PREFIX}"
    assert "Could not connect" in unreadable(closed, s3.env(), tmp_path)


def test_check_reads_the_bucket(s3: S3Server, tmp_path: Path) -> None:
    """`opserve check` sees the mirror as an ordinary folder: the library from the bucket is
    inspected and the model's ops are found in it."""
    done = subprocess.run(
        [sys.executable, "-m", "opserve", "check", "--model-repository", s3.url(), "--json"],
        env={**os.environ, **s3.env(), "OPSERVE_CACHE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert "libmy_ops.so" in json.dumps(report) and "my_ops::AddOne" in json.dumps(report)


@pytest.mark.parametrize("url", ["gs://bucket/repo", "as://account/container/repo"])
def test_a_missing_extra_is_named(url: str, tmp_path: Path) -> None:
    package = "gcsfs" if url.startswith("gs") else "adlfs"
    try:
        __import__(package)
    except ImportError:
        pass
    else:
        pytest.skip(f"{package} is installed")
    message = unreadable(url, {}, tmp_path)
    assert f"'{package}' package: pip install 'opserve[remote]'" in message
