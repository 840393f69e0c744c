"""What Triton serves: the repository index and per-version model metadata, cached briefly.

The index is re-read every ``ttl_s``; when it changes (a model loaded, unloaded or a new version)
every cached metadata entry is dropped, so the gateway follows the repository.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from app.clients.protocols import TritonAdmin
from app.domain import ModelInfo, TensorSpec
from app.errors import ModelNotFound

logger = logging.getLogger(__name__)


def _param(config: dict[str, Any], key: str) -> str | None:
    value = config.get("parameters", {}).get(key)
    return value.get("string_value") if isinstance(value, dict) else None


def _truthy(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def build_model_info(
    metadata: dict[str, Any], config: dict[str, Any], versions: tuple[str, ...], excluded: bool
) -> ModelInfo:
    """Combine Triton's model metadata (shapes with the batch dim) and config (batching, options).

    Model-config parameters understood by the gateway: ``tgw_cache`` ("false" opts the model out of
    the response cache) and ``tgw_allow_nonfinite`` ("true" lets NaN/inf through validation).
    """
    optional = {t["name"] for t in config.get("input", []) if t.get("optional")}

    def specs(items: list[dict[str, Any]], opt: set[str]) -> dict[str, TensorSpec]:
        return {
            t["name"]: TensorSpec(
                t["name"], t["datatype"], tuple(int(d) for d in t.get("shape", [])), t["name"] in opt
            )
            for t in items
        }

    version = str(metadata.get("versions", [""])[-1]) if metadata.get("versions") else ""
    max_batch_size = int(config.get("max_batch_size", 0))
    return ModelInfo(
        name=metadata["name"],
        version=version,
        versions=versions,
        platform=metadata.get("platform", "") or config.get("backend", ""),
        max_batch_size=max_batch_size,
        inputs=specs(metadata.get("inputs", []), optional),
        outputs=specs(metadata.get("outputs", []), set()),
        cache_enabled=not excluded and _truthy(_param(config, "tgw_cache"), True),
        allow_nonfinite=_truthy(_param(config, "tgw_allow_nonfinite"), False),
        max_batch_rows=max_batch_size if batchable(max_batch_size, config) else 0,
        metadata=metadata,
        config=config,
    )


def batchable(max_batch_size: int, config: dict[str, Any]) -> bool:
    """Requests to this model may be stacked along the batch dimension by the gateway: Triton itself
    would batch them (``dynamic_batching``, ``max_batch_size`` > 1) and it is not a sequence model."""
    return max_batch_size > 1 and "dynamic_batching" in config and "sequence_batching" not in config


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (-1, v)


class ModelRegistry:
    def __init__(self, triton: TritonAdmin, ttl_s: float, cache_exclude: list[str] | None = None) -> None:
        self._triton = triton
        self._ttl_s = ttl_s
        self._exclude = set(cache_exclude or [])
        self._index: list[dict[str, Any]] = []
        self._index_at = float("-inf")
        self._index_lock = asyncio.Lock()
        self._models: dict[tuple[str, str], ModelInfo] = {}
        self._model_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._ready: dict[str, tuple[str, ...]] = {}  # per index snapshot: model -> ready versions

    def invalidate(self) -> None:
        self._index_at = float("-inf")
        self._models.clear()

    async def index(self) -> list[dict[str, Any]]:
        if time.monotonic() - self._index_at < self._ttl_s:
            return self._index
        async with self._index_lock:
            if time.monotonic() - self._index_at < self._ttl_s:
                return self._index
            fresh = await self._triton.repository_index()
            if fresh != self._index:
                if self._index:
                    logger.info("model repository changed; dropping cached metadata")
                self._models.clear()
                self._index = fresh
                self._ready = {}
            self._index_at = time.monotonic()
            return self._index

    async def ready_versions(self, model: str) -> tuple[str, ...]:
        index = await self.index()
        known = self._ready.get(model)
        if known is not None:
            return known
        entries = [e for e in index if e.get("name") == model]
        if not entries:
            raise ModelNotFound(f"model '{model}' is not in the repository", {"model": model})
        ready = [str(e.get("version", "")) for e in entries if e.get("state") == "READY"]
        known = self._ready[model] = tuple(sorted(ready, key=_version_key))
        return known

    async def resolve(self, model: str, version: str | None = None) -> ModelInfo:
        """The metadata of the version that will serve the request: the given one, else the latest."""
        versions = await self.ready_versions(model)
        if version:
            if version not in versions:
                raise ModelNotFound(
                    f"model '{model}' has no ready version '{version}'",
                    {"model": model, "version": version, "ready_versions": list(versions)},
                )
            chosen = version
        elif versions:
            chosen = versions[-1]
        else:
            raise ModelNotFound(f"model '{model}' has no ready version", {"model": model})
        key = (model, chosen)
        info = self._models.get(key)
        if info is not None:
            return info
        lock = self._model_locks.setdefault(key, asyncio.Lock())
        async with lock:
            info = self._models.get(key)
            if info is None:
                metadata = await self._triton.model_metadata(model, chosen)
                config = await self._triton.model_config(model, chosen)
                info = build_model_info(metadata, config, versions, model in self._exclude)
                info = _with_version(info, chosen)
                self._models[key] = info
            return info

    async def list_models(self) -> list[dict[str, Any]]:
        return summarize_index(await self.index())


def summarize_index(index: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Repository index entries (one per model version) -> one item per model with its versions."""
    out: dict[str, dict[str, Any]] = {}
    for entry in index:
        name = entry.get("name", "")
        item = out.setdefault(name, {"name": name, "state": "UNAVAILABLE", "versions": {}})
        state = entry.get("state", "UNKNOWN")
        if entry.get("version"):
            item["versions"][str(entry["version"])] = {"state": state, "reason": entry.get("reason", "")}
        if state == "READY":
            item["state"] = "READY"
        elif item["state"] != "READY":
            item["state"] = state
            if entry.get("reason"):
                item["reason"] = entry["reason"]
    return [out[k] for k in sorted(out)]


def _with_version(info: ModelInfo, version: str) -> ModelInfo:
    return info if info.version == version else replace(info, version=version)
