"""What a job keeps of its validated request besides the tensors: ``JobSpec``, written once at submit
(``to_record``) and read back by the worker (``from_record``) to rebuild the same ``InferRequest``. Every
call option an ``InferRequest`` carries travels (requested outputs, model parameters, Triton's
classification extension, the tier's priority and timeout, sequence controls, the tenant's cache scope):
none is silently dropped on the way to the worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson

from app.domain import InferRequest, ModelInfo


@dataclass(frozen=True, slots=True)
class JobSpec:
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    classification: dict[str, int] = field(default_factory=dict)
    priority: int = 0
    timeout_us: int = 0
    sequence_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False
    cache_scope: str = ""
    cache_read: bool = True  # the submission's Cache-Control (no-cache / no-store), for the worker's call
    cache_write: bool = True

    @classmethod
    def of(cls, req: InferRequest) -> JobSpec:
        return cls(
            outputs=req.outputs, parameters=dict(req.parameters), classification=dict(req.classification),
            priority=req.priority, timeout_us=req.timeout_us, sequence_id=req.sequence_id,
            sequence_start=req.sequence_start, sequence_end=req.sequence_end, cache_scope=req.cache_scope,
            cache_read=req.cache_read, cache_write=req.cache_write,
        )  # fmt: skip

    def to_record(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_record(cls, record: bytes) -> JobSpec:
        """Also reads the records of earlier versions (``outputs``, ``parameters``, ``priority``,
        ``timeout_us``, ``cache_scope``; the rest defaulted); unknown keys are ignored."""
        data = orjson.loads(record or b"{}")
        known = {name: data[name] for name in cls.__slots__ if name in data and data[name] is not None}
        return cls(**known)

    def request(self, info: ModelInfo, inputs: dict[str, np.ndarray], request_id: str) -> InferRequest:
        return InferRequest(
            info=info, inputs=inputs, outputs=self.outputs, parameters=dict(self.parameters),
            request_id=request_id, priority=self.priority, timeout_us=self.timeout_us,
            sequence_id=self.sequence_id, sequence_start=self.sequence_start, sequence_end=self.sequence_end,
            cache_scope=self.cache_scope, classification=dict(self.classification),
            cache_read=self.cache_read, cache_write=self.cache_write,
        )  # fmt: skip
