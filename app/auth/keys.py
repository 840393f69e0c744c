"""API keys: random tokens with a recognisable prefix, stored in Redis only as HMAC-SHA256 with the
server's pepper (``TGW_KEY_PEPPER``).

A token is ``tgw_<id>_<secret>``: ``id`` (12 hex digits) is public and names the key in logs, ``tgw keys``
and the admin API; ``secret`` is 32 random bytes (base64url). Redis holds

* ``tgw:auth:key:<hmac hex>`` -> the key's record (JSON: id, name, tenant, tier, limits, created), looked
  up with one ``GET`` when a token is presented;
* ``tgw:auth:ids`` (hash) -> id -> hmac hex, for list / revoke / rotate.

Nothing in Redis (or in a log) can be turned back into a working key without the pepper.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from app.timestamps import iso_utc

PREFIX = "tgw_"
TICKET_PREFIX = "tgwt_"
_NS = "tgw:auth:"
IDS_KEY = _NS + "ids"


def new_token() -> tuple[str, str]:
    """A fresh (key id, token)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(token: str) -> str | None:
    """The public id inside a well-formed token, else None (nothing else is read from it)."""
    if not token.startswith(PREFIX) or len(token) > 128:
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or len(key_id) != 12 or len(secret) < 32:
        return None
    try:
        int(key_id, 16)
    except ValueError:
        return None
    return key_id


def digest(pepper: str, token: str) -> str:
    return hmac.new(pepper.encode(), token.encode(), hashlib.sha256).hexdigest()


def record_key(token_digest: str) -> str:
    return f"{_NS}key:{token_digest}"


@dataclass(slots=True)
class KeyRecord:
    id: str
    name: str
    tenant: str
    tier: str
    rps: float
    burst: int
    concurrency: int
    daily_quota: int
    created: float
    digest: str = ""
    budget: dict[str, float] | None = None  # monthly caps (app.services.usage.Budget.as_dict); None: none

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes | str) -> KeyRecord:
        data: dict[str, Any] = orjson.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def public(self) -> dict[str, Any]:
        """What list/create show: everything but the digest."""
        data = asdict(self)
        data.pop("digest")
        data["created"] = iso_utc(self.created)
        return data


class KeyStore:
    """Create, find, list, revoke and rotate keys in Redis (redis-py asyncio client)."""

    def __init__(self, redis: Any, pepper: str, timeout_s: float = 1.0) -> None:
        self.redis = redis
        self.pepper = pepper
        self.timeout_s = timeout_s

    async def create(
        self, name: str, tenant: str, tier: str, rps: float, burst: int, concurrency: int, daily_quota: int,
        budget: dict[str, float] | None = None,
    ) -> tuple[str, KeyRecord]:  # fmt: skip
        key_id, token = new_token()
        rec = KeyRecord(key_id, name, tenant, tier, rps, burst, concurrency, daily_quota, time.time())
        rec.budget = budget
        rec.digest = digest(self.pepper, token)
        async with asyncio.timeout(self.timeout_s):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(record_key(rec.digest), rec.dumps())
                pipe.hset(IDS_KEY, key_id, rec.digest)
                await pipe.execute()
        return token, rec

    async def find(self, token: str) -> KeyRecord | None:
        """The record of a presented token, or None. The HMAC is the lookup key; the stored digest is
        compared again in constant time (a record filed under the wrong key never authenticates)."""
        key_id = key_id_of(token)
        if key_id is None:
            return None
        return await self.lookup(key_id, digest(self.pepper, token))

    async def lookup(self, key_id: str, presented: str) -> KeyRecord | None:
        async with asyncio.timeout(self.timeout_s):
            raw = await self.redis.get(record_key(presented))
        if raw is None:
            return None
        rec = KeyRecord.loads(raw)
        if not hmac.compare_digest(rec.digest, presented) or rec.id != key_id:
            return None
        return rec

    async def list(self) -> list[KeyRecord]:
        async with asyncio.timeout(self.timeout_s * 4):
            ids: dict[Any, Any] = await self.redis.hgetall(IDS_KEY)
            digests = [_s(d) for d in ids.values()]
            raws = await self.redis.mget([record_key(d) for d in digests]) if digests else []
        records = [KeyRecord.loads(raw) for raw in raws if raw is not None]
        return sorted(records, key=lambda r: r.created)

    async def get(self, key_id: str) -> KeyRecord | None:
        async with asyncio.timeout(self.timeout_s):
            found = await self.redis.hget(IDS_KEY, key_id)
            raw = await self.redis.get(record_key(_s(found))) if found is not None else None
        return KeyRecord.loads(raw) if raw is not None else None

    async def set_budget(self, key_id: str, budget: dict[str, float] | None) -> KeyRecord | None:
        """Set (None: remove) a key's monthly budget; seen by every replica within TGW_AUTH_KEY_CACHE_S."""
        rec = await self.get(key_id)
        if rec is None:
            return None
        rec.budget = budget
        async with asyncio.timeout(self.timeout_s):
            await self.redis.set(record_key(rec.digest), rec.dumps(), xx=True)
        return rec

    async def revoke(self, key_id: str) -> bool:
        rec = await self.get(key_id)
        if rec is None:
            return False
        async with asyncio.timeout(self.timeout_s):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(record_key(rec.digest))
                pipe.hdel(IDS_KEY, key_id)
                await pipe.execute()
        return True

    async def rotate(self, key_id: str, grace_s: int = 0) -> tuple[str, KeyRecord] | None:
        """A new secret for the same id, tenant, tier and limits. The old token stops at once, or after
        ``grace_s`` seconds (its record expires) so clients can switch over."""
        rec = await self.get(key_id)
        if rec is None:
            return None
        old = rec.digest
        token = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        rec.digest = digest(self.pepper, token)
        async with asyncio.timeout(self.timeout_s):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(record_key(rec.digest), rec.dumps())
                pipe.hset(IDS_KEY, key_id, rec.digest)
                if grace_s > 0:
                    pipe.expire(record_key(old), grace_s)
                else:
                    pipe.delete(record_key(old))
                await pipe.execute()
        return token, rec


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
