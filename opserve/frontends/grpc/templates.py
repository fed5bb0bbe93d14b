"""`ModelInfer` messages decoded once: a client sends the same request fields again and again.

A `ModelInferRequest` serialized by protobuf holds its fields in the order of their numbers: the
model, version, id, parameters, inputs and requested outputs (fields 1 to 6), then one
`raw_input_contents` entry per input (field 7: a tag byte, the length as a varint, the data). A
client in a steady state (perf_analyzer, a service sending one shape) sends the first six fields
byte for byte the same each time; only the tensor data differs. `InferTemplates` remembers what
such a message decoded to, keyed by the message's length, and a message of that length that
starts with the same bytes and has raw entries of the same sizes is decoded from the template:
its tensors are sliced out of a copy of the message, without protobuf parsing it. The template
is also the request's `signature` (see `opserve.schema.ModelSchema.validated`).

A template is made only from a message whose every input is in `raw_input_contents` (none
typed, none in shared memory) and whose raw entries are exactly its last bytes, in order: then
any message made of the same first bytes and entries of the same sizes parses to the same
fields with other tensor data, which is what the template gives. (Checked when a template is
made: the entries' heads lie where the sizes put them, and the bytes before them parse whole,
with no raw entry among them.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opserve.frontends.grpc.codec import varint
from opserve.frontends.templates import SharedFields
from opserve.inference import InferenceRequest, Tensor
from opserve.memo import remember

CAPACITY = 256  # templates remembered (the oldest forgotten first)
_RAW_INPUT_CONTENTS_TAG = b"\x3a"  # field 7, length-delimited


def _entry_head(size: int) -> bytes:
    """The tag and varint length that precede a raw_input_contents entry of `size` bytes."""
    return _RAW_INPUT_CONTENTS_TAG + varint(size)


@dataclass(frozen=True, slots=True, eq=False)
class InferTemplate:
    """What one message's fields 1 to 6 decode to; equal only to itself (a request signature)."""

    prefix: bytes  # fields 1 to 6, as sent
    entries: tuple[tuple[bytes, int], ...]  # each raw entry's head and data size
    model_name: str
    model_version: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # name, datatype, shape
    fields: SharedFields

    def request(self, message: bytes) -> InferenceRequest | None:
        """The request `message` holds, if it is one of this template's (else None)."""
        if not message.startswith(self.prefix):
            return None
        view = memoryview(message)
        position = len(self.prefix)
        tensors = []
        for (head, size), (name, datatype, shape) in zip(self.entries, self.inputs, strict=True):
            if not message.startswith(head, position):
                return None
            position += len(head)
            tensors.append(Tensor(name, datatype, shape, view[position : position + size]))
            position += size
        return self.fields.request(self.model_name, self.model_version, tensors, self)


def template_of(
    message: bytes | memoryview, parsed: Any, request: InferenceRequest
) -> InferTemplate | None:
    """The template of `message` (`parsed` by protobuf and decoded into `request`), when the
    module's conditions hold; else None."""
    raw = parsed.raw_input_contents
    if request.output_buffers or len(raw) != len(request.inputs) or not raw:
        return None
    entries = [(_entry_head(len(data)), len(data)) for data in raw]
    tail = sum(len(head) + size for head, size in entries)
    start = len(message) - tail
    if start < 0:
        return None
    view = memoryview(message)
    position = start
    for head, size in entries:  # the raw entries' heads where they would end the message
        if view[position : position + len(head)] != head:
            return None
        position += len(head) + size
    prefix = bytes(view[:start])
    try:  # ... and what comes before them is whole fields, with no raw entry among them
        if type(parsed).FromString(prefix).raw_input_contents:
            return None
    except Exception:  # protobuf's DecodeError: the prefix ends inside a field
        return None
    return InferTemplate(
        prefix,
        tuple(entries),
        request.model_name,
        request.model_version,
        tuple((t.name, t.datatype, t.shape) for t in request.inputs),
        SharedFields.of(request),
    )


class InferTemplates:
    """The latest `ModelInfer` templates, by message length (see the module's docstring)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._by_length: dict[int, InferTemplate] = {}

    def __len__(self) -> int:
        return len(self._by_length)

    def request(self, message: bytes | memoryview) -> InferenceRequest | None:
        """The request of a message like one remembered, or None (then protobuf parses it)."""
        template = self._by_length.get(len(message))
        if template is None:
            return None
        return template.request(bytes(message))  # the message's buffer is reused: a copy

    def remember(self, message: bytes | memoryview, parsed: Any, request: InferenceRequest) -> None:
        """Learn from a message protobuf parsed and the servicer decoded (and checked)."""
        template = template_of(message, parsed, request)
        if template is None:
            return
        remember(self._by_length, len(message), template, self.capacity)
        request.signature = template
