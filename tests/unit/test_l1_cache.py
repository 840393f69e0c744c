"""The in-process L1 in front of Redis: bounded in entries and bytes, never past the Redis TTL."""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.clients.protocols import TritonResult
from app.services.cache import L1Cache, ResponseCache


def _result(n: int = 4) -> TritonResult:
    return TritonResult("1", {"Y": np.arange(n, dtype=np.float32)}, {"Y": "FP32"})


def test_bounded_in_entries_lru() -> None:
    l1 = L1Cache(max_entries=2, max_bytes=1 << 20, max_ttl_s=60)
    l1.put("a", _result(), 10)
    l1.put("b", _result(), 10)
    assert l1.get("a") is not None  # a is now the most recent
    l1.put("c", _result(), 10)
    assert l1.get("b") is None and l1.get("a") is not None and l1.get("c") is not None
    assert len(l1) == 2


def test_bounded_in_bytes() -> None:
    l1 = L1Cache(max_entries=1000, max_bytes=4 * 1024, max_ttl_s=60)
    for i in range(20):
        l1.put(f"k{i}", _result(64), 10)  # ~256 B of data + overhead each
    assert l1.bytes <= 4 * 1024 and 0 < len(l1) < 20
    l1.put("huge", _result(100_000), 10)  # larger than a quarter of the budget: not kept
    assert l1.get("huge") is None


def test_expires_with_the_redis_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    l1 = L1Cache(max_entries=10, max_bytes=1 << 20, max_ttl_s=60)
    l1.put("a", _result(), 5)  # 5 s left in Redis
    l1.put("b", _result(), 3600)  # capped at max_ttl_s
    now[0] += 4.9
    assert l1.get("a") is not None
    now[0] += 0.2
    assert l1.get("a") is None and l1.get("b") is not None
    now[0] += 60
    assert l1.get("b") is None and l1.bytes == 0


class Store:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.gets = 0

    async def get(self, key: str) -> bytes | None:
        self.gets += 1
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self.data[key] = value

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def test_response_cache_serves_hot_keys_from_l1() -> None:
    store = Store()
    cache = ResponseCache(store, ttl_s=60, max_value_bytes=1 << 20, l1_entries=10)
    await cache.put("k", _result())
    got = await cache.get("k")
    assert got is not None and store.gets == 0  # filled on put
    np.testing.assert_array_equal(got.outputs["Y"], _result().outputs["Y"])
    other = ResponseCache(store, ttl_s=60, max_value_bytes=1 << 20, l1_entries=10)  # another worker
    assert await other.get("k") is not None and store.gets == 1
    assert await other.get("k") is not None and store.gets == 1  # filled from the Redis hit


async def test_l1_is_off_by_default() -> None:
    store = Store()
    cache = ResponseCache(store, ttl_s=60, max_value_bytes=1 << 20)
    await cache.put("k", _result())
    await cache.get("k")
    await cache.get("k")
    assert cache.l1 is None and store.gets == 2


async def test_l1_filled_from_a_redis_hit_lasts_only_as_long_as_the_writers_ttl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wall, mono = [1_000_000.0], [50.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    store = Store()
    writer = ResponseCache(store, ttl_s=20, max_value_bytes=1 << 20)
    await writer.put("k", _result())  # expires at wall + 20 in Redis
    wall[0] += 15
    mono[0] += 15
    reader = ResponseCache(store, ttl_s=20, max_value_bytes=1 << 20, l1_entries=10)
    assert await reader.get("k") is not None and store.gets == 1
    assert reader.l1 is not None and reader.l1.get("k") is not None  # 5 s left
    mono[0] += 5.1
    assert reader.l1.get("k") is None  # gone with the Redis entry, not 20 s after the read


async def test_values_without_an_expiry_are_served_but_not_kept_in_l1() -> None:
    from app.services.cache import _LEN

    header = b'{"v":"1","o":[["Y","FP32",[2],8]]}'
    legacy = _LEN.pack(len(header)) + header + np.arange(2, dtype=np.float32).tobytes()
    store = Store()
    store.data["k"] = legacy
    cache = ResponseCache(store, ttl_s=60, max_value_bytes=1 << 20, l1_entries=10)
    got = await cache.get("k")
    assert got is not None and got.outputs["Y"].tolist() == [0.0, 1.0]
    assert cache.l1 is not None and len(cache.l1) == 0
