"""Request templates: a header (HTTP) or a ModelInfer message's fields (gRPC) decoded once, and a
request signature checked against the config once. No server: the codecs and the dataplane's
check, on bytes as tritonclient and perf_analyzer send them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from opserve.dataplane import check_request
from opserve.errors import InvalidArgumentError
from opserve.frontends.grpc.codec import decode_infer_request
from opserve.frontends.grpc.templates import InferTemplates
from opserve.frontends.http.codec import (
    OutputFormat,
    _encode_with_json_data,
    decode_request,
    encode_response,
)
from opserve.frontends.http.templates import RequestTemplates
from opserve.inference import InferenceRequest, InferenceResponse, Tensor
from opserve.proto import ModelConfig, service_pb2
from opserve.repository.manager import Model
from opserve.schema import ModelSchema


def http_body(data: bytes, **header: object) -> tuple[bytes, int]:
    fields = {
        "inputs": [
            {
                "name": "INPUT0",
                "shape": [1, len(data) // 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(data)},
            }
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }
    fields.update(header)
    encoded = json.dumps(fields).encode()
    return encoded + data, len(encoded)


def fields(request: InferenceRequest) -> tuple[object, ...]:
    return (
        request.model_name,
        request.model_version,
        [(t.name, t.datatype, t.shape, bytes(t.data)) for t in request.inputs],
        request.requested_outputs,
        request.id,
        request.parameters,
        request.classification,
    )


# HTTP ------------------------------------------------------------------------------------------
def test_a_header_seen_again_decodes_as_decode_request_does() -> None:
    templates = RequestTemplates()
    first, length = http_body(bytes(range(16)), id="a", parameters={"priority": 2})
    request, _ = templates.decode(first, length, "m", "1")
    assert len(templates) == 1 and request.signature is not None
    second = first[:length] + bytes(range(16, 32))  # the same header, other tensor data
    again, output_format = templates.decode(second, length, "m", "1")
    plain, plain_format = decode_request(second, length, "m", "1")
    assert fields(again) == fields(plain)
    assert bytes(again.inputs[0].data) == bytes(range(16, 32))
    assert again.signature is request.signature
    assert output_format.binary == plain_format.binary == {"OUTPUT0": True}
    # each request has parameters of its own: the dataplane pops the server's from them
    again.parameters.pop("priority")
    third, _ = templates.decode(second, length, "m", "1")
    assert third.parameters == {"priority": 2}


def test_a_template_is_per_model_and_version() -> None:
    templates = RequestTemplates()
    body, length = http_body(bytes(8))
    one, _ = templates.decode(body, length, "m", "1")
    other, _ = templates.decode(body, length, "n", "")
    assert (other.model_name, other.model_version) == ("n", "")
    assert other.signature is not one.signature and len(templates) == 2


def test_binary_data_of_another_size_is_refused_as_before() -> None:
    templates = RequestTemplates()
    body, length = http_body(bytes(8))
    templates.decode(body, length, "m", "")
    with pytest.raises(InvalidArgumentError, match="binary_data_size add up to 8"):
        templates.decode(body + bytes(4), length, "m", "")


def test_json_data_and_raw_bodies_make_no_template() -> None:
    templates = RequestTemplates()
    header = {"inputs": [{"name": "I", "shape": [2], "datatype": "INT32", "data": [1, 2]}]}
    body = json.dumps(header).encode()
    request, _ = templates.decode(body, len(body), "m", "")
    assert request.signature is None
    raw, _ = templates.decode(bytes(8), 0, "m", "")  # the binary extension's raw request
    assert raw.raw_input and raw.signature is None
    assert len(templates) == 0


def test_the_oldest_template_is_forgotten_first() -> None:
    templates = RequestTemplates(capacity=2)
    bodies = [http_body(bytes(4), id=str(i)) for i in range(3)]
    for body, length in bodies:
        templates.decode(body, length, "m", "")
    assert len(templates) == 2
    first = templates.decode(*bodies[0], "m", "")[0]
    assert first.id == "0"  # decoded afresh, and remembered again


# gRPC ------------------------------------------------------------------------------------------
def infer_message(*raw: bytes, **extra: object) -> bytes:
    message = service_pb2.ModelInferRequest(model_name="m", model_version="2", id="x")
    for index, data in enumerate(raw):
        tensor = message.inputs.add(name=f"IN{index}", datatype="UINT8", shape=[1, len(data)])
        del tensor  # the data goes in raw_input_contents, as tritonclient sends it
    message.outputs.add(name="OUT")
    message.parameters["priority"].int64_param = 1
    message.raw_input_contents.extend(raw)
    for key, value in extra.items():
        setattr(message, key, value)
    return message.SerializeToString()


def decoded(message: bytes) -> tuple[service_pb2.ModelInferRequest, InferenceRequest]:
    parsed = service_pb2.ModelInferRequest.FromString(message)
    return parsed, decode_infer_request(parsed)[0]


def test_a_message_like_one_seen_decodes_as_protobuf_does() -> None:
    templates = InferTemplates()
    first = infer_message(b"a" * 3, b"b" * 200)
    parsed, request = decoded(first)
    assert templates.request(first) is None
    templates.remember(first, parsed, request)
    assert request.signature is not None
    second = infer_message(b"c" * 3, b"d" * 200)
    again = templates.request(memoryview(second))
    assert again is not None and again.signature is request.signature
    assert fields(again) == fields(decoded(second)[1])
    again.parameters.clear()
    assert templates.request(second).parameters == {"priority": 1}  # type: ignore[union-attr]


def test_entries_of_other_sizes_or_other_fields_are_parsed_instead() -> None:
    templates = InferTemplates()
    first = infer_message(b"a" * 8, b"b" * 16)
    templates.remember(first, *decoded(first))
    swapped = infer_message(b"a" * 16, b"b" * 8)  # the same length, sizes the other way round
    assert len(swapped) == len(first) and templates.request(swapped) is None
    # the same fields, entries of other sizes than before (and than the shapes say)
    uneven = service_pb2.ModelInferRequest.FromString(first)
    uneven.raw_input_contents[:] = [b"a" * 7, b"b" * 17]
    assert len(uneven.SerializeToString()) == len(first)
    assert templates.request(uneven.SerializeToString()) is None
    other_id = infer_message(b"a" * 8, b"b" * 16, id="y")
    assert len(other_id) == len(first) and templates.request(other_id) is None


def test_typed_contents_and_misplaced_entries_make_no_template() -> None:
    templates = InferTemplates()
    typed = service_pb2.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="I", datatype="INT32", shape=[2])
    tensor.contents.int_contents.extend([1, 2])
    message = typed.SerializeToString()
    templates.remember(message, *decoded(message))
    # a raw entry first, the other fields after it: valid protobuf, but not the template's shape
    raw_first = infer_message(b"z" * 4)
    parsed = service_pb2.ModelInferRequest.FromString(raw_first)
    entry = service_pb2.ModelInferRequest(raw_input_contents=[b"z" * 4]).SerializeToString()
    parsed.ClearField("raw_input_contents")
    reordered = entry + parsed.SerializeToString()
    templates.remember(reordered, *decoded(reordered))
    # ... and one whose last bytes only look like the entry (the end of an output's name)
    parsed.outputs[0].name = "OUT:\x04zzzz"
    lookalike = entry + parsed.SerializeToString()
    assert lookalike.endswith(entry)
    templates.remember(lookalike, *decoded(lookalike))
    assert len(templates) == 0


# the dataplane's check --------------------------------------------------------------------------
CONFIG = """
name: "m"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


def model() -> tuple[Model, ModelSchema]:
    config = text_format.Parse(CONFIG, ModelConfig())
    return Model("m", Path("."), config), ModelSchema.from_config(config)


def test_a_signature_is_checked_once_and_its_shapes_kept() -> None:
    templates = RequestTemplates()
    body, length = http_body(bytes(16), parameters={"timeout": 5})
    m, schema = model()
    first, _ = templates.decode(body, length, "m", "")
    check_request(m, schema, first, {})
    assert first.inputs[0].shape == (1, 2, 2) and first.timeout_us == 5
    assert schema.validated == {first.signature: ((1, 2, 2),)}
    second, _ = templates.decode(body, length, "m", "")
    check_request(m, schema, second, {})
    assert second.inputs[0].shape == (1, 2, 2) and second.timeout_us == 5
    # a new config is a new schema: nothing is trusted there
    assert not model()[1].validated


def test_a_failing_or_bytes_request_is_not_remembered() -> None:
    m, schema = model()
    templates = RequestTemplates()
    body, length = http_body(bytes(12))  # 3 elements where the config wants 4
    bad, _ = templates.decode(body, length, "m", "")
    with pytest.raises(InvalidArgumentError, match="unexpected shape"):
        check_request(m, schema, bad, {})
    assert not schema.validated
    strings = ModelSchema.from_config(
        text_format.Parse(
            'name: "s" input [ { name: "S" data_type: TYPE_STRING dims: [ 1 ] } ]'
            ' output [ { name: "O" data_type: TYPE_STRING dims: [ 1 ] } ]',
            ModelConfig(),
        )
    )
    request = InferenceRequest("s", "", [Tensor("S", "BYTES", (1,), b"\x01\x00\x00\x00a")])
    request.signature = object()
    check_request(Model("s", Path("."), ModelConfig()), strings, request, {})
    assert not strings.validated  # its element count depends on its data


# answers ----------------------------------------------------------------------------------------
def test_a_binary_answer_header_is_what_the_general_encoder_writes() -> None:
    outputs = [Tensor("A", "FP32", (1, 2), bytes(8)), Tensor("B", "INT32", (3,), bytes(12))]
    formats = [
        OutputFormat(default_binary=True),
        OutputFormat(binary={"A": True}, shared_memory={"B"}),
        OutputFormat(binary={"A": True}),  # B's data in the JSON: the general encoder
    ]
    for output_format in formats:
        for request_id in ("", "7"):
            response = InferenceResponse("m", "1", list(outputs), request_id)
            expected = _encode_with_json_data(response, output_format)
            assert encode_response(response, output_format) == expected
            assert encode_response(response, output_format) == expected  # remembered
    header, *_ = encode_response(InferenceResponse("m", "1", outputs[:1]), formats[0])[0]
    assert json.loads(header)["outputs"][0]["parameters"] == {"binary_data_size": 8}


def test_json_bf16_data_rounds_to_the_nearest_bf16() -> None:
    """BF16 from JSON numbers: the nearest value, ties to even (it used to truncate), and a
    boolean is refused as not a number."""
    # a tie (to the even 1.015625; truncation gave 1.0078125), a tie to the even 1.0, a value
    # nearer 1.0078125 (truncation gave 1.0), and values that BF16 holds exactly
    values = [1.01171875, 1.00390625, 1.006, -2.5, 3]
    header = json.dumps(
        {"inputs": [{"name": "X", "datatype": "BF16", "shape": [5], "data": values}]}
    )
    request, _ = decode_request(header.encode(), None, "m", "1")
    words = np.frombuffer(bytes(request.inputs[0].data), "<u2").astype("<u4") << 16
    assert words.view("<f4").tolist() == [1.015625, 1.0, 1.0078125, -2.5, 3.0]
    bad = json.dumps({"inputs": [{"name": "X", "datatype": "BF16", "shape": [1], "data": [True]}]})
    with pytest.raises(InvalidArgumentError, match="data of datatype BF16 must be numbers"):
        decode_request(bad.encode(), None, "m", "1")
