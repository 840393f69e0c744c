"""``JobSpec``: every call option of a validated request survives the trip to the worker (issue 21: the
worker rebuilt the request from a hand-written spec that dropped sequence controls and classification)."""

from __future__ import annotations

import dataclasses

import numpy as np

from app.services.inference import InferRequest
from app.services.jobs.spec import JobSpec
from app.services.registry import ModelInfo

SKIP = {"info", "inputs", "datatypes", "request_id", "cache_read", "cache_write"}


def test_every_call_option_of_the_request_round_trips(batched: ModelInfo) -> None:
    series = np.arange(20, dtype=np.float32).reshape(1, 20, 1)
    req = InferRequest(info=batched, inputs={"series": series}, outputs=["forecast"],
                       parameters={"tag": "a", "n": 3}, priority=2, timeout_us=30_000_000, sequence_id="s-1",
                       sequence_start=True, sequence_end=True, cache_scope="tenant-a",
                       classification={"forecast": 3})  # fmt: skip
    back = JobSpec.from_record(JobSpec.of(req).to_record()).request(batched, req.inputs, "rid-1")
    carried = {f.name for f in dataclasses.fields(InferRequest)} - SKIP
    assert carried and all(getattr(back, name) == getattr(req, name) for name in carried), carried
    assert back.request_id == "rid-1" and back.inputs is req.inputs


def test_records_of_earlier_versions_are_read() -> None:
    old = b'{"outputs": null, "parameters": {"tag": "x"}, "priority": 1, "timeout_us": 5, "cache_scope": ""}'
    spec = JobSpec.from_record(old)
    assert (spec.outputs, spec.parameters, spec.priority, spec.timeout_us) == (None, {"tag": "x"}, 1, 5)
    assert (spec.sequence_id, spec.classification) == (0, {})
    assert JobSpec.from_record(b"{}") == JobSpec()
