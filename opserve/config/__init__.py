"""Model configuration: `config.pbtxt` into Triton's `ModelConfig`, auto-complete, JSON form."""

from opserve.config.autocomplete import autocomplete
from opserve.config.jsonform import changed_fields, config_from_model_json, config_to_json
from opserve.config.model import model_config_for
from opserve.config.pbtxt import parse_model_config, read_model_config
from opserve.config.platforms import PLATFORMS, Platform, normalize_platform
from opserve.signature import ModelSignature, TensorSpec

__all__ = [
    "PLATFORMS",
    "ModelSignature",
    "Platform",
    "TensorSpec",
    "autocomplete",
    "changed_fields",
    "config_from_model_json",
    "config_to_json",
    "model_config_for",
    "normalize_platform",
    "parse_model_config",
    "read_model_config",
]
