"""Model repositories in object storage: Triton's URL forms, parsed (pure).

    s3://bucket/prefix                         Amazon S3
    s3://host:port/bucket/prefix               an S3-compatible server, over HTTP
    s3://https://host:port/bucket/prefix       the same over HTTPS (`http://` is the default)
    gs://bucket/prefix                         Google Cloud Storage
    as://account/container/prefix              Azure Blob Storage

Extra slashes are dropped, as Triton's `CleanPath` drops them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from opserve.errors import InvalidArgumentError

SCHEMES = ("s3", "gs", "as")
_HOST_PORT = re.compile(r"([0-9A-Za-z\-.]+):([0-9]+)")
_S3_BUCKET = re.compile(r"[0-9a-z.\-]{1,63}")  # Triton's pattern (S3 asks for 3 at least)
_GCS_BUCKET = re.compile(r"[0-9a-z._\-]{1,222}")
_AZURE_CONTAINER = re.compile(r"[0-9a-z\-]{1,63}")
_AZURE_HOST_SUFFIX = ".blob.core.windows.net"


@dataclass(frozen=True)
class RemoteLocation:
    """A repository in object storage: where it is, never how to get in."""

    url: str  # as given (credential names of TRITON_CLOUD_CREDENTIAL_PATH match against it)
    scheme: str  # "s3", "gs" or "as"
    bucket: str  # the bucket; Azure: the container
    prefix: str  # the objects' common prefix, without slashes at either end ("" for all)
    endpoint: str | None = None  # S3-compatible server: "http://host:port"
    account: str = ""  # Azure: the storage account

    @property
    def root(self) -> str:
        """The repository's path inside its store: "bucket/prefix"."""
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def __str__(self) -> str:
        return self.url


def is_remote(text: str) -> bool:
    """Whether a --model-repository value names object storage rather than a folder."""
    return any(text.startswith(f"{scheme}://") for scheme in SCHEMES)


def parse_location(text: str) -> RemoteLocation:
    """The repository a URL names; a malformed one is refused, naming the form expected."""
    scheme, _, rest = text.partition("://")
    if scheme == "s3":
        return _parse_s3(text, rest)
    if scheme == "gs":
        bucket, prefix = _bucket_and_prefix(text, rest, "gs://bucket/path")
        _check_name(text, bucket, _GCS_BUCKET, "bucket")
        return RemoteLocation(text, "gs", bucket, prefix)
    if scheme == "as":
        return _parse_azure(text, rest)
    raise InvalidArgumentError(
        f"model repository '{text}': not an object storage URL (s3://, gs:// or as://)"
    )


def _parse_s3(text: str, rest: str) -> RemoteLocation:
    protocol = "http"
    for candidate in ("https", "http"):
        if rest.startswith(f"{candidate}://"):
            protocol, rest = candidate, rest[len(candidate) + 3 :]
            break
    else:
        candidate = ""
    parts = _segments(rest)
    if parts and _HOST_PORT.fullmatch(parts[0]):
        endpoint = f"{protocol}://{parts[0]}"
        if len(parts) < 2:
            raise InvalidArgumentError(
                f"model repository '{text}': no bucket after the server "
                "(s3://host:port/bucket/path)"
            )
        bucket, prefix = parts[1], "/".join(parts[2:])
        _check_name(text, bucket, _S3_BUCKET, "bucket")
        return RemoteLocation(text, "s3", bucket, prefix, endpoint=endpoint)
    if candidate or (parts and ":" in parts[0]):
        raise InvalidArgumentError(
            f"model repository '{text}': an S3-compatible server is named by host and port "
            "(s3://host:port/bucket/path, or s3://https://host:port/bucket/path)"
        )
    bucket, prefix = _bucket_and_prefix(text, rest, "s3://bucket/path")
    _check_name(text, bucket, _S3_BUCKET, "bucket")
    return RemoteLocation(text, "s3", bucket, prefix)


def _parse_azure(text: str, rest: str) -> RemoteLocation:
    if "?" in rest:
        raise InvalidArgumentError(
            f"model repository '{text}': query strings are not supported in as:// URLs "
            "(give credentials with AZURE_STORAGE_KEY or TRITON_CLOUD_CREDENTIAL_PATH)"
        )
    parts = _segments(rest)
    if len(parts) < 2:
        raise InvalidArgumentError(
            f"model repository '{text}': expected as://account/container/path"
        )
    host, container = parts[0], parts[1]
    account = host[: -len(_AZURE_HOST_SUFFIX)] if host.endswith(_AZURE_HOST_SUFFIX) else host
    _check_name(text, container, _AZURE_CONTAINER, "container")
    return RemoteLocation(text, "as", container, "/".join(parts[2:]), account=account)


def _segments(rest: str) -> list[str]:
    return [part for part in rest.split("/") if part]


def _bucket_and_prefix(text: str, rest: str, form: str) -> tuple[str, str]:
    parts = _segments(rest)
    if not parts:
        raise InvalidArgumentError(f"model repository '{text}': no bucket name ({form})")
    return parts[0], "/".join(parts[1:])


def _check_name(text: str, name: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(name) or name.startswith(("-", ".")):
        raise InvalidArgumentError(
            f"model repository '{text}': '{name}' is not a valid {what} name"
        )


def repository_argument(text: str) -> str | Path:
    """A --model-repository value: an object storage URL stays text (a Path would fold its
    `//`), anything else is a folder."""
    return text if is_remote(text) else Path(text)
