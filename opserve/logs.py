"""The server's log: Triton's line formats and severity switches, changeable while it runs.

`--log-format default` writes Triton's `LMMDD hh:mm:ss.ssssss PID file:line] message`,
`ISO8601` writes `YYYY-MM-DDThh:mm:ssZ L PID file:line] message`, and `json` (an opserve extra)
one JSON object per line. `--log-info/--log-warning/--log-error` switch severities on and off,
`--log-verbose N` (N > 0) adds DEBUG lines. The logging extension (`/v2/logging`, gRPC
`LogSettings`) reads and changes the same `LogSettings` while the server runs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opserve.errors import InvalidArgumentError

FORMATS = ("default", "ISO8601", "json")


@dataclass
class LogSettings:
    """Triton's log settings, with its names."""

    log_file: str = ""
    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    log_verbose_level: int = 0
    log_format: str = "default"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class TritonFormatter(logging.Formatter):
    def __init__(self, settings: LogSettings) -> None:
        super().__init__()
        self.settings = settings

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        where = f"{os.path.basename(record.pathname)}:{record.lineno}"
        if self.settings.log_format == "json":
            return json.dumps(
                {
                    "time": _iso(record.created, fraction=True),
                    "level": record.levelname,
                    "pid": record.process,
                    "logger": record.name,
                    "where": where,
                    "message": message,
                }
            )
        letter = "V" if record.levelno < logging.INFO else record.levelname[0]
        if self.settings.log_format == "ISO8601":
            return f"{_iso(record.created)} {letter} {record.process} {where}] {message}"
        stamp = time.strftime("%m%d %H:%M:%S", time.localtime(record.created))
        micros = int((record.created % 1) * 1_000_000)
        return f"{letter}{stamp}.{micros:06d} {record.process} {where}] {message}"


def _iso(created: float, fraction: bool = False) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    if fraction:
        stamp += f".{int((created % 1) * 1_000_000):06d}"
    return stamp + "Z"


class _SeverityFilter(logging.Filter):
    """Drops the severities the settings switch off."""

    def __init__(self, settings: LogSettings) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return self.settings.log_error
        if record.levelno >= logging.WARNING:
            return self.settings.log_warning
        if record.levelno >= logging.INFO:
            return self.settings.log_info
        return self.settings.log_verbose_level > 0


class ServerLog:
    """The root logger's one handler and the settings that shape it."""

    def __init__(self, settings: LogSettings) -> None:
        self.settings = settings
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(TritonFormatter(settings))
        self.handler.addFilter(_SeverityFilter(settings))

    def install(self) -> None:
        if self.settings.log_format not in FORMATS:
            raise ValueError(
                f"--log-format must be one of {', '.join(FORMATS)}, not {self.settings.log_format!r}"
            )
        if self.settings.log_file:
            # the server and every worker (which inherit stderr) write to the file
            descriptor = os.open(
                self.settings.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
            )
            os.dup2(descriptor, sys.stderr.fileno())
            os.close(descriptor)
        root = logging.getLogger()
        root.handlers[:] = [self.handler]
        self._apply_level()

    def _apply_level(self) -> None:
        level = logging.DEBUG if self.settings.log_verbose_level > 0 else logging.INFO
        logging.getLogger().setLevel(level)
        os.environ["OPSERVE_LOG_LEVEL"] = logging.getLevelName(level)  # workers started later

    def update(self, changes: dict[str, Any]) -> LogSettings:
        """Apply a logging-extension update (Triton's field names and types); all or nothing."""
        updated = LogSettings(**asdict(self.settings))
        for key, value in changes.items():
            if key == "log_file":
                if value not in ("", self.settings.log_file):
                    raise InvalidArgumentError(
                        "log_file cannot be changed while the server runs; start it with --log-file"
                    )
                continue
            if key in ("log_info", "log_warning", "log_error"):
                if not isinstance(value, bool):
                    raise InvalidArgumentError(f"expecting a boolean for '{key}'")
            elif key == "log_verbose_level":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise InvalidArgumentError(
                        "expecting a non-negative integer for 'log_verbose_level'"
                    )
            elif key == "log_format":
                if value not in ("default", "ISO8601"):
                    raise InvalidArgumentError(
                        f"invalid log format '{value}': expecting default or ISO8601"
                    )
            else:
                raise InvalidArgumentError(f"unknown log setting '{key}'")
            setattr(updated, key, value)
        for key, value in asdict(updated).items():
            setattr(self.settings, key, value)
        self._apply_level()
        return self.settings


def log_file_path(value: Path | None) -> str:
    return str(value) if value is not None else ""
