"""Who may call what, and which request headers become parameters: Triton's
`--http-restricted-api` / `--grpc-restricted-protocol` and `--http-header-forward-pattern` /
`--grpc-header-forward-pattern`, shared by both frontends.

A restriction names API categories and a header (`key=value`) that a call to any of them must
carry; a call without it is refused (HTTP 403, gRPC PERMISSION_DENIED) in Triton's words. A
forward pattern is a regular expression: the headers of an inference request whose names it
matches are added to the request's parameters (string values), for the model to read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

CATEGORIES = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)


@dataclass(frozen=True)
class Restriction:
    key: str  # a header name, lowercase
    value: str


def parse_restrictions(values: list[str], flag: str) -> dict[str, Restriction]:
    """`<api>[,<api>...]:<key>=<value>` (or `<api>,...,<key>=<value>`), flag by flag."""
    restrictions: dict[str, Restriction] = {}
    for value in values:
        if ":" in value:
            apis_text, _, header = value.partition(":")
            apis = apis_text.split(",")
        else:
            *apis, header = value.split(",")
        key, equals, expected = header.partition("=")
        if not equals or not key or not apis:
            raise ValueError(f"{flag} '{value}' must read <apis>:<key>=<value>")
        for api in apis:
            if api not in CATEGORIES:
                raise ValueError(
                    f"{flag}: unknown API '{api}'; expecting some of {', '.join(CATEGORIES)}"
                )
            if api in restrictions:
                raise ValueError(f"{flag}: API '{api}' is restricted twice")
            restrictions[api] = Restriction(key.lower(), expected)
    return restrictions


def compile_pattern(pattern: str, flag: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{flag} '{pattern}' is not a regular expression: {exc}") from None


def refusal(
    restrictions: dict[str, Restriction],
    category: str,
    headers: Iterable[tuple[str, str]],
    what: str,
) -> str | None:
    """Triton's message when a call to `category` lacks its header, else None. `what` is "API"
    (HTTP) or "protocol" (gRPC)."""
    restriction = restrictions.get(category)
    if restriction is None:
        return None
    for key, value in headers:
        if key.lower() == restriction.key and value == restriction.value:
            return None
    return f"This {what} is restricted, expecting header '{restriction.key}'"


def forwarded(
    pattern: re.Pattern[str] | None, headers: Iterable[tuple[str, str | bytes]]
) -> dict[str, str]:
    """The headers an inference request passes on as parameters (text ones: gRPC's binary
    `-bin` metadata is not)."""
    if pattern is None:
        return {}
    return {key: value for key, value in headers if isinstance(value, str) and pattern.search(key)}


def http_category(parts: list[str]) -> str:
    """The API category of a `/v2/...` path (its parts after `v2`)."""
    if not parts:
        return "metadata"
    head = parts[0]
    if head == "health":
        return "health"
    if head == "repository":
        return "model-repository"
    if head in ("systemsharedmemory", "cudasharedmemory"):
        return "shared-memory"
    if head == "trace":
        return "trace"
    if head == "logging":
        return "logging"
    if head == "models":
        rest = parts[2:]
        if parts[1:2] == ["stats"]:
            return "statistics"
        if len(rest) >= 2 and rest[0] == "versions":
            rest = rest[2:]
        if not rest:
            return "metadata"
        return {
            "infer": "inference",
            "generate": "inference",
            "generate_stream": "inference",
            "ready": "health",
            "stats": "statistics",
            "config": "model-config",
            "trace": "trace",
        }.get(rest[0], "metadata")
    return "metadata"


GRPC_CATEGORIES = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}
