"""A model folder's configuration: `config.pbtxt` (or an override), named and with its platform."""

from __future__ import annotations

from pathlib import Path

from opserve.config.pbtxt import read_model_config
from opserve.config.platforms import normalize_platform
from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig


def model_config_for(name: str, folder: Path, override: ModelConfig | None = None) -> ModelConfig:
    """The config of the model in `folder`; a `name` other than the folder's is an error."""
    path = folder / "config.pbtxt"
    if override is not None:
        config = override
    else:
        config = read_model_config(path) if path.exists() else ModelConfig()
    if not config.name:
        config.name = name
    elif config.name != name:
        raise InvalidArgumentError(
            f"model name '{config.name}' in {path} does not match its folder name '{name}'"
        )
    normalize_platform(config, folder)
    return config
