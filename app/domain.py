"""The domain types every layer shares, in one module below the codecs and the services: what Triton
serves (``ModelInfo``, ``TensorSpec``), one validated request (``InferRequest``, with the scheduler's
``CallOptions``, declared once in ``app.clients.protocols`` and embedded as they are in the Triton call),
its answer (``InferResponse``) and what a job keeps of it (``JobSpec``). Built by
``app.services.registry`` (model metadata), the codecs (wire format -> request, answer -> wire format)
and the services.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import orjson

from app.clients.protocols import NO_OPTIONS, CallOptions, TritonResult

__all__ = [
    "CacheOutcome",
    "CallOptions",
    "InferRequest",
    "InferResponse",
    "JobSpec",
    "ModelInfo",
    "TensorSpec",
    "json_values",
    "jsonable",
    "tensor_json_values",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # full shape as the client sends it: batch dim first (-1) when batched
    optional: bool = False

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if self.optional:
            out["optional"] = True
        return out


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    versions: tuple[str, ...]
    platform: str
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    cache_enabled: bool = True
    allow_nonfinite: bool = False
    max_batch_rows: int = 0  # > 0: the gateway may micro-batch up to this many rows (see batchable)
    max_values: int | None = field(init=False, default=None)  # most values one request can carry
    # A decoupled model may send any number of responses per request: only a stream can carry them.
    decoupled: bool = field(init=False, default=False)
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # max_batch_size x the dims of every input (None when a dim is variable), computed once: the
        # value budget checked on a request body before it is parsed (app.services.payload).
        total: int | None = 0
        for spec in self.inputs.values():
            dims = spec.shape[1:] if self.max_batch_size > 0 else spec.shape
            if any(d < 0 for d in dims):
                total = None
                break
            total = (total or 0) + max(self.max_batch_size, 1) * math.prod(dims)
        object.__setattr__(self, "max_values", total)
        policy = self.config.get("model_transaction_policy") or {}
        object.__setattr__(self, "decoupled", bool(policy.get("decoupled")))

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def kserve_metadata(self, all_versions: bool = True) -> dict[str, Any]:
        """KServe v2 model metadata (HTTP ``/v2/models/{m}`` and gRPC ``ModelMetadata``) as Triton gives it:
        ``versions`` lists every ready version when no version was asked for, else the one asked for."""

        def tensors(key: str) -> list[dict[str, Any]]:
            items = self.metadata.get(key, [])
            return [{**t, "shape": [int(d) for d in t.get("shape", [])]} for t in items]

        return {
            "name": self.name,
            "versions": list(self.versions) if all_versions and self.versions else [self.version],
            "platform": self.metadata.get("platform", ""),
            "inputs": tensors("inputs"),
            "outputs": tensors("outputs"),
        }

    def public(self, state: str = "READY") -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "versions": list(self.versions),
            "state": state,
            "platform": self.platform,
            "max_batch_size": self.max_batch_size,
            "inputs": [t.public() for t in self.inputs.values()],
            "outputs": [t.public() for t in self.outputs.values()],
            "cache_enabled": self.cache_enabled,
        }


CacheOutcome = Literal["HIT", "MISS", "BYPASS"]


@dataclass(slots=True)
class InferRequest:
    """A validated inference request (what every codec decodes to)."""

    info: ModelInfo
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    cache_read: bool = True
    cache_write: bool = True
    request_id: str = ""
    options: CallOptions = NO_OPTIONS  # what the request asks of Triton's scheduler (priority, sequence, ...)
    cache_scope: str = ""  # "" = answers shared by every tenant; else the tenant (app.auth, TGW_CACHE_SCOPE)
    classification: dict[str, int] = field(default_factory=dict)  # output -> top-k (Triton's extension)
    datatypes: dict[str, str] = field(init=False)  # Triton datatype of each given input

    def __post_init__(self) -> None:
        self.datatypes = {name: self.info.inputs[name].datatype for name in self.inputs}

    @property
    def cacheable(self) -> bool:
        """Sequence requests carry state in Triton: never answered from (or filed in) the cache."""
        return not self.options.sequence


@dataclass(slots=True)
class InferResponse:
    model: str
    result: TritonResult
    cache: CacheOutcome

    def public(self) -> dict[str, Any]:
        """The answer as the gateway's own JSON API gives it (``/v1``; also a job's result and a
        ``/v1/ws`` result frame), JSON-able: numeric outputs stay numpy arrays (orjson writes them), BYTES
        become text."""
        out = self.result
        return {
            "model": self.model,
            "model_version": out.model_version,
            "outputs": {name: jsonable(arr) for name, arr in out.outputs.items()},
        }


_OPTION_NAMES = tuple(f.name for f in fields(CallOptions))


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a job keeps of its validated request besides the tensors, written once at submit
    (``to_record``) and read back by the worker (``from_record``) to rebuild the same ``InferRequest``:
    requested outputs, model parameters, Triton's classification extension, the call options (the tier's
    priority and timeout, sequence controls), the tenant's cache scope and the submission's cache
    directives; none is silently dropped on the way to the worker. The record keeps the options' keys
    flat (as records of earlier versions have them, so workers of either version read both)."""

    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    classification: dict[str, int] = field(default_factory=dict)
    options: CallOptions = NO_OPTIONS
    cache_scope: str = ""
    cache_read: bool = True  # the submission's Cache-Control (no-cache / no-store), for the worker's call
    cache_write: bool = True
    key_id: str = ""  # the submitting key's public id: the attempts are metered under it (usage)

    @classmethod
    def of(cls, req: InferRequest) -> JobSpec:
        return cls(
            outputs=req.outputs, parameters=dict(req.parameters), classification=dict(req.classification),
            options=req.options, cache_scope=req.cache_scope, cache_read=req.cache_read,
            cache_write=req.cache_write,
        )  # fmt: skip

    def to_record(self) -> bytes:
        data = {name: getattr(self, name) for name in self.__slots__ if name != "options"}
        return orjson.dumps({**data, **asdict(self.options)})

    @classmethod
    def from_record(cls, record: bytes) -> JobSpec:
        """Also reads the records of earlier versions (``outputs``, ``parameters``, ``priority``,
        ``timeout_us``, ``cache_scope``; the rest defaulted); unknown keys are ignored."""
        data = orjson.loads(record or b"{}")
        given = {name: value for name, value in data.items() if value is not None}
        options = CallOptions(**{name: given[name] for name in _OPTION_NAMES if name in given})
        known = {name: given[name] for name in cls.__slots__ if name in given and name != "options"}
        return cls(**known, options=options)

    def request(self, info: ModelInfo, inputs: dict[str, np.ndarray], request_id: str) -> InferRequest:
        return InferRequest(
            info=info, inputs=inputs, outputs=self.outputs, parameters=dict(self.parameters),
            request_id=request_id, options=self.options, cache_scope=self.cache_scope,
            classification=dict(self.classification), cache_read=self.cache_read,
            cache_write=self.cache_write,
        )  # fmt: skip


def jsonable(arr: np.ndarray) -> Any:
    """orjson serialises numeric numpy arrays natively; BYTES become strings."""
    if arr.dtype == np.object_:
        return np.vectorize(
            lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object]
        )(arr).tolist()
    return arr


# What writing one JSON value of a BYTES tensor costs, in numeric values (numpy's per-item str conversion).
_OBJECT_VALUE_COST = 10


def json_values(outputs: Mapping[str, np.ndarray]) -> int:
    """The work of writing these tensors as JSON, in numeric values (``Offload.encode`` decides on it)."""
    total = 0
    for arr in outputs.values():  # a plain loop: ~0.15 µs for one small output (a generator: ~0.4)
        total += tensor_json_values(arr)
    return total


def tensor_json_values(arr: np.ndarray) -> int:
    return arr.size * _OBJECT_VALUE_COST if arr.dtype.kind == "O" else arr.size
