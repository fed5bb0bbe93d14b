"""Reading `config.pbtxt` (protobuf text format) into the official `ModelConfig` message."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig


def parse_model_config(text: str, source: str = "config.pbtxt") -> ModelConfig:
    """Parse protobuf text; a syntax error names `source` with its line and column."""
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        message = str(exc)
        prefix = f"{line}:{column} : "
        if message.startswith(prefix):
            message = message[len(prefix) :]
        raise InvalidArgumentError(
            f"{source}:{line}:{column}: invalid model configuration: {message}"
        ) from exc
    return config


def read_model_config(path: Path) -> ModelConfig:
    """Read a `config.pbtxt`; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read {path}: {exc}") from exc
    return parse_model_config(text, str(path))
