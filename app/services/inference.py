"""The inference service: resolve the model, validate, answer from the cache, else forward (single-flight).

Used by the /v1 and /v2 routers and by the async job workers alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from app.clients.protocols import TritonClient, TritonResult
from app.errors import GatewayError, InvalidInput, UpstreamTimeout
from app.observability import metrics, tracing
from app.observability.context import annotate
from app.services.cache import CacheUnavailable, ResponseCache, cache_key
from app.services.registry import ModelInfo, ModelRegistry
from app.services.singleflight import SingleFlight
from app.services.validation import validate_outputs, validate_parameters, validate_v1_inputs

logger = logging.getLogger(__name__)

CacheOutcome = Literal["HIT", "MISS", "BYPASS"]


@dataclass(slots=True)
class InferRequest:
    info: ModelInfo
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    cache_read: bool = True
    cache_write: bool = True
    datatypes: dict[str, str] = field(init=False)  # Triton datatype of each given input

    def __post_init__(self) -> None:
        self.datatypes = {name: self.info.inputs[name].datatype for name in self.inputs}


@dataclass(slots=True)
class InferResponse:
    model: str
    result: TritonResult
    cache: CacheOutcome

    def to_v1(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_version": self.result.model_version,
            "outputs": {name: jsonable(arr) for name, arr in self.result.outputs.items()},
        }


def jsonable(arr: np.ndarray) -> Any:
    """orjson serialises numeric numpy arrays natively; BYTES become strings."""
    if arr.dtype == np.object_:
        return np.vectorize(
            lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object]
        )(arr).tolist()
    return arr


def cache_directives(header: str | None) -> tuple[bool, bool]:
    """``Cache-Control: no-cache`` skips the read, ``no-store`` the write. Returns (read, write)."""
    if not header:
        return True, True
    tokens = {t.strip().split("=", 1)[0].lower() for t in header.split(",")}
    return "no-cache" not in tokens, "no-store" not in tokens


class InferenceService:
    def __init__(
        self,
        triton: TritonClient,
        registry: ModelRegistry,
        cache: ResponseCache,
        namespace: str,
        timeout_s: float,
    ) -> None:
        self.triton = triton
        self.registry = registry
        self.cache = cache
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.flights: SingleFlight[TritonResult] = SingleFlight(metrics.SINGLEFLIGHT_WAITERS)
        self._writes: set[asyncio.Task[None]] = set()

    async def prepare_v1(self, model: str, version: str | None, body: Any) -> InferRequest:
        """Validate a /v1 body ``{"inputs": {...}, "outputs"?: [...], "parameters"?: {...}}``."""
        if not isinstance(body, dict):
            raise InvalidInput("body: expected a JSON object with an 'inputs' object", {"field": "body"})
        info = await self.registry.resolve(model, version)
        unknown = set(body) - {"inputs", "outputs", "parameters"}
        if unknown:
            field_name = sorted(unknown)[0]
            raise InvalidInput(
                f"{field_name}: unknown field; expected inputs, outputs, parameters", {"field": field_name}
            )
        return InferRequest(
            info=info,
            inputs=validate_v1_inputs(info, body.get("inputs")),
            outputs=validate_outputs(info, body.get("outputs")),
            parameters=validate_parameters(body.get("parameters")),
        )

    def key_for(self, req: InferRequest) -> str:
        info = req.info
        outputs = req.outputs or list(info.outputs)
        return cache_key(
            self.namespace, info.name, info.version, outputs, req.parameters, req.inputs, req.datatypes
        )

    async def cached(self, req: InferRequest) -> InferResponse | None:
        """The cached answer, if the cache holds one and the request may read it (the job path asks
        here instead of repeating the cache rules); None on a miss, a bypass or an unavailable cache."""
        if not (req.info.cache_enabled and self.cache.enabled and req.cache_read):
            return None
        try:
            hit = await self._cache_get(self.key_for(req))
        except CacheUnavailable:
            return None
        return InferResponse(req.info.name, hit, "HIT") if hit is not None else None

    async def infer(self, req: InferRequest, request_id: str = "") -> InferResponse:
        info = req.info
        key = self.key_for(req)
        use_cache = info.cache_enabled and self.cache.enabled
        outcome: CacheOutcome = "BYPASS"
        if use_cache and req.cache_read:
            try:
                hit = await self._cache_get(key)
            except CacheUnavailable:
                use_cache = False
                metrics.cache_outcome("error")
            else:
                if hit is not None:
                    metrics.cache_outcome("hit")
                    annotate(info.name, info.version, "HIT")
                    return InferResponse(info.name, hit, "HIT")
                outcome = "MISS"
                metrics.cache_outcome("miss")
        else:
            metrics.cache_outcome("bypass")
        annotate(info.name, info.version, outcome)
        write = use_cache and req.cache_write

        async def forward() -> TritonResult:
            result = await self._forward(req, request_id)
            if write:  # write-behind: the answer does not wait for Redis to acknowledge
                task = asyncio.create_task(self._store(key, req, result))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
            return result

        result, shared = await self.flights.do(key, forward)
        if shared:
            metrics.SINGLEFLIGHT_SHARED.inc()
        return InferResponse(info.name, result, outcome)

    async def _cache_get(self, key: str) -> TritonResult | None:
        start = time.perf_counter()
        try:
            with tracing.span("cache.get"):
                return await self.cache.get(key)
        finally:
            metrics.cache_operation("get", time.perf_counter() - start)

    async def _forward(self, req: InferRequest, request_id: str) -> TritonResult:
        info = req.info
        start = time.perf_counter()
        status = "ok"
        try:
            with tracing.span("triton.infer", {"tgw.model": info.name, "tgw.model_version": info.version}):
                async with asyncio.timeout(self.timeout_s + 1.0):
                    result = await self.triton.infer(
                        info.name, info.version, req.inputs, req.datatypes, req.outputs, req.parameters,
                        request_id, self.timeout_s,
                    )  # fmt: skip
        except TimeoutError:
            status = UpstreamTimeout.code
            raise UpstreamTimeout("Triton did not answer before the deadline") from None
        except GatewayError as exc:
            status = exc.code
            raise
        except BaseException:
            status = "error"
            raise
        finally:
            metrics.triton_request(info.name, info.version, status, time.perf_counter() - start)
        if result.model_version and result.model_version != info.version:
            logger.info("model %s answered from version %s, expected %s; refreshing metadata",
                        info.name, result.model_version, info.version)  # fmt: skip
            self.registry.invalidate()
        return result

    async def drain_writes(self, timeout_s: float) -> None:
        """Let cache writes under way land (shutdown), for at most ``timeout_s``."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout_s)

    async def _store(self, key: str, req: InferRequest, result: TritonResult) -> None:
        if result.model_version and result.model_version != req.info.version:
            return  # never file an answer under another version's key
        start = time.perf_counter()
        try:
            with tracing.span("cache.put"):
                await self.cache.put(key, result)
        except CacheUnavailable:
            pass
        finally:
            metrics.cache_operation("put", time.perf_counter() - start)
