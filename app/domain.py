"""The domain types every layer shares, in one module below the codecs and the services: what Triton
serves (``ModelInfo``, ``TensorSpec``), one validated request (``InferRequest``, with the scheduler's
``CallOptions``) and its answer (``InferResponse``). Built by ``app.services.registry`` (model metadata),
the codecs (``app.codecs``: wire format -> request, answer -> wire format) and the services.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from app.clients.protocols import TritonResult


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

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @property
    def decoupled(self) -> bool:
        """A decoupled model may send any number of responses per request: only a stream can carry them."""
        policy = self.config.get("model_transaction_policy") or {}
        return bool(policy.get("decoupled"))

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
    priority: int = 0
    timeout_us: int = 0
    sequence_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False
    cache_scope: str = ""  # "" = answers shared by every tenant; else the tenant (app.auth, TGW_CACHE_SCOPE)
    classification: dict[str, int] = field(default_factory=dict)  # output -> top-k (Triton's extension)
    datatypes: dict[str, str] = field(init=False)  # Triton datatype of each given input

    def __post_init__(self) -> None:
        self.datatypes = {name: self.info.inputs[name].datatype for name in self.inputs}

    @property
    def cacheable(self) -> bool:
        """Sequence requests carry state in Triton: never answered from (or filed in) the cache."""
        return not self.sequence_id


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


@dataclass(slots=True, frozen=True)
class CallOptions:
    """What a request asks of Triton's scheduler rather than of the model."""

    priority: int = 0
    timeout_us: int = 0
    sequence_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False

    @property
    def sequence(self) -> bool:
        return bool(self.sequence_id)

    def apply(self, req: InferRequest) -> InferRequest:
        """Set these options on a decoded request (both KServe codecs, HTTP and gRPC)."""
        req.priority, req.timeout_us = self.priority, self.timeout_us
        req.sequence_id, req.sequence_start, req.sequence_end = (
            self.sequence_id, self.sequence_start, self.sequence_end,
        )  # fmt: skip
        return req


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
