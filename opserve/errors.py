"""opserve's errors: one base class, one code each, taken from Triton's set.

    OpserveError (code)
    ├── InvalidArgumentError   INVALID_ARG   HTTP 400
    ├── NotFoundError          NOT_FOUND     HTTP 404
    ├── UnavailableError       UNAVAILABLE   HTTP 503
    │   └── BuildError         (an op library that could not be built from its sources)
    ├── UnsupportedError       UNSUPPORTED   HTTP 501
    ├── AlreadyExistsError     ALREADY_EXISTS HTTP 400
    └── InternalError          INTERNAL      HTTP 500

Frontends map codes to their wire format in exactly one place each. Errors cross the worker
boundary as plain data (`code`, `message`) and are rebuilt with `error_from_code`.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    INTERNAL = "INTERNAL"
    NOT_FOUND = "NOT_FOUND"
    INVALID_ARG = "INVALID_ARG"
    UNAVAILABLE = "UNAVAILABLE"
    UNSUPPORTED = "UNSUPPORTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"


class OpserveError(Exception):
    """Base of every error opserve reports to a client."""

    code: ErrorCode = ErrorCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(OpserveError):
    code = ErrorCode.INVALID_ARG


class NotFoundError(OpserveError):
    code = ErrorCode.NOT_FOUND


class UnavailableError(OpserveError):
    code = ErrorCode.UNAVAILABLE


class BuildError(UnavailableError):
    """Building a custom-op library failed: no compiler, no headers, a compile error."""


class UnsupportedError(OpserveError):
    code = ErrorCode.UNSUPPORTED


class AlreadyExistsError(OpserveError):
    code = ErrorCode.ALREADY_EXISTS


class InternalError(OpserveError):
    code = ErrorCode.INTERNAL


class CancelledError(OpserveError):
    code = ErrorCode.CANCELLED


_BY_CODE: dict[ErrorCode, type[OpserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        UnavailableError,
        UnsupportedError,
        AlreadyExistsError,
        InternalError,
        CancelledError,
    )
}


def error_from_code(code: str, message: str) -> OpserveError:
    """Rebuild an error that crossed a process boundary as (code, message)."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except (KeyError, ValueError):
        cls = OpserveError
    return cls(message)
