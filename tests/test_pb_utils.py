"""`triton_python_backend_utils` as model.py sees it, without a server: tensors, responses, the
auto-complete config helpers and the module's helper functions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opserve.backends import pb_utils
from opserve.backends.base import Request
from opserve.errors import ErrorCode


def test_tensors_hold_numpy_arrays_and_bytes_as_objects() -> None:
    tensor = pb_utils.Tensor("T", np.array(["a", "bc"]))
    assert tensor.name() == "T" and tensor.triton_dtype() == 13
    assert tensor.as_numpy().dtype == np.object_
    numbers = pb_utils.Tensor("N", np.arange(6, dtype=np.float32).reshape(2, 3))
    assert numbers.shape() == [2, 3] and numbers.triton_dtype() == 11 and numbers.is_cpu()
    with pytest.raises(pb_utils.TritonModelException, match="empty string"):
        pb_utils.Tensor("", np.zeros(1))
    with pytest.raises(pb_utils.TritonModelException, match="numpy array"):
        pb_utils.Tensor("L", [1, 2])  # type: ignore[arg-type]
    # a dtype with no V2 datatype is the model's error, naming the tensor
    with pytest.raises(pb_utils.TritonModelException, match="Tensor 'C': numpy dtype complex64"):
        pb_utils.Tensor("C", np.array([1 + 2j], dtype=np.complex64))
    big_endian = pb_utils.Tensor("B", np.array([1.5, -2.0], dtype=">f4"))  # values kept
    assert big_endian.triton_dtype() == 11 and big_endian.as_numpy().tolist() == [1.5, -2.0]


def test_dlpack_round_trip() -> None:
    array = np.arange(4, dtype=np.int64)
    back = pb_utils.Tensor.from_dlpack("D", pb_utils.Tensor("D", array).to_dlpack())
    np.testing.assert_array_equal(back.as_numpy(), array)


def test_responses_keep_only_requested_outputs_and_carry_errors() -> None:
    response = pb_utils.InferenceResponse(
        [pb_utils.Tensor("A", np.zeros(1)), pb_utils.Tensor("B", np.ones(1))]
    )
    assert set(response._to_reply(["B"]).outputs or {}) == {"B"}
    assert set(response._to_reply(None).outputs or {}) == {"A", "B"}
    failed = pb_utils.InferenceResponse(
        error=pb_utils.TritonError("gone", pb_utils.TritonError.NOT_FOUND)
    )
    assert failed.has_error() and failed.error().message() == "gone"  # type: ignore[union-attr]
    reply = failed._to_reply(None)
    assert reply.error is not None and reply.error.code is ErrorCode.NOT_FOUND
    with pytest.raises(pb_utils.TritonModelException, match="pb_utils.Tensor"):
        pb_utils.InferenceResponse([np.zeros(1)])  # type: ignore[list-item]


def test_a_received_request_offers_tritons_accessors() -> None:
    received = Request(
        0, 1, "id-1", {"X": np.ones(2)}, ["Y"], {"k": "v"}, correlation_id=7, flags=1
    )
    request = pb_utils.InferenceRequest._from_received(received, "m", ["Y", "Z"])
    assert request.request_id() == "id-1" and request.correlation_id() == 7
    assert request.flags() == pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
    assert json.loads(request.parameters()) == {"k": "v"}
    assert request.requested_output_names() == {"Y"}
    assert json.loads(request.parameters()) == {"k": "v"} and " " not in request.parameters()
    assert pb_utils.get_input_tensor_by_name(request, "X") is not None
    assert pb_utils.get_input_tensor_by_name(request, "Z") is None
    assert not request.is_cancelled()
    received.cancelled = True
    assert request.is_cancelled() and request.get_response_sender().is_cancelled()


def test_parameters_must_be_flat() -> None:
    with pytest.raises(pb_utils.TritonModelException, match="holds list"):
        pb_utils.InferenceRequest("m", parameters={"k": [1]})
    assert json.loads(pb_utils.InferenceRequest("m", parameters='{"a": 1}').parameters()) == {
        "a": 1
    }


def test_auto_complete_helpers_fill_and_refuse_contradictions() -> None:
    config = pb_utils.ModelConfig({"name": "m", "max_batch_size": 0, "input": []})
    config.set_max_batch_size(8)
    config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [4]})
    config.add_output({"name": "Y", "data_type": "TYPE_FP32", "dims": [4]})
    config.set_dynamic_batching()
    config.set_model_transaction_policy({"decoupled": True})
    as_dict = config.as_dict()
    assert as_dict["max_batch_size"] == 8
    assert as_dict["input"] == [{"name": "X", "data_type": "TYPE_FP32", "dims": [4]}]
    assert as_dict["model_transaction_policy"] == {"decoupled": True}
    assert "dynamic_batching" in as_dict
    with pytest.raises(ValueError, match="max_batch_size"):
        config.set_max_batch_size(4)
    with pytest.raises(ValueError, match="dims"):
        config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [5]})
    with pytest.raises(ValueError, match="contains property other than"):
        config.add_output({"name": "Z", "shape": [1]})
    with pytest.raises(ValueError, match="missing 'dims' property"):
        config.add_output({"name": "Z", "data_type": "TYPE_FP32"})
    with pytest.raises(ValueError, match="already set to 'True'"):
        config.set_model_transaction_policy({"decoupled": False})


def test_type_helpers() -> None:
    assert pb_utils.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb_utils.numpy_to_triton_type(np.int32) == 8
    assert pb_utils.numpy_to_triton_string(np.float16) == "TYPE_FP16"
    assert pb_utils.numpy_to_triton_string(np.object_) == "TYPE_STRING"
    assert pb_utils.triton_to_numpy_type(8) is np.int32
    encoded = pb_utils.serialize_byte_tensor(np.array([b"ab", b"c"], dtype=np.object_))
    assert encoded == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert pb_utils.deserialize_bytes_tensor(encoded).tolist() == [b"ab", b"c"]
    assert pb_utils.serialize_byte_tensor(np.zeros(0, dtype=np.object_)) == ()
    config = {"input": [{"name": "X"}], "output": [{"name": "Y"}]}
    assert pb_utils.get_input_config_by_name(config, "X") == {"name": "X"}
    assert pb_utils.get_output_config_by_name(config, "X") is None


def test_a_sender_closes_after_the_final_flag() -> None:
    sent = []

    class Services:
        def respond(self, request, reply, final):  # type: ignore[no-untyped-def]
            sent.append((reply, final))

    pb_utils._install(Services(), "m")  # type: ignore[arg-type]
    try:
        request = Request(0, 1, "", {}, None, {})
        sender = pb_utils.InferenceResponseSender(request)
        sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("Y", np.ones(1))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        with pytest.raises(pb_utils.TritonModelException, match="closed"):
            sender.send(pb_utils.InferenceResponse([]))
        with pytest.raises(pb_utils.TritonModelException, match="needs a response"):
            pb_utils.InferenceResponseSender(request).send()
        # a model that is not decoupled sends one response, and no final flag before it
        single = pb_utils.InferenceResponseSender(request, decoupled=False)
        with pytest.raises(pb_utils.TritonModelException, match="complete final before"):
            single.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        single.send(pb_utils.InferenceResponse([]))
        with pytest.raises(pb_utils.TritonModelException, match="more than one response"):
            single.send(pb_utils.InferenceResponse([]))
        single.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    finally:
        pb_utils._install(None, "")
    assert [final for _, final in sent] == [False, True, False, True]
