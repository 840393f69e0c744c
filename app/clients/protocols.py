"""The narrow interfaces services depend on; the gRPC and Redis clients implement them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class TritonResult:
    model_version: str
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]


class TritonClient(Protocol):
    async def server_live(self) -> bool: ...

    async def server_ready(self) -> bool: ...

    async def server_metadata(self) -> dict[str, Any]: ...

    async def repository_index(self) -> list[dict[str, Any]]: ...

    async def model_metadata(self, model: str, version: str = "") -> dict[str, Any]: ...

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]: ...

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        datatypes: Mapping[str, str],
        outputs: Sequence[str] | None,
        parameters: Mapping[str, Any] | None,
        request_id: str,
        timeout_s: float,
    ) -> TritonResult: ...

    async def close(self) -> None: ...


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: int) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
