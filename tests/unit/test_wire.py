"""Protobuf conversions, checked against the SDK's own encoders and decoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from tuneforge.engine.sampler import SampledSequence, SampleResult
from tuneforge.engine.types import ForwardBackwardResult
from tuneforge.errors import Unsupported, UserError
from tuneforge.server import wire


def sdk_request(data, loss_fn="cross_entropy", config=None, forward_only=False) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn,
                                                          loss_fn_config=config),
        model_id="s:train:0", seq_id=3)
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def test_forward_backward_request_decodes_dense_and_sparse_tensors():
    dense_targets = torch.zeros(4, 3, dtype=torch.int64)
    dense_targets[1, 2] = 17
    dense_targets[3, 0] = 5
    weights = torch.zeros(4, 3)
    weights[1, 2] = -0.5
    weights[3, 0] = 2.0
    data = [
        types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": np.array([2, 3, 4]),
                                    "weights": np.array([0.0, 1.0, 1.0], dtype=np.float32)}),
        types.Datum(model_input=types.ModelInput.from_ints([7, 8, 9, 10]),
                    loss_fn_inputs={
                        "target_tokens": types.TensorData.from_torch_sparse(dense_targets),
                        "weights": types.TensorData.from_torch_sparse(weights)}),
    ]
    assert data[1].loss_fn_inputs["weights"].sparse_crow_indices is not None  # really CSR
    msg = wire.parse_forward_backward(
        sdk_request(data, config={"clip": 0.2, "mode": "x"}, forward_only=True), None)
    inp = wire.forward_backward_input(msg)
    assert (msg.model_id, msg.seq_id, inp.loss_fn, inp.forward_only) == ("s:train:0", 3,
                                                                         "cross_entropy", True)
    assert inp.loss_fn_config == {"clip": pytest.approx(0.2), "mode": "x"}
    np.testing.assert_array_equal(inp.data[0].tokens, [1, 2, 3])
    assert inp.data[0].tokens.dtype == np.int64
    np.testing.assert_array_equal(inp.data[1].inputs["target_tokens"], dense_targets.numpy())
    np.testing.assert_array_equal(inp.data[1].inputs["weights"], weights.numpy())


def test_malformed_bodies_are_user_errors():
    with pytest.raises(UserError, match="not a ForwardBackwardRequest"):
        wire.parse_forward_backward(b"\xff\xff\xff\xff", None)
    with pytest.raises(Unsupported, match="Content-Encoding"):
        wire.parse_forward_backward(b"", "gzip")
    img = types.Datum(model_input=types.ModelInput(chunks=[types.ImageChunk(data=b"png",
                                                                            format="png")]),
                      loss_fn_inputs={"target_tokens": np.array([1])})
    with pytest.raises(Unsupported, match="image chunks"):
        wire.forward_backward_input(wire.parse_forward_backward(sdk_request([img]), None))


def test_forward_backward_output_roundtrips_through_the_sdk_decoder():
    outputs = [
        {"logprobs": np.array([-1.0, -2.0], np.float32),
         "elementwise_loss": np.array([1.0, 2.0], np.float32)},
        {"logprobs": np.array([-3.0], np.float32),
         "elementwise_loss": np.array([3.0], np.float32)},
        {"logprobs": np.arange(6, dtype=np.float32).reshape(3, 2),
         "elementwise_loss": np.ones((3, 2), np.float32)},
        {"logprobs": np.array([-4.0, -5.0, -6.0], np.float32),
         "elementwise_loss": np.zeros(3, np.float32)},
    ]
    blob = wire.encode_forward_backward(ForwardBackwardResult(outputs, {"loss:sum": 6.5}))
    decoded = deserialize_forward_backward_output(blob)
    assert decoded.metrics == {"loss:sum": 6.5}
    assert len(decoded.loss_fn_outputs) == 4
    for ours, theirs in zip(outputs, decoded.loss_fn_outputs, strict=True):
        for name in ours:
            np.testing.assert_array_equal(theirs[name].to_numpy(), ours[name])


def test_sample_response_roundtrips_through_the_sdk_decoder():
    result = SampleResult(
        sequences=[SampledSequence(tokens=[5, 6], logprobs=[-0.5, -0.25], stop_reason="stop",
                                   topk_ids=[[5, 1], [6, 2]],
                                   topk_logprobs=[[-0.5, -1.0], [-0.25, -2.0]]),
                   SampledSequence(tokens=[7], logprobs=[-1.5], stop_reason="length")],
        prompt_logprobs=np.array([np.nan, -1.0, -2.0], np.float32),
        topk_prompt_ids=np.array([[0, 0], [3, 4], [5, 6]], np.int32),
        topk_prompt_logprobs=np.array([[-99999.0, -99999.0], [-1.0, -2.0], [-2.0, -3.0]],
                                      np.float32),
    )
    decoded = deserialize_sample_response(wire.encode_sample(result))
    assert [s.tokens for s in decoded.sequences] == [[5, 6], [7]]
    assert [s.stop_reason for s in decoded.sequences] == ["stop", "length"]
    assert decoded.sequences[0].logprobs == [-0.5, -0.25]
    assert decoded.prompt_logprobs == [None, -1.0, -2.0]
    assert decoded.topk_prompt_logprobs[0] is None
    assert decoded.topk_prompt_logprobs[1] == [(3, -1.0), (4, -2.0)]
    assert decoded.sequences[0].topk_logprobs[1] == [(6, -0.25), (2, -2.0)]


def test_json_requests_ignore_unknown_fields_and_name_bad_ones():
    req = wire.parse(types.OptimStepRequest,
                     {"model_id": "m", "seq_id": 2, "adam_params": {"learning_rate": 0.1},
                      "field_from_a_newer_sdk": 1}, "optim_step")
    assert req.optim_params.learning_rate == 0.1
    with pytest.raises(UserError, match="create_model: model_seq_id"):
        wire.parse(types.CreateModelRequest, {"session_id": "s", "model_seq_id": "x",
                                              "base_model": "b"}, "create_model")
