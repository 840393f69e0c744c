"""The narrow interfaces services depend on, and the one call object that crosses the Triton boundary.

Two interfaces to Triton, so a reader sees which endpoint carries what:

* ``TritonAdmin`` (gRPC, ``app.clients.triton``): health, server and model metadata, model config,
  repository index, statistics. Low rate; read by the model registry, the health service and ``/v2``.
* ``InferenceTransport`` (``app.clients.triton_http`` over HTTP, or ``app.clients.triton`` over gRPC):
  ``infer(TritonCall) -> TritonResult``, the hot call; and ``stream(TritonCall)``, every response of one
  request as Triton sends it (a decoupled model answers any number of times; over gRPC
  ``ModelStreamInfer`` whatever carries ``infer``). Micro-batching (``app.services.batcher``) and shared
  memory (``app.clients.triton_shm``) are ``InferenceTransport``s wrapping another one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class TritonResult:
    model_version: str
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    final: bool = True  # a streamed response: the request's last (Triton's ``triton_final_response``)
    compute_s: float = 0.0  # Triton time the answer cost (usage metering; a micro-batched call's: its share)


@dataclass(slots=True, frozen=True)
class CallOptions:
    """What a request asks of Triton's scheduler rather than of the model, declared once: Triton's
    ``priority`` and ``timeout_us`` (0 = the model's default) and the sequence-batcher controls. Embedded
    as it is in the validated request (``InferRequest.options``), a job's spec and the Triton call."""

    priority: int = 0
    timeout_us: int = 0
    sequence_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False

    @property
    def sequence(self) -> bool:
        return bool(self.sequence_id)

    def fold_into(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with these options added, as the KServe/Triton protocols carry them."""
        if self.priority:
            params["priority"] = self.priority
        if self.timeout_us:
            params["timeout"] = self.timeout_us
        if self.sequence_id:
            params["sequence_id"] = self.sequence_id
            params["sequence_start"] = self.sequence_start
            params["sequence_end"] = self.sequence_end
        return params


NO_OPTIONS = CallOptions()


@dataclass(slots=True)
class TritonCall:
    """One inference as Triton receives it.

    ``parameters`` are the request parameters passed on verbatim (never the reserved ones of
    ``options``, Triton's scheduler options: priority, timeout, sequence controls). ``deadline`` is
    the ``time.monotonic()`` by which the gateway gives up; ``max_batch_rows`` > 0 lets the gateway's
    micro-batcher stack this call with others of the same model (0: never), decided once from the
    model's config. ``classification`` asks Triton's classification extension for the top-k classes of
    an output (it then answers that output as BYTES ``"value:index[:label]"``).
    """

    model: str
    version: str
    inputs: Mapping[str, np.ndarray]
    datatypes: Mapping[str, str]
    outputs: Sequence[str] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = ""
    deadline: float = 0.0
    options: CallOptions = NO_OPTIONS
    max_batch_rows: int = 0
    classification: Mapping[str, int] = field(default_factory=dict)  # output -> top-k (Triton's extension)
    queued_s: float = 0.0  # set by the micro-batcher: how long the call waited to be sent

    def remaining_s(self) -> float:
        """Seconds left before the deadline (at least 1 ms, so a late call still fails cleanly)."""
        return max(self.deadline - time.monotonic(), 0.001)

    @property
    def sequenced(self) -> bool:
        return self.options.sequence

    def triton_parameters(self) -> dict[str, Any]:
        """The request parameters with Triton's own options (priority, timeout, sequence) folded in, as
        the KServe/Triton HTTP protocol carries them."""
        return self.options.fold_into(dict(self.parameters))


class InferenceTransport(Protocol):
    async def infer(self, call: TritonCall) -> TritonResult: ...

    def stream(self, call: TritonCall) -> AsyncIterator[TritonResult]:
        """Every response of ``call`` as Triton sends it, the last one with ``final`` set (an empty one
        when the model ends the request without data). Closing the iterator early cancels the call in
        Triton."""
        ...

    async def live(self) -> bool:
        """The endpoint that carries inference answers (part of readiness)."""
        ...

    async def close(self) -> None: ...


class TritonAdmin(Protocol):
    async def server_live(self) -> bool: ...

    async def server_ready(self) -> bool: ...

    async def server_metadata(self) -> dict[str, Any]: ...

    async def repository_index(self) -> list[dict[str, Any]]: ...

    async def model_metadata(self, model: str, version: str = "") -> dict[str, Any]: ...

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]: ...

    async def model_statistics(self, model: str = "", version: str = "") -> dict[str, Any]: ...

    async def close(self) -> None: ...


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: int) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
