"""``JobSpec``: every call option of a validated request survives the trip to the worker (issue 21: the
worker rebuilt the request from a hand-written spec that dropped sequence controls and classification)."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson

from app.domain import CallOptions, JobSpec
from app.services.inference import InferRequest
from app.services.registry import ModelInfo

SKIP = {"info", "inputs", "datatypes", "request_id"}


def test_every_call_option_of_the_request_round_trips(batched: ModelInfo) -> None:
    series = np.arange(20, dtype=np.float32).reshape(1, 20, 1)
    req = InferRequest(info=batched, inputs={"series": series}, outputs=["forecast"],
                       parameters={"tag": "a", "n": 3},
                       options=CallOptions(priority=2, timeout_us=30_000_000, sequence_id="s-1",
                                           sequence_start=True, sequence_end=True),
                       cache_scope="tenant-a", classification={"forecast": 3}, cache_write=False)  # fmt: skip
    back = JobSpec.from_record(JobSpec.of(req).to_record()).request(batched, req.inputs, "rid-1")
    carried = {f.name for f in dataclasses.fields(InferRequest)} - SKIP
    assert carried and all(getattr(back, name) == getattr(req, name) for name in carried), carried
    assert back.request_id == "rid-1" and back.inputs is req.inputs


def test_records_of_earlier_versions_are_read() -> None:
    old = b'{"outputs": null, "parameters": {"tag": "x"}, "priority": 1, "timeout_us": 5, "cache_scope": ""}'
    spec = JobSpec.from_record(old)
    assert (spec.outputs, spec.parameters, spec.options) == (
        None,
        {"tag": "x"},
        CallOptions(priority=1, timeout_us=5),
    )
    assert (spec.options.sequence_id, spec.classification, spec.cache_read) == (0, {}, True)
    assert JobSpec.from_record(b"{}") == JobSpec()


def test_the_record_keeps_the_options_flat() -> None:
    """Workers of the previous version read the options' keys at the top of the record."""
    record = JobSpec(options=CallOptions(priority=3, sequence_id=7, sequence_end=True)).to_record()
    data = orjson.loads(record)
    assert (data["priority"], data["sequence_id"], data["sequence_end"]) == (
        3,
        7,
        True,
    ) and "options" not in data
