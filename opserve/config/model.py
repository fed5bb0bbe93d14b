"""A model folder's configuration: `config.pbtxt` (or an override), named and with its platform."""

from __future__ import annotations

from pathlib import Path

from opserve.config.pbtxt import read_model_config
from opserve.config.platforms import normalize_platform
from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig


def model_config_for(
    name: str,
    folder: Path,
    override: ModelConfig | None = None,
    config_name: str = "",
    auto_complete: bool = True,
) -> ModelConfig:
    """The config of the model in `folder` (`configs/<config_name>.pbtxt` where that exists:
    Triton's --model-config-name); a `name` other than the folder's is an error, and so is a
    missing file when auto-complete is off."""
    path = folder / "config.pbtxt"
    custom = folder / "configs" / f"{config_name}.pbtxt"
    if config_name and custom.exists():
        path = custom
    if override is not None:
        config = override
    elif path.exists():
        config = read_model_config(path)
    elif not auto_complete:
        raise InvalidArgumentError(
            f"model '{name}' has no config.pbtxt, and auto-complete is disabled "
            "(--disable-auto-complete-config / --strict-model-config=true)"
        )
    else:
        config = ModelConfig()
    if not config.name:
        config.name = name
    elif config.name != name:
        source = "the load request's 'config' parameter" if override is not None else str(path)
        raise InvalidArgumentError(
            f"model name '{config.name}' in {source} does not match its folder name '{name}'"
        )
    normalize_platform(config, folder)
    return config
