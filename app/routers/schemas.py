"""Response shapes for the OpenAPI document (clients generate code from it). The handlers return
``ORJSONResponse`` directly, so these models document the answers and are never used to validate or
serialize them at run time (no cost on the request path)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(description="ready, degraded (Redis down, still serving) or not_ready")
    checks: dict[str, dict[str, Any]] = Field(description="triton, models, redis: each with its status")


class Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    optional: bool | None = None


class Model(BaseModel):
    name: str
    version: str
    versions: list[str]
    state: str
    platform: str
    max_batch_size: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    cache_enabled: bool


class VersionState(BaseModel):
    state: str
    reason: str = ""


class ModelEntry(BaseModel):
    """One model of the repository; a READY one also carries its latest version's metadata."""

    name: str
    state: str
    versions: dict[str, VersionState]
    reason: str | None = None
    version: str | None = None
    platform: str | None = None
    max_batch_size: int | None = None
    inputs: list[Tensor] | None = None
    outputs: list[Tensor] | None = None
    cache_enabled: bool | None = None


class ModelList(BaseModel):
    models: list[ModelEntry]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]


class V2IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool
