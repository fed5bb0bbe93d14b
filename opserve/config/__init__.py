"""Model configuration: `config.pbtxt` into Triton's `ModelConfig`, auto-complete, JSON form."""

from opserve.config.autocomplete import ModelSignature, TensorSpec, autocomplete
from opserve.config.jsonform import config_to_json
from opserve.config.model import model_config_for
from opserve.config.pbtxt import parse_model_config, read_model_config
from opserve.config.platforms import PLATFORMS, Platform, normalize_platform

__all__ = [
    "PLATFORMS",
    "ModelSignature",
    "Platform",
    "TensorSpec",
    "autocomplete",
    "config_to_json",
    "model_config_for",
    "normalize_platform",
    "parse_model_config",
    "read_model_config",
]
