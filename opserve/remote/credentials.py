"""Triton's credential rules for object storage, as fsspec storage options (pure).

Without `TRITON_CLOUD_CREDENTIAL_PATH` the environment decides, as in Triton:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_DEFAULT_REGION (else
AWS_PROFILE, else the AWS SDK's own chain), GOOGLE_APPLICATION_CREDENTIALS (else the attached
service account, else anonymous), AZURE_STORAGE_ACCOUNT / AZURE_STORAGE_KEY (else
AZURE_STORAGE_AUTH_TYPE managed_identity or default, else anonymous).

With it, the JSON file it names holds one section per scheme ("s3", "gs", "as"), each mapping a
credential name to a credential; a repository URL takes the longest name it starts with ("" matches
every URL), and no match is an error. A credential never appears in a message or a repr.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opserve.errors import InvalidArgumentError
from opserve.remote.locations import RemoteLocation

CREDENTIAL_FILE_VARIABLE = "TRITON_CLOUD_CREDENTIAL_PATH"

# a remote call that hangs fails instead: seconds to connect, and to wait for an answer
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60

_S3_FIELDS = ("secret_key", "key_id", "region", "session_token", "profile")
_AZURE_FIELDS = ("account_str", "account_key", "auth_type", "client_id")
_AZURE_AUTH_TYPES = ("", "key", "managed_identity", "default")


@dataclass(frozen=True)
class StorageAccess:
    """How to reach one repository with fsspec: `fsspec.filesystem(protocol, **options)`."""

    protocol: str  # fsspec's name: "s3", "gcs" or "abfs"
    source: str  # where the credential came from, for messages (never the secret)
    options: dict[str, Any] = field(default_factory=dict, repr=False)
    # Azure managed identity: the client id of a user-assigned identity ("" system-assigned);
    # None when no identity credential is to be made (fsspec cannot take it as an option)
    managed_identity: str | None = None


def storage_access(location: RemoteLocation, env: Mapping[str, str] | None = None) -> StorageAccess:
    """The storage options for `location`: from the credential file when
    TRITON_CLOUD_CREDENTIAL_PATH is set, else from the environment."""
    env = os.environ if env is None else env
    path = env.get(CREDENTIAL_FILE_VARIABLE)
    if path:
        section = read_credential_file(Path(path)).get(location.scheme, {})
        match = match_credential(section, location.url)
        if match is None:
            raise InvalidArgumentError(
                f"model repository '{location}': no {location.scheme} credential in "
                f"{CREDENTIAL_FILE_VARIABLE} ('{path}') matches it (add a \"\" entry to "
                "match every URL)"
            )
        name, credential = match
        source = f"{CREDENTIAL_FILE_VARIABLE} entry '{name}'"
    else:
        credential = _from_environment(location.scheme, env)
        source = "the environment"
    if location.scheme == "s3":
        return StorageAccess("s3", source, _s3_options(location, credential))
    if location.scheme == "gs":
        return StorageAccess("gcs", source, _gcs_options(credential))
    return _azure_access(location, credential, source)


def read_credential_file(path: Path) -> dict[str, dict[str, Any]]:
    """The sections of a TRITON_CLOUD_CREDENTIAL_PATH file, checked: "gs" entries are paths
    (strings), "s3" and "as" entries objects of strings with Triton's keys."""
    where = f"{CREDENTIAL_FILE_VARIABLE} file '{path}'"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read the {where}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidArgumentError(f"the {where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"the {where} must hold a JSON object")
    sections: dict[str, dict[str, Any]] = {}
    for scheme, section in data.items():
        if scheme not in ("s3", "gs", "as"):
            raise InvalidArgumentError(
                f"the {where} has a section '{scheme}': expected s3, gs or as"
            )
        if not isinstance(section, dict):
            raise InvalidArgumentError(f"the {where}: section '{scheme}' must be an object")
        for name, credential in section.items():
            _check_credential(where, scheme, name, credential)
        sections[scheme] = section
    return sections


def _check_credential(where: str, scheme: str, name: str, credential: object) -> None:
    entry = f"the {where}: {scheme} entry '{name}'"
    if scheme == "gs":
        if not isinstance(credential, str):
            raise InvalidArgumentError(f"{entry} must be the path of a credential JSON file")
        return
    if not isinstance(credential, dict):
        raise InvalidArgumentError(f"{entry} must be an object")
    known = _S3_FIELDS if scheme == "s3" else _AZURE_FIELDS
    for key, value in credential.items():
        if key not in known:
            raise InvalidArgumentError(
                f"{entry} has an unknown key '{key}' (known: {', '.join(known)})"
            )
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{entry}: '{key}' must be a string")
    if scheme == "as" and credential.get("auth_type", "") not in _AZURE_AUTH_TYPES:
        raise InvalidArgumentError(f"{entry}: auth_type must be key, managed_identity or default")


def match_credential(section: Mapping[str, Any], url: str) -> tuple[str, Any] | None:
    """The entry whose name is the longest start of `url` (Triton's rule: a plain string
    prefix, "" matching everything), or None."""
    names = [name for name in section if url.startswith(name)]
    if not names:
        return None
    name = max(names, key=len)
    return name, section[name]


def _from_environment(scheme: str, env: Mapping[str, str]) -> Any:
    if scheme == "s3":
        return {
            "secret_key": env.get("AWS_SECRET_ACCESS_KEY", ""),
            "key_id": env.get("AWS_ACCESS_KEY_ID", ""),
            "region": env.get("AWS_DEFAULT_REGION", ""),
            "session_token": env.get("AWS_SESSION_TOKEN", ""),
            "profile": env.get("AWS_PROFILE", ""),
        }
    if scheme == "gs":
        return env.get("GOOGLE_APPLICATION_CREDENTIALS", "")
    key = env.get("AZURE_STORAGE_KEY", "")
    return {
        "account_str": env.get("AZURE_STORAGE_ACCOUNT", ""),
        "account_key": key,
        "auth_type": env.get("AZURE_STORAGE_AUTH_TYPE", "") or ("key" if key else ""),
        "client_id": env.get("AZURE_STORAGE_CLIENT_ID", ""),
    }


def _s3_options(location: RemoteLocation, credential: Mapping[str, str]) -> dict[str, Any]:
    """Keys when both are given (with the session token and region), else the profile, else
    the AWS SDK's chain (environment, ~/.aws, instance metadata), as Triton's S3 client."""
    options: dict[str, Any] = {
        "use_listings_cache": False,
        "skip_instance_cache": True,
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": 3, "mode": "standard"},
        },
    }
    client: dict[str, Any] = {}
    if credential.get("key_id") and credential.get("secret_key"):
        options["key"] = credential["key_id"]
        options["secret"] = credential["secret_key"]
        if credential.get("session_token"):
            options["token"] = credential["session_token"]
        if credential.get("region"):
            client["region_name"] = credential["region"]
    elif credential.get("profile"):
        options["profile"] = credential["profile"]
    if location.endpoint is not None:
        options["endpoint_url"] = location.endpoint
        client.setdefault("region_name", credential.get("region") or "us-east-1")
    if client:
        options["client_kwargs"] = client
    return options


def _gcs_options(credential_path: str) -> dict[str, Any]:
    """A credential file when one is named, else gcsfs's chain (application default
    credentials, the attached service account, then anonymous), as Triton's order."""
    return {
        "token": credential_path or None,
        "access": "read_only",
        "timeout": READ_TIMEOUT_S,
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


def _azure_access(
    location: RemoteLocation, credential: Mapping[str, str], source: str
) -> StorageAccess:
    """Triton's order: an account named by the credential overrides the URL's; managed
    identity or the default chain by auth_type; else the shared key; else anonymous."""
    options: dict[str, Any] = {
        "account_name": credential.get("account_str") or location.account,
        "connection_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }
    auth_type = credential.get("auth_type", "")
    identity = None
    if auth_type == "managed_identity":
        identity = credential.get("client_id", "")
    elif auth_type == "default":
        options["anon"] = False  # adlfs then takes azure-identity's DefaultAzureCredential
    elif credential.get("account_key"):
        options["account_key"] = credential["account_key"]
    else:
        options["anon"] = True
    return StorageAccess("abfs", source, options, managed_identity=identity)
