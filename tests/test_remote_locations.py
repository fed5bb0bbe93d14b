"""Object storage URLs and Triton's credential rules (pure: no store is reached)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opserve.errors import InvalidArgumentError
from opserve.remote.credentials import match_credential, read_credential_file, storage_access
from opserve.remote.locations import is_remote, parse_location, repository_argument
from opserve.remote.mirror import RepositoryMirror, _identity, _is_safe
from opserve.remote.repositories import open_repository


@pytest.mark.parametrize(
    ("url", "bucket", "prefix", "endpoint"),
    [
        ("s3://bucket/path/to/repo", "bucket", "path/to/repo", None),
        ("s3://bucket", "bucket", "", None),
        ("s3://bucket//path///repo/", "bucket", "path/repo", None),  # Triton's CleanPath
        ("s3://127.0.0.1:9000/models/repo", "models", "repo", "http://127.0.0.1:9000"),
        ("s3://minio.local:9000/models", "models", "", "http://minio.local:9000"),
        ("s3://http://host:80/b/p", "b", "p", "http://host:80"),
        ("s3://https://s3.example.com:443/b/p/q", "b", "p/q", "https://s3.example.com:443"),
    ],
)
def test_s3_forms(url: str, bucket: str, prefix: str, endpoint: str | None) -> None:
    location = parse_location(url)
    assert (location.scheme, location.bucket, location.prefix, location.endpoint) == (
        "s3",
        bucket,
        prefix,
        endpoint,
    )
    assert location.url == url
    assert location.root == (f"{bucket}/{prefix}" if prefix else bucket)


def test_gcs_and_azure_forms() -> None:
    gcs = parse_location("gs://my-bucket/models/repo")
    assert (gcs.scheme, gcs.bucket, gcs.prefix) == ("gs", "my-bucket", "models/repo")
    azure = parse_location("as://account/container/path/to/repo")
    assert (azure.scheme, azure.account, azure.bucket, azure.prefix) == (
        "as",
        "account",
        "container",
        "path/to/repo",
    )
    # the account's host name stands for the account, as in Triton
    hosted = parse_location("as://acct.blob.core.windows.net/models")
    assert (hosted.account, hosted.bucket, hosted.prefix) == ("acct", "models", "")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("s3://", "no bucket name"),
        ("s3:///", "no bucket name"),
        ("s3://127.0.0.1:9000", "no bucket after the server"),
        ("s3://https://host/bucket", "host and port"),
        ("s3://host:port/bucket", "host and port"),
        ("s3://Upper_Case/repo", "'Upper_Case' is not a valid bucket name"),
        ("gs://", "no bucket name"),
        ("as://account", "expected as://account/container/path"),
        ("as://account/container/p?sv=secret", "query strings are not supported"),
        ("as://account/Container", "not a valid container name"),
    ],
)
def test_malformed_urls_are_refused(url: str, words: str) -> None:
    with pytest.raises(InvalidArgumentError, match=words) as caught:
        parse_location(url)
    assert url.split("?")[0] in caught.value.message


def test_a_url_stays_text_and_a_folder_becomes_a_path() -> None:
    assert repository_argument("s3://bucket/repo") == "s3://bucket/repo"  # Path would fold //
    assert repository_argument("models") == Path("models")
    assert is_remote("gs://b") and is_remote("as://a/c") and not is_remote("/data/s3://x")


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDENV",
    "AWS_SECRET_ACCESS_KEY": "env-secret",
    "AWS_SESSION_TOKEN": "env-token",
    "AWS_DEFAULT_REGION": "eu-west-1",
}


def test_s3_credentials_from_the_environment() -> None:
    access = storage_access(parse_location("s3://bucket/repo"), AWS_ENV)
    assert access.protocol == "s3" and access.source == "the environment"
    assert (access.options["key"], access.options["secret"], access.options["token"]) == (
        "AKIDENV",
        "env-secret",
        "env-token",
    )
    assert access.options["client_kwargs"] == {"region_name": "eu-west-1"}
    assert "endpoint_url" not in access.options
    # a call that hangs fails: timeouts on connecting and reading, bounded retries
    config = access.options["config_kwargs"]
    assert config["connect_timeout"] > 0 and config["read_timeout"] > 0
    assert config["retries"]["max_attempts"] >= 1
    # the secrets never show in a repr (logs, tracebacks)
    assert "env-secret" not in repr(access)


def test_s3_without_keys_uses_the_profile_or_the_sdk_chain() -> None:
    location = parse_location("s3://127.0.0.1:9000/bucket")
    only_id = storage_access(location, {"AWS_ACCESS_KEY_ID": "AKID", "AWS_PROFILE": "dev"})
    assert "key" not in only_id.options and only_id.options["profile"] == "dev"
    chain = storage_access(location, {})
    assert not {"key", "secret", "profile"} & set(chain.options)
    # the host:port form needs no AWS_ENDPOINT_URL: the endpoint comes from the URL
    assert chain.options["endpoint_url"] == "http://127.0.0.1:9000"
    assert chain.options["client_kwargs"]["region_name"]


def write_credentials(tmp_path: Path, data: object) -> dict[str, str]:
    path = tmp_path / "cloud_credential.json"
    path.write_text(json.dumps(data))
    return {"TRITON_CLOUD_CREDENTIAL_PATH": str(path), **AWS_ENV}


def test_the_credential_file_takes_the_longest_matching_name(tmp_path: Path) -> None:
    env = write_credentials(
        tmp_path,
        {
            "s3": {
                "": {"key_id": "AKIDALL", "secret_key": "all-secret", "region": "us-east-1"},
                "s3://bucket-002": {
                    "key_id": "AKID002",
                    "secret_key": "secret-002",
                    "session_token": "token-002",
                    "region": "",
                    "profile": "",
                },
            },
            "gs": {"": "/creds/default.json", "gs://gcs-bucket-002": "/creds/002.json"},
            "as": {
                "": {"account_str": "", "account_key": "a2V5"},
                "as://Account-MI/container": {"account_str": "mi", "auth_type": "managed_identity"},
            },
        },
    )
    specific = storage_access(parse_location("s3://bucket-002/model_repository"), env)
    assert (specific.options["key"], specific.options["token"]) == ("AKID002", "token-002")
    assert specific.source == "TRITON_CLOUD_CREDENTIAL_PATH entry 's3://bucket-002'"
    # the file replaces the environment entirely
    other = storage_access(parse_location("s3://any-other-bucket/repo"), env)
    assert other.options["key"] == "AKIDALL" and "token" not in other.options
    assert storage_access(parse_location("gs://gcs-bucket-002/r"), env).options["token"] == (
        "/creds/002.json"
    )
    assert storage_access(parse_location("gs://elsewhere/r"), env).options["token"] == (
        "/creds/default.json"
    )
    keyed = storage_access(parse_location("as://acct/container/r"), env)
    assert (keyed.options["account_name"], keyed.options["account_key"]) == ("acct", "a2V5")
    identity = storage_access(parse_location("as://Account-MI/container/r"), env)
    assert identity.options["account_name"] == "mi" and identity.managed_identity == ""
    assert "account_key" not in identity.options


def test_no_matching_credential_is_an_error(tmp_path: Path) -> None:
    env = write_credentials(
        tmp_path, {"s3": {"s3://only-this": {"key_id": "a", "secret_key": "b"}}}
    )
    with pytest.raises(InvalidArgumentError, match="no s3 credential .* matches it"):
        storage_access(parse_location("s3://another/repo"), env)
    with pytest.raises(InvalidArgumentError, match="no gs credential"):
        storage_access(parse_location("gs://bucket/repo"), env)


def test_match_is_a_plain_prefix_as_in_triton() -> None:
    section = {"": 0, "s3://bucket": 1, "s3://bucket/deeper": 2}
    assert match_credential(section, "s3://bucket/deeper/repo") == ("s3://bucket/deeper", 2)
    assert match_credential(section, "s3://bucket-2/repo") == ("s3://bucket", 1)
    assert match_credential(section, "s3://other") == ("", 0)
    assert match_credential({"s3://x": 0}, "s3://y") is None


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", "must hold a JSON object"),
        ('{"ftp": {}}', "section 'ftp': expected s3, gs or as"),
        ('{"s3": []}', "section 's3' must be an object"),
        ('{"s3": {"": {"key": "x"}}}', "unknown key 'key'"),
        ('{"s3": {"": {"key_id": 5}}}', "'key_id' must be a string"),
        ('{"gs": {"": {"path": "x"}}}', "must be the path of a credential JSON file"),
        ('{"as": {"": {"auth_type": "password"}}}', "auth_type must be key"),
    ],
)
def test_a_bad_credential_file_is_named(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "creds.json"
    path.write_text(content)
    with pytest.raises(InvalidArgumentError, match=words) as caught:
        read_credential_file(path)
    assert str(path) in caught.value.message
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        read_credential_file(tmp_path / "missing.json")


def test_gcs_credentials() -> None:
    location = parse_location("gs://bucket/repo")
    named = storage_access(location, {"GOOGLE_APPLICATION_CREDENTIALS": "/k/sa.json"})
    assert named.protocol == "gcs" and named.options["token"] == "/k/sa.json"
    assert named.options["access"] == "read_only" and named.options["timeout"] > 0
    # none named: gcsfs's chain (default credentials, metadata server, anonymous)
    assert storage_access(location, {}).options["token"] is None


def test_azure_credentials() -> None:
    location = parse_location("as://acct/container/repo")
    keyed = storage_access(
        location, {"AZURE_STORAGE_ACCOUNT": "other", "AZURE_STORAGE_KEY": "a2V5"}
    )
    assert keyed.protocol == "abfs"
    # an account named by the credential overrides the URL's, as in Triton
    assert (keyed.options["account_name"], keyed.options["account_key"]) == ("other", "a2V5")
    assert "a2V5" not in repr(keyed)
    anonymous = storage_access(location, {})
    assert anonymous.options["anon"] is True and anonymous.options["account_name"] == "acct"
    default = storage_access(location, {"AZURE_STORAGE_AUTH_TYPE": "default"})
    assert default.options["anon"] is False and default.managed_identity is None
    user_assigned = storage_access(
        location,
        {"AZURE_STORAGE_AUTH_TYPE": "managed_identity", "AZURE_STORAGE_CLIENT_ID": "cid"},
    )
    assert user_assigned.managed_identity == "cid"


def test_object_identity_and_paths() -> None:
    s3 = {"ETag": '"abc"', "size": 3, "LastModified": "2026-01-01"}
    assert _identity(s3) != _identity({**s3, "ETag": '"abd"'})
    assert _identity(s3) != _identity({**s3, "size": 4})
    gcs = {"generation": "17", "size": 3, "updated": "2026-01-01"}
    assert _identity(gcs) != _identity({**gcs, "generation": "18"})
    assert _is_safe("model/1/model.onnx") and _is_safe("model")
    for unsafe in ("../x", "model/../../x", "a//b", "/abs", ".", ""):
        assert not _is_safe(unsafe)


def test_a_model_name_that_is_no_folder_name_syncs_nothing(tmp_path: Path) -> None:
    location = parse_location("s3://127.0.0.1:1/bucket/repo")  # never reached
    mirror = RepositoryMirror(location, storage_access(location, {}), cache=tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("kept")
    for name in ("../outside.txt", "a/b", ".."):
        assert mirror.sync(name).fetched == 0
    assert outside.read_text() == "kept"


def test_tritons_mount_directory_holds_the_mirror(tmp_path: Path) -> None:
    env = {"TRITON_AWS_MOUNT_DIRECTORY": str(tmp_path)}
    mirror = open_repository("s3://bucket/repo", env)
    assert mirror.folder.is_relative_to(tmp_path)
    # another scheme's variable does not apply
    assert not open_repository("gs://bucket/repo", env).folder.is_relative_to(tmp_path)
    with pytest.raises(
        InvalidArgumentError, match="TRITON_AWS_MOUNT_DIRECTORY .* is not a directory"
    ):
        open_repository("s3://bucket/repo", {"TRITON_AWS_MOUNT_DIRECTORY": str(tmp_path / "no")})
