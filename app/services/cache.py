"""The response cache: canonical keys, a compact value codec, and Redis access that never fails a request.

Key = namespace : model : served version : blake2b(outputs, parameters, and every input's name, datatype,
shape and little-endian bytes). Bumping ``TGW_CACHE_NAMESPACE`` (or the format version in it) orphans
every old entry at once; a new model version is a new key, so it never sees an old version's answer.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import orjson

from app.clients.protocols import CacheStore, TritonResult
from app.clients.tensors import tensor_buffer, tensor_bytes, tensor_from_bytes

logger = logging.getLogger(__name__)


def cache_key(
    namespace: str,
    model: str,
    version: str,
    outputs: Sequence[str],
    parameters: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
    datatypes: Mapping[str, str],
) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(orjson.dumps([sorted(outputs), parameters], option=orjson.OPT_SORT_KEYS))
    for name in sorted(inputs):
        arr = inputs[name]
        data = _key_bytes(arr)
        h.update(orjson.dumps([name, datatypes[name], list(arr.shape), data.nbytes]))
        h.update(data)
    return f"{namespace}:{model}:{version}:{h.hexdigest()}"


def _key_bytes(arr: np.ndarray) -> memoryview:
    """The tensor's bytes exactly as ``tensor_bytes`` gives them (without a copy where it can: 16 MB took
    ~15 ms to copy)."""
    return memoryview(tensor_buffer(arr))


# Value: 4-byte header length, JSON header {"v": version, "x": expiry (Unix seconds), "o": [[name,
# datatype, shape, nbytes]...]}, then the output tensors' bytes back to back. "x" is when the writer's
# Redis TTL ends (taken just before the SET, so never later than Redis's own expiry, up to clock skew
# between replicas): a reader fills its L1 from it without asking Redis for the PTTL.
_LEN = struct.Struct("<I")


def encode_result(result: TritonResult, expires_at: float = 0.0) -> bytes:
    blobs = [tensor_bytes(result.outputs[name]) for name in result.outputs]
    header = orjson.dumps(
        {
            "v": result.model_version,
            "x": round(expires_at, 3),
            "c": round(result.compute_s, 6),  # what the answer cost in Triton (usage: saved compute)
            "o": [
                [name, result.datatypes[name], list(arr.shape), len(blob)]
                for (name, arr), blob in zip(result.outputs.items(), blobs, strict=True)
            ],
        }
    )
    return b"".join([_LEN.pack(len(header)), header, *blobs])


# A cached stream: b"TGWS", a 4-byte count, then per response its final flag (1 byte), a 4-byte length and
# ``encode_result``'s bytes.
_STREAM_MAGIC = b"TGWS"
_PART = struct.Struct("<BI")


def encode_stream(results: Sequence[TritonResult]) -> bytes:
    parts = [_STREAM_MAGIC, _LEN.pack(len(results))]
    for result in results:
        blob = encode_result(result)
        parts += [_PART.pack(int(result.final), len(blob)), blob]
    return b"".join(parts)


def decode_stream(value: bytes) -> list[TritonResult]:
    if value[:4] != _STREAM_MAGIC:
        raise ValueError("not a cached stream")
    (count,) = _LEN.unpack_from(value, 4)
    offset, results = 8, []
    for _ in range(count):
        final, size = _PART.unpack_from(value, offset)
        offset += _PART.size
        result = decode_result(value[offset : offset + size])
        results.append(replace(result, final=bool(final)))
        offset += size
    return results


def decode_result(value: bytes) -> TritonResult:
    return decode_entry(value)[0]


def decode_entry(value: bytes) -> tuple[TritonResult, float]:
    """The answer and the Unix time its Redis entry expires (0 when the value does not say)."""
    (hlen,) = _LEN.unpack_from(value, 0)
    header = orjson.loads(value[4 : 4 + hlen])
    offset = 4 + hlen
    outputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for name, datatype, shape, nbytes in header["o"]:
        blob = value[offset : offset + nbytes]
        offset += nbytes
        outputs[name] = tensor_from_bytes(blob, datatype, shape)
        datatypes[name] = datatype
    compute = float(header.get("c", 0.0))  # an entry written before usage metering: 0
    return TritonResult(header["v"], outputs, datatypes, compute_s=compute), float(header.get("x", 0.0))


class CacheUnavailable(Exception):
    """Redis failed or was too slow; the caller serves from Triton and reports BYPASS."""


class L1Cache:
    """In-process LRU of decoded answers in front of Redis, bounded in entries and in bytes.

    An entry never outlives the Redis entry it mirrors: it is filled after a successful Redis ``SET`` (with
    the same TTL) or from a Redis hit with the time left until the expiry written in the value, and it is
    capped at ``max_ttl_s`` so that a Redis flushed by hand is followed within that bound.
    """

    _OVERHEAD = 256  # bytes of Python objects per entry, roughly

    def __init__(self, max_entries: int, max_bytes: int, max_ttl_s: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl_s = max_ttl_s
        self._items: OrderedDict[str, tuple[TritonResult, float, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> TritonResult | None:
        item = self._items.get(key)
        if item is None:
            return None
        if time.monotonic() >= item[1]:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: str, result: TritonResult, ttl_s: float) -> None:
        ttl_s = min(ttl_s, self.max_ttl_s)
        size = len(key) + self._OVERHEAD + sum(a.nbytes for a in result.outputs.values())
        if ttl_s <= 0 or size > self.max_bytes // 4:
            return
        for arr in result.outputs.values():
            arr.setflags(write=False)  # shared by every request that hits it
        self._drop(key)
        self._items[key] = (result, time.monotonic() + ttl_s, size)
        self.bytes += size
        while self._items and (len(self._items) > self.max_entries or self.bytes > self.max_bytes):
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[2]


class ReadPolicy:
    """Whether a request's answer should be looked up in Redis and stored there, per model version: learned
    from the lookups themselves.

    A model whose answers are never asked for twice (unique inputs: a feature extractor, a forecaster fed
    live data) pays a Redis round trip on every request for nothing, and a Redis ``SET`` of an answer
    nobody reads again (on this box the two were the largest part of the gateway's CPU per cache miss).
    When the hit ratio of a model's recent remote lookups (a decaying window of ``window`` lookups) is below
    ``min_hit_ratio`` the model is *cold*: a key is still looked up and its answer stored when it is
    sampled (one in ``probe_every``, chosen by the key's own digest: the same keys on every replica, so a
    key repeated across replicas is noticed) or when this process saw it among the model's last
    ``recent`` keys (a repeat: a small hot set is noticed at its second request, sampled or not). Other
    keys are answered by Triton straight away and not stored. Lookups that hit raise the ratio, and every
    key is looked up and stored again as soon as it is back over the threshold. The in-process L1 is
    always consulted. ``min_hit_ratio`` 0 turns this off (every request looks in Redis and stores).
    """

    def __init__(
        self, min_hit_ratio: float, window: int = 256, probe_every: int = 16, recent: int = 2048
    ) -> None:
        self.min_hit_ratio = min_hit_ratio
        self.window = window
        self.probe_every = probe_every
        self.recent = recent
        self._stats: dict[tuple[str, str], list[float]] = {}  # model -> [lookups, hits]
        self._seen: dict[tuple[str, str], dict[str, None]] = {}  # a cold model's last keys, oldest first

    def warm(self, model: tuple[str, str]) -> bool:
        """Whether every key of ``model`` is looked up and stored (False: only the sampled ones)."""
        if self.min_hit_ratio <= 0:
            return True
        stats = self._stats.get(model)
        if stats is None:
            if len(self._stats) > 4096:  # model names come from requests that resolved: still bound it
                self._stats.clear()
            stats = self._stats[model] = [0.0, 0.0]
        lookups, hits = stats
        return lookups < self.window / 2 or hits >= self.min_hit_ratio * lookups

    def sampled(self, key: str) -> bool:
        """One key in ``probe_every``, from the digest at the end of the key (the same on every replica)."""
        try:
            return int(key[-4:], 16) % self.probe_every == 0
        except ValueError:
            return hash(key) % self.probe_every == 0

    def repeated(self, model: tuple[str, str], key: str) -> bool:
        """Whether this process saw ``key`` among ``model``'s last ``recent`` keys (remembering it)."""
        seen = self._seen.get(model)
        if seen is None:
            if len(self._seen) >= 256:  # bounded: cold models only, and few of them at once
                self._seen.clear()
            seen = self._seen[model] = {}
        if key in seen:
            return True
        seen[key] = None
        if len(seen) > self.recent:
            del seen[next(iter(seen))]
        return False

    def should_read(self, model: tuple[str, str], key: str) -> bool:
        """Look ``key`` up in Redis and store its answer there? Asked once per request (it remembers the
        key of a cold model)."""
        if self.warm(model):
            self._seen.pop(model, None)
            return True
        return self.sampled(key) or self.repeated(model, key)

    should_write = should_read  # a cold model's other keys are neither looked up nor stored

    def record(self, model: tuple[str, str], hit: bool) -> None:
        stats = self._stats.get(model)
        if stats is None:
            return
        stats[0] += 1
        if hit:
            stats[1] += 1
        if stats[0] >= self.window:  # decay: the window slides
            stats[0] /= 2
            stats[1] /= 2


class ResponseCache:
    """Redis-backed; every error or timeout becomes ``CacheUnavailable`` (never a 5xx), and after one the
    cache is skipped for ``backoff_s`` so a dead Redis does not add its timeout to every request.

    With ``l1_entries`` > 0 an ``L1Cache`` answers hot keys without a Redis round trip. It is consulted only
    while Redis is not in back-off, so a known-down Redis still means BYPASS; an entry may be served for up
    to ``l1_ttl_s`` after Redis itself lost it (a FLUSHDB by hand, an eviction; ``TGW_L1_CACHE_TTL_S``).
    """

    def __init__(
        self, store: CacheStore | None, ttl_s: int, max_value_bytes: int, backoff_s: float = 2.0,
        l1_entries: int = 0, l1_bytes: int = 32 * 1024 * 1024, l1_ttl_s: float = 60.0,
    ) -> None:  # fmt: skip
        self.store = store
        self.ttl_s = ttl_s
        self.max_value_bytes = max_value_bytes
        self.backoff_s = backoff_s
        self._down_until = 0.0
        self.last_error: str | None = None
        self.l1 = L1Cache(l1_entries, l1_bytes, l1_ttl_s) if l1_entries > 0 and l1_bytes > 0 else None

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def _failed(self, exc: BaseException) -> CacheUnavailable:
        self._down_until = time.monotonic() + self.backoff_s
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        logger.warning(
            "response cache unavailable (%s); bypassing for %.1f s", self.last_error, self.backoff_s
        )
        return CacheUnavailable(self.last_error)

    def _usable(self) -> CacheStore:
        if self.store is None or time.monotonic() < self._down_until:
            raise CacheUnavailable(self.last_error or "cache disabled")
        return self.store

    async def get(self, key: str, remote: bool = True) -> TritonResult | None:
        """The L1, then (``remote``) Redis."""
        store = self._usable()
        l1 = self.l1
        if l1 is not None:
            hit = l1.get(key)
            if hit is not None:
                return hit
        if not remote:
            return None
        value = await self._fetch(store, key)
        if value is None:
            return None
        try:
            result, expires_at = decode_entry(value)
        except Exception:
            logger.warning("dropping an unreadable cache entry %s", key)
            return None
        if l1 is not None and expires_at > 0:
            l1.put(key, result, expires_at - time.time())
        return result

    async def _fetch(self, store: CacheStore, key: str) -> bytes | None:
        try:
            return await store.get(key)
        except Exception as exc:
            raise self._failed(exc) from exc

    async def put(self, key: str, result: TritonResult) -> None:
        """Store an answer. The L1 gets it before Redis acknowledges, so that the requests after this one
        hit even while the ``SET`` is under way (the answer is the same; it expires with the TTL)."""
        store = self._usable()
        if sum(arr.nbytes for arr in result.outputs.values() if arr.dtype != object) > self.max_value_bytes:
            return  # too large for certain: not encoded (16 MiB took the event loop ~10 ms to encode)
        value = encode_result(result, time.time() + self.ttl_s)
        if len(value) > self.max_value_bytes:
            return
        if self.l1 is not None:
            self.l1.put(key, result, self.ttl_s)
        try:
            await store.set(key, value, self.ttl_s)
        except Exception as exc:
            raise self._failed(exc) from exc

    async def get_stream(self, key: str) -> list[TritonResult] | None:
        """A cached stream: its responses in order (Redis only: streams skip the L1)."""
        value = await self._fetch(self._usable(), key)
        if value is None:
            return None
        try:
            return decode_stream(value)
        except Exception:
            logger.warning("dropping an unreadable cached stream %s", key)
            return None

    async def put_stream(self, key: str, results: Sequence[TritonResult], max_bytes: int) -> bool:
        """Store a completed stream's responses if their encoding is at most ``max_bytes`` (and the
        cache's value bound); returns whether it was stored."""
        store = self._usable()
        value = encode_stream(results)
        if len(value) > min(max_bytes, self.max_value_bytes):
            return False
        try:
            await store.set(key, value, self.ttl_s)
        except Exception as exc:
            raise self._failed(exc) from exc
        return True

    async def probe(self) -> bool:
        """Readiness check; also ends the back-off early once Redis answers again."""
        if self.store is None:
            return False
        ok = await self.store.ping()
        if ok:
            self._down_until = 0.0
        else:
            self._down_until = time.monotonic() + self.backoff_s
        return ok
