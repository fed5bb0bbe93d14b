"""A `ModelConfig` in Triton's JSON form, as its `/config` endpoint returns it.

Triton prints every field with its proto name, defaults included, and 64-bit integers as JSON
numbers (protobuf's own JSON mapping would quote them).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig

_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def config_to_json(config: ModelConfig) -> dict[str, Any]:
    try:
        as_dict = json_format.MessageToDict(
            config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf < 5.26
        as_dict = json_format.MessageToDict(
            config, preserving_proto_field_name=True, including_default_value_fields=True
        )
    _unquote_int64(as_dict, config.DESCRIPTOR)
    return as_dict


def _unquote_int64(value: dict[str, Any], descriptor: Descriptor) -> None:
    for field in descriptor.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    for sub in item.values():
                        _unquote_int64(sub, value_field.message_type)
                elif value_field.type in _INT64_TYPES:
                    for key in item:
                        item[key] = int(item[key])
            elif isinstance(item, list):
                for sub in item:
                    _unquote_int64(sub, field.message_type)
            else:
                _unquote_int64(item, field.message_type)
        elif field.type in _INT64_TYPES:
            value[field.name] = [int(v) for v in item] if isinstance(item, list) else int(item)


def config_from_model_json(name: str, text: str) -> ModelConfig:
    """A config a model completed itself (the Python backend's `auto_complete_config`), back
    from Triton's JSON form; what protobuf cannot take is an error naming the model."""
    config = ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise InvalidArgumentError(
            f"model '{name}': auto_complete_config returned a config that is not valid: {exc}"
        ) from None
    if config.name != name:
        raise InvalidArgumentError(
            f"model '{name}': auto_complete_config changed the model's name to '{config.name}'"
        )
    return config


def changed_fields(before: ModelConfig, after: ModelConfig) -> list[str]:
    """The top-level fields whose values differ (what a model's auto-complete filled in)."""
    changed = []
    for field in after.DESCRIPTOR.fields:
        if getattr(before, field.name) != getattr(after, field.name):
            changed.append(field.name)
    return changed
