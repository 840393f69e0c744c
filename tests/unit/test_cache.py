from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.clients.protocols import TritonResult
from app.services.cache import (
    CacheUnavailable,
    ReadPolicy,
    ResponseCache,
    cache_key,
    decode_result,
    encode_result,
)

X = np.arange(6, dtype=np.float32).reshape(2, 3)


def key(**kw: object) -> str:
    args: dict[str, object] = {
        "namespace": "ns", "model": "m", "version": "1", "outputs": ["o"], "parameters": {},
        "inputs": {"x": X}, "datatypes": {"x": "FP32"},
    }  # fmt: skip
    args.update(kw)
    return cache_key(**args)  # type: ignore[arg-type]


def test_key_is_deterministic_and_prefixed() -> None:
    assert key() == key()
    assert key().startswith("ns:m:1:")


@pytest.mark.parametrize(
    "change",
    [
        {"namespace": "ns2"},
        {"model": "m2"},
        {"version": "2"},
        {"outputs": ["p"]},
        {"parameters": {"a": 1}},
        {"inputs": {"x": X.reshape(3, 2)}},
        {"inputs": {"x": X + 1}},
        {"inputs": {"y": X}, "datatypes": {"y": "FP32"}},
        {"inputs": {"x": X.astype(np.float64)}, "datatypes": {"x": "FP64"}},
    ],
)
def test_every_part_changes_the_key(change: dict[str, object]) -> None:
    assert key(**change) != key()


def test_order_does_not_change_the_key() -> None:
    two = {"a": X, "b": X + 1}
    dts = {"a": "FP32", "b": "FP32"}
    k1 = key(inputs=two, datatypes=dts, outputs=["o", "p"], parameters={"a": 1, "b": 2})
    k2 = key(
        inputs=dict(reversed(two.items())), datatypes=dts, outputs=["p", "o"], parameters={"b": 2, "a": 1}
    )
    assert k1 == k2


def test_non_contiguous_input_keys_like_its_copy() -> None:
    view = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    assert key(inputs={"x": view}) == key(inputs={"x": np.ascontiguousarray(view)})


def test_codec_round_trip() -> None:
    result = TritonResult(
        "3",
        {"a": X, "s": np.array([b"x", b"yz"], dtype=np.object_), "i": np.array([[1, -2]], dtype=np.int64)},
        {"a": "FP32", "s": "BYTES", "i": "INT64"},
    )
    back = decode_result(encode_result(result))
    assert back.model_version == "3" and back.datatypes == result.datatypes
    for name in result.outputs:
        assert np.array_equal(back.outputs[name], result.outputs[name])


class FlakyStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.broken = False

    async def get(self, key: str) -> bytes | None:
        if self.broken:
            raise ConnectionError("down")
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if self.broken:
            raise ConnectionError("down")
        self.data[key] = value

    async def ping(self) -> bool:
        return not self.broken

    async def close(self) -> None:
        return None


def test_response_cache_backs_off_after_a_failure() -> None:
    async def scenario() -> None:
        store = FlakyStore()
        cache = ResponseCache(store, ttl_s=10, max_value_bytes=1 << 20, backoff_s=60)
        result = TritonResult("1", {"a": X}, {"a": "FP32"})
        await cache.put("k", result)
        assert (await cache.get("k")) is not None
        store.broken = True
        with pytest.raises(CacheUnavailable):
            await cache.get("k")
        store.broken = False
        with pytest.raises(CacheUnavailable):  # still backing off: no call made
            await cache.get("k")
        assert await cache.probe()
        assert (await cache.get("k")) is not None

    asyncio.run(scenario())


def test_large_values_are_not_stored() -> None:
    async def scenario() -> None:
        store = FlakyStore()
        cache = ResponseCache(store, ttl_s=10, max_value_bytes=1024)
        await cache.put("k", TritonResult("1", {"a": np.zeros(1000, np.float32)}, {"a": "FP32"}))
        assert store.data == {}

    asyncio.run(scenario())


def test_read_policy_skips_redis_for_models_that_never_hit_and_recovers() -> None:
    policy = ReadPolicy(min_hit_ratio=0.01, window=64, probe_every=16)
    m = ("m", "1")
    keys = [f"tgw:m:1:{i:032x}" for i in range(4096)]
    # Learning: every lookup goes to Redis until half a window of lookups is seen.
    for key in keys[:32]:
        assert policy.should_read(m, key) and policy.should_write(m, key)
        policy.record(m, hit=False)
    # Never a hit: one key in 16 is still looked up and stored, chosen by the key's digest (every replica
    # samples the same keys: a sampled key is always stored and looked up, so its hits measure repeats).
    reads = [policy.should_read(m, key) for key in keys]
    assert sum(reads) == len(keys) // 16
    assert policy.should_read(("other", "1"), keys[1])  # per model
    # A small hot set of unsampled keys: each is looked up and stored from its second request on.
    hot = [key for key in keys[:64] if not policy.sampled(key)][:4]
    assert not any(policy.should_read(m, key) for key in hot)  # first seen (keys[:64] left the memory)
    assert all(policy.should_write(m, key) for key in hot)  # repeated: stored, looked up
    # Sampled lookups that hit bring every lookup and store back.
    for _ in range(3):
        policy.record(m, hit=True)
    assert all(policy.should_read(m, key) and policy.should_write(m, key) for key in keys[:20])
    # 0 turns it off.
    off = ReadPolicy(min_hit_ratio=0.0)
    for key in keys[:1000]:
        off.record(m, hit=False)
        assert off.should_read(m, key)
