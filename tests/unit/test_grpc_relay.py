"""Pure logic of the ``ModelStreamInfer`` relay (issue 19 item 1): the message relayed to Triton is built
from the validated request only. Whatever a codec might let through (a tensor's shared-memory region, a
field the gateway does not know), the relayed message carries inputs as raw tensors, the requested output
names, the model's parameters, the sequence controls and the tier's priority and timeout, nothing else.
The real-stack regression is tests/integration/test_grpc_stream_edge.py. The message is built by
``app.clients.triton.stream_request`` from the ``TritonCall`` (the streaming seam)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from tritonclient.grpc import service_pb2

from app.auth.principal import Principal
from app.clients.protocols import CallOptions
from app.clients.triton import stream_request
from app.request_context import RequestContext
from app.services.inference import InferenceService, InferRequest
from app.services.registry import ModelInfo


def test_relayed_message_is_rebuilt_from_the_validated_request(batched: ModelInfo) -> None:
    series = np.arange(20, dtype=np.float32).reshape(1, 20, 1)
    req = InferRequest(info=batched, inputs={"series": series}, outputs=["forecast"],
                       parameters={"tag": "a", "n": 3},
                       options=CallOptions(priority=1, timeout_us=999_000_000, sequence_id="s-1",
                                           sequence_start=True))  # fmt: skip
    key = Principal(key_id="k", tenant="t", tier="standard", priority=2, max_timeout_s=30.0)
    InferenceService.bind(req, RequestContext("client-id", "grpc_stream", key))  # what the core applies
    none = cast(Any, None)
    msg = stream_request(InferenceService(none, none, none, "test", 30.0).call_for(req))
    assert isinstance(msg, service_pb2.ModelInferRequest)
    assert (msg.model_name, msg.model_version, msg.id) == ("ts", "1", "client-id")
    [tensor] = msg.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("series", "FP32", [1, 20, 1])
    assert not tensor.parameters and not tensor.HasField("contents")  # no shared_memory_region, ever
    assert np.frombuffer(msg.raw_input_contents[0], np.float32).tolist() == series.ravel().tolist()
    assert [(o.name, len(o.parameters)) for o in msg.outputs] == [("forecast", 0)]
    params = {k: v.WhichOneof("parameter_choice") and getattr(v, v.WhichOneof("parameter_choice"))
              for k, v in msg.parameters.items()}  # fmt: skip
    assert params == {"tag": "a", "n": 3, "sequence_id": "s-1", "sequence_start": True, "sequence_end": False,
                      "priority": 2, "timeout": 30_000_000,  # the tier's, not the client's
                      "triton_enable_empty_final_response": True}  # fmt: skip
    set_fields = {field.name for field, _ in msg.ListFields()}
    assert set_fields == {"model_name", "model_version", "id", "inputs", "outputs", "parameters",
                          "raw_input_contents"}  # fmt: skip
