"""Request headers decoded once: a client sends the same JSON header again and again.

perf_analyzer, and most clients in a steady state, send every request to a model with the same
inference header (the same inputs, shapes, binary sizes and requested outputs); only the binary
tensor data after the header differs. Decoding and checking that header was a fifth of the
server's work per request. `RequestTemplates` remembers, per model and header bytes, what the
header decoded to; a request whose header is byte for byte one seen lately is built from that
template, its tensors sliced from the body at the same offsets. The template is also the request's
`signature`, so the dataplane checks the request against the model's config once per template
(`opserve.schema.ModelSchema.validated`).

Only headers whose every input is binary (`binary_data_size`) and that name no shared memory
become templates (their requests differ in nothing but the bytes after the header), and only
short ones; the cache holds the latest `CAPACITY` headers.
"""

from __future__ import annotations

from dataclasses import dataclass

from opserve.frontends.http.codec import OutputFormat, decode_request
from opserve.frontends.templates import SharedFields
from opserve.inference import InferenceRequest, Tensor
from opserve.memo import remember
from opserve.shared_memory import SharedMemoryRegistry

CAPACITY = 256  # headers remembered (the oldest forgotten first)
MAX_HEADER_BYTES = 4096  # a longer header is decoded every time (it is rarely sent twice)


@dataclass(frozen=True, slots=True, eq=False)
class RequestTemplate:
    """What one inference header decodes to; equal only to itself (a request signature)."""

    inputs: tuple[tuple[str, str, tuple[int, ...], int, int], ...]  # name, type, shape, slice
    binary_size: int  # bytes of tensor data after the header
    fields: SharedFields
    output_format: OutputFormat  # read only, shared by the template's requests

    def request(
        self, body: bytes, header_length: int, model_name: str, model_version: str
    ) -> InferenceRequest:
        data = memoryview(body)[header_length:]
        inputs = [Tensor(n, t, s, data[a:b]) for n, t, s, a, b in self.inputs]
        return self.fields.request(model_name, model_version, inputs, self)


def template_of(request: InferenceRequest, output_format: OutputFormat) -> RequestTemplate | None:
    """The template of a freshly decoded request, when its requests would differ only in the
    binary data after the header (else None)."""
    if output_format.regions is not None or request.raw_input:
        return None
    inputs = []
    offset = 0
    for tensor in request.inputs:
        if not isinstance(tensor.data, memoryview):  # its data was in the JSON header
            return None
        size = len(tensor.data)
        inputs.append((tensor.name, tensor.datatype, tensor.shape, offset, offset + size))
        offset += size
    return RequestTemplate(tuple(inputs), offset, SharedFields.of(request), output_format)


class RequestTemplates:
    """The latest inference headers, decoded (see the module's docstring)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._templates: dict[tuple[str, str, bytes], RequestTemplate] = {}

    def __len__(self) -> int:
        return len(self._templates)

    def decode(
        self,
        body: bytes,
        header_length: int | None,
        model_name: str,
        model_version: str,
        shared_memory: SharedMemoryRegistry | None = None,
    ) -> tuple[InferenceRequest, OutputFormat]:
        """`codec.decode_request`, from a template when the header is one seen lately."""
        key = None
        if header_length and header_length <= MAX_HEADER_BYTES and header_length <= len(body):
            key = (model_name, model_version, body[:header_length])
            template = self._templates.get(key)
            if template is not None and len(body) - header_length == template.binary_size:
                request = template.request(body, header_length, model_name, model_version)
                return request, template.output_format
        request, output_format = decode_request(
            body, header_length, model_name, model_version, shared_memory
        )
        if key is not None:
            template = template_of(request, output_format)
            if template is not None:
                remember(self._templates, key, template, self.capacity)
                request.signature = template
        return request, output_format
